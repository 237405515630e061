"""The real daemon as a subprocess (``python -m pipeline.serve``, the command ``defect serve`` runs):
hot folder, HTTP, video file, kill -9 exactly-once, hot-swap under load, no torch."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from pipeline.metadata import load_metadata, save_metadata, sha256_file
from pipeline.registry import Registry
from pipeline.serve.store import ResultRow, ResultStore, iter_all, utc_iso
from tests.tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """One daemon process; its log is printed when a test fails."""

    def __init__(self, tmp: Path, *args: str, name: str = "daemon"):
        self.log_path = tmp / f"{name}.log"
        self.port: int | None = None
        argv = list(args)
        if "--http" in argv:
            self.port = int(argv[argv.index("--http") + 1].rsplit(":", 1)[1])
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.serve", *argv], cwd=REPO, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_http(self, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return httpx.get(f"{self.url}/health", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError(f"daemon did not answer within {timeout}s:\n{self.log()}")

    def wait_exit(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"daemon did not exit within {timeout}s:\n{self.log()}") from None

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def served(tmp_path):
    procs: list[Served] = []

    def start(*args: str, name: str = "daemon") -> Served:
        p = Served(tmp_path, *args, name=f"{name}{len(procs)}")
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()


def png(value: int, size: tuple[int, int] = (24, 32), seed: int = 0) -> bytes:
    """A small PNG of mean ``value``; ``seed`` makes the bytes unique."""
    img = np.full((*size, 3), value, np.uint8)
    img[0, 0] = [seed % 256, (seed // 256) % 256, 7]
    return cv2.imencode(".png", img)[1].tobytes()


def drop(folder: Path, name: str, data: bytes) -> None:
    """The writer convention: temp name, then rename."""
    tmp = folder / f".{name}.part"
    tmp.write_bytes(data)
    os.replace(tmp, folder / name)


def rows(db: Path) -> list[ResultRow]:
    return list(iter_all(db)) if db.exists() else []


def count_rows(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return c.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.Error:
        return 0


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def versioned_model(dir_: Path, version: str, bias: float = 0.0) -> Path:
    path = make_tiny_model(dir_, bias=bias)
    save_metadata(load_metadata(path).model_copy(update={"version": version}), path.with_suffix(".json"))
    return path


# -------------------------------------------------------------------------------------------------------------


def test_hot_folder_good_and_bad_files(tiny_model, tmp_path, served):
    watch, db = tmp_path / "in", tmp_path / "r.sqlite"
    watch.mkdir()
    (watch / "sub").mkdir()
    good = {f"dark{i}.png": png(15, seed=i) for i in range(12)} | {f"bright{i}.png": png(240, seed=i)
                                                                   for i in range(12)}
    good["sub/nested.png"] = png(240, seed=99)
    rgba16 = cv2.imencode(".png", np.full((20, 20, 4), 65000, np.uint16))[1].tobytes()
    good["rgba16.png"] = rgba16  # 16-bit RGBA decodes fine
    good["jpeg_named.png"] = cv2.imencode(".jpg", np.full((20, 20, 3), 10, np.uint8))[1].tobytes()
    bad = {"empty.png": b"", "truncated.png": png(240)[:40], "notes.txt": b"hello", "huge.png":
           cv2.imencode(".png", np.zeros((120, 120, 3), np.uint8))[1].tobytes()}
    for name, data in {**good, **bad}.items():
        drop(watch / Path(name).parent, Path(name).name, data)
    (watch / "writing.png.part").write_bytes(b"half")  # ignored: still being written
    port = free_port()
    d = served("--model", str(tiny_model), "--db", str(db), "--watch", str(watch), "--http", f"127.0.0.1:{port}",
               "--max-pixels", "10000", "--poll-interval", "0.05")
    d.wait_http()
    deadline = time.monotonic() + 30
    while count_rows(db) < len(good) + len(bad) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)  # moves happen right after the commit
    text = httpx.get(f"{d.url}/metrics").text
    assert d.terminate() == 0, d.log()

    got = {r.source: r for r in rows(db)}
    assert set(got) == {f"folder:{n}" for n in [*good, *bad]}, d.log()
    assert len(rows(db)) == len(got)
    for name in good:
        r = got[f"folder:{name}"]
        assert r.ok and (watch / "done" / name).is_file() and not (watch / name).exists()
        assert r.sha256 == hashlib.sha256(good[name]).hexdigest() and r.model_version
        expected = "defect" if name.startswith(("bright", "sub/", "rgba16")) else "good"
        assert r.decision == expected, (name, r)
    kinds = {"empty.png": "empty", "truncated.png": "undecodable", "notes.txt": "undecodable",
             "huge.png": "too_large"}
    for name, kind in kinds.items():
        r = got[f"folder:{name}"]
        assert r.decision == "error" and r.error_kind == kind and r.error_message
        assert (watch / "quarantine" / name).is_file()
        reason = (watch / "quarantine" / f"{name}.reason.txt").read_text()
        assert f"error_kind: {kind}" in reason and f"result_id: {r.id}" in reason
    assert (watch / "writing.png.part").exists()
    assert metric(text, "defect_images_total", '{decision="defect",source="folder"}') == 14
    assert metric(text, "defect_images_total", '{decision="good",source="folder"}') == 13
    assert metric(text, "defect_errors_total", '{kind="undecodable"}') == 2
    n_batches = metric(text, "defect_batch_size_count")
    assert 0 < n_batches < len(good)  # micro-batching did group images
    assert metric(text, "defect_batch_size_sum") == len(good)


def test_http_predict_health_metrics_results_and_no_torch(tiny_model, tmp_path, served):
    port, db = free_port(), tmp_path / "r.sqlite"
    d = served("--model", str(tiny_model), "--db", str(db), "--http", f"127.0.0.1:{port}",
               "--max-upload-bytes", "20000", "--max-queue", "4")
    health = d.wait_http()
    assert health["status"] == "ok" and health["provider"] == "CPUExecutionProvider"
    assert health["model_version"] == sha256_file(tiny_model)[:12] and "uptime_s" in health
    assert health["queue_depth"] == 0
    c = httpx.Client(base_url=d.url, timeout=30)
    r = c.post("/predict", content=png(240))
    assert r.status_code == 200 and r.json()["decision"] == "defect" and r.json()["error"] is None
    r = c.post("/predict", files={"file": ("part.png", png(10), "image/png")})
    assert r.status_code == 200 and r.json()["decision"] == "good" and r.json()["source"] == "http:part.png"
    r = c.post("/predict", content=b"definitely not an image")
    assert r.status_code == 422 and r.json()["error"]["kind"] == "undecodable"
    assert c.post("/predict", content=b"\0" * 30000).status_code == 413
    assert c.post("/predict", content=iter([b"\0" * 15000, b"\0" * 15000])).status_code == 413  # chunked

    results: list[int] = []

    def client(i: int) -> None:
        results.append(httpx.post(f"{d.url}/predict", content=png(200, seed=i), timeout=30).status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]  # 4x the queue: bursts wait
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 16

    listed = c.get("/results", params={"limit": 100}).json()
    assert len(listed) == 19 and [x["id"] for x in listed] == sorted(x["id"] for x in listed)
    since = listed[5]["ts"]
    assert all(x["ts"] >= since for x in c.get("/results", params={"since": since}).json())
    assert len(c.get("/results", params={"limit": 2}).json()) == 2
    assert c.get("/results", params={"since": "not-a-time"}).status_code == 400
    text = c.get("/metrics").text
    assert metric(text, "defect_images_total", '{decision="defect",source="http"}') == 17
    assert metric(text, "defect_rejected_total", '{reason="too_large"}') == 2
    assert "defect_latency_seconds_bucket" in text and "defect_queue_depth 0.0" in text
    assert 'defect_model_info{provider="CPUExecutionProvider"' in text

    maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
    assert "onnxruntime" in maps  # the check reads the right process
    assert "/torch/" not in maps and "libtorch" not in maps
    assert d.terminate() == 0


def test_serve_code_never_imports_torch(tiny_model, tmp_path):
    """Build, start and stop a daemon in a fresh interpreter, then look at its sys.modules."""
    code = f"""
import sys, httpx
from pipeline.cli import main
from pipeline.serve import Daemon, ServeSettings
s = ServeSettings(model={str(tiny_model)!r}, db={str(tmp_path / 'r.sqlite')!r}, watch={str(tmp_path / 'in')!r},
                  http='127.0.0.1:0')
d = Daemon(s)
d.start()
r = httpx.post(f'http://127.0.0.1:{{d.http.port}}/predict', content=open({str(tiny_model)!r}, 'rb').read())
assert r.status_code == 422, r.text
d.shutdown()
print('torch' in sys.modules, sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False []", out.stdout


def test_video_file_as_camera_is_sampled_then_finishes(tiny_model, tmp_path, served):
    video, db = tmp_path / "line.avi", tmp_path / "r.sqlite"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    for i in range(20):  # frames 0,1 dark, 2,3 bright, ...
        writer.write(np.full((48, 64, 3), 240 if (i // 2) % 2 else 15, np.uint8))
    writer.release()
    d = served("--model", str(tiny_model), "--db", str(db), "--camera", str(video), "--camera-fps", "5",
               "--exit-when-done")
    assert d.wait_exit(60) == 0, d.log()
    got = sorted(rows(db), key=lambda r: int(r.source.rsplit("#", 1)[1]))  # decoded in parallel: any order
    assert [r.source for r in got] == [f"camera:{video}#{i}" for i in range(0, 20, 2)], d.log()
    assert [r.decision for r in got] == ["good", "defect"] * 5
    assert len({r.sha256 for r in got}) == 2  # frame pixels hashed: identical frames, identical hash
    assert "source finished" in d.log()


def test_kill_9_mid_stream_then_restart_is_exactly_once(tiny_model, tmp_path, served):
    watch, db = tmp_path / "in", tmp_path / "r.sqlite"
    watch.mkdir()
    n = 240
    data = {f"img{i:03d}.png": png(240 if i % 3 else 15, seed=i) for i in range(n)}
    for name, blob in data.items():
        drop(watch, name, blob)
    args = ("--model", str(tiny_model), "--db", str(db), "--watch", str(watch), "--poll-interval", "0.05",
            "--max-batch", "2", "--workers", "1", "--max-queue", "4")
    kills = []  # (rows, files moved) at each kill; rows > moved: the kill hit the commit -> move window
    for _ in range(3):
        before = count_rows(db)
        d = served(*args)
        deadline = time.monotonic() + 30
        while count_rows(db) < before + 15 and time.monotonic() < deadline and d.proc.poll() is None:
            time.sleep(0.002)
        d.proc.kill()  # SIGKILL: no cleanup at all
        d.proc.wait()
        kills.append((count_rows(db), len(list((watch / "done").iterdir()))))
    assert kills[-1][0] < n, f"every image was done before the last kill {kills}: the test proves nothing"
    d = served(*args, "--exit-when-done")
    assert d.wait_exit(60) == 0, d.log()

    got = rows(db)
    by_source = Counter(r.source for r in got)
    assert len(got) == n and set(by_source) == {f"folder:{k}" for k in data}, (kills, by_source.most_common(3))
    assert max(by_source.values()) == 1
    assert all(r.ok for r in got)
    done = sorted(p.name for p in (watch / "done").iterdir())
    assert done == sorted(data)  # every file moved exactly once, none renamed as a collision
    assert not [p for p in watch.iterdir() if p.is_file()]
    for r in got:
        assert r.sha256 == hashlib.sha256(data[r.source.split(":", 1)[1]]).hexdigest()


def test_sigterm_mid_stream_finishes_what_was_accepted_and_exits_0(tiny_model, tmp_path, served):
    watch, db = tmp_path / "in", tmp_path / "r.sqlite"
    watch.mkdir()
    n = 150
    for i in range(n):
        drop(watch, f"img{i:03d}.png", png(240, seed=i))
    d = served("--model", str(tiny_model), "--db", str(db), "--watch", str(watch), "--poll-interval", "0.05",
               "--max-batch", "2", "--workers", "1", "--max-queue", "8")
    deadline = time.monotonic() + 30
    while count_rows(db) < 15 and time.monotonic() < deadline:
        time.sleep(0.002)
    assert d.terminate() == 0, d.log()
    got = rows(db)
    moved = sorted(p.name for p in (watch / "done").iterdir())
    assert 15 <= len(got) < n, "SIGTERM came too late to test anything"
    assert moved == sorted(r.source.split(":", 1)[1] for r in got)  # every committed image was also moved
    assert len(moved) + len([p for p in watch.iterdir() if p.is_file()]) == n  # the rest wait, untouched
    assert "shutting down" in d.log() and "stopped" in d.log()


def test_restart_moves_files_whose_result_is_already_committed(tiny_model, tmp_path, served):
    """The crash window between COMMIT and the move, made deterministic."""
    watch, db = tmp_path / "in", tmp_path / "r.sqlite"
    watch.mkdir()
    blob = png(240)
    drop(watch, "a.png", blob)
    drop(watch, "b.png", png(15))
    sha = hashlib.sha256(blob).hexdigest()
    store = ResultStore(db)
    store.insert_many([ResultRow(ts=utc_iso(), source="folder:a.png", idem_key=f"folder:a.png|{sha}", sha256=sha,
                                 decision="good", model_version="before-crash", label="good")])
    store.close()
    d = served("--model", str(tiny_model), "--db", str(db), "--watch", str(watch), "--exit-when-done",
               "--poll-interval", "0.05")
    assert d.wait_exit(30) == 0, d.log()
    got = {r.source: r for r in rows(db)}
    assert len(rows(db)) == 2
    assert got["folder:a.png"].model_version == "before-crash"  # not scored again
    assert got["folder:b.png"].decision == "good"
    assert (watch / "done" / "a.png").read_bytes() == blob and not (watch / "a.png").exists()


def test_hot_swap_under_load_and_refused_models(tmp_path, served):
    root, watch, db = tmp_path / "models", tmp_path / "in", tmp_path / "r.sqlite"
    watch.mkdir()
    line = root / "line1"
    reg = Registry(root)  # the daemon serves registered versions only (their registry.json checksums)
    reg.register("line1", make_tiny_model(tmp_path / "run1").parent, version="v1")
    reg.register("line1", make_tiny_model(tmp_path / "run2", bias=2.0).parent, version="v2")
    reg.register("line1", make_tiny_model(tmp_path / "run3").parent, version="v3")
    tampered = line / "v3" / "model.onnx"
    tampered.write_bytes(tampered.read_bytes() + b"\0")  # sha256 no longer matches model.json
    broken = make_tiny_model(tmp_path / "run4")
    broken.write_bytes(b"garbage, not ONNX")
    save_metadata(load_metadata(broken).model_copy(update={"onnx_sha256": sha256_file(broken)}),
                  broken.with_suffix(".json"))
    reg.register("line1", broken.parent, version="v4")

    def point(version: str) -> None:
        (line / ".CHAMPION.tmp").write_text(version + "\n")
        os.replace(line / ".CHAMPION.tmp", line / "CHAMPION")

    point("v1")
    port = free_port()
    d = served("--model", str(root), "--line", "line1", "--db", str(db), "--watch", str(watch),
               "--http", f"127.0.0.1:{port}", "--model-poll-interval", "0.1", "--poll-interval", "0.05")
    assert d.wait_http()["model_version"] == "v1"

    sent: list[str] = []
    stop = threading.Event()

    def feed() -> None:
        i = 0
        while not stop.is_set():
            name = f"f{i:04d}.png"
            drop(watch, name, png(120, seed=i))
            sent.append(name)
            i += 1
            time.sleep(0.005)

    feeder = threading.Thread(target=feed)
    feeder.start()

    def wait_for(cond, what: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = httpx.get(f"{d.url}/health").json()
            if cond(h):
                return h
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{d.log()}")

    try:
        wait_for(lambda h: h["sources"]["folder"]["moved_done"] >= 20, "v1 traffic")
        point("v2")
        wait_for(lambda h: h["model_version"] == "v2", "swap to v2")
        n_swap = len(sent)
        wait_for(lambda h: h["sources"]["folder"]["moved_done"] >= n_swap + 20, "v2 traffic")
        for bad, reason in (("v3", "integrity"), ("v4", "load")):
            point(bad)
            h = wait_for(lambda h: h["last_refusal"] and h["last_refusal"]["reason"] == reason, f"{bad} refused")
            assert h["model_version"] == "v2"
        n_refused = len(sent)
        wait_for(lambda h: h["sources"]["folder"]["moved_done"] >= n_refused + 10, "traffic after refusal")
    finally:
        stop.set()
        feeder.join()
    wait_for(lambda h: h["sources"]["folder"]["moved_done"] == len(sent) and h["queue_depth"] == 0, "drain")
    text = httpx.get(f"{d.url}/metrics").text
    assert d.terminate() == 0

    got = rows(db)
    assert sorted(r.source for r in got) == sorted(f"folder:{n}" for n in sent)  # none lost, none doubled
    versions = [r.model_version for r in sorted(got, key=lambda r: r.id)]
    first_v2 = versions.index("v2")
    assert first_v2 >= 20 and set(versions[:first_v2]) == {"v1"} and set(versions[first_v2:]) == {"v2"}
    for r in got:  # the version recorded is the model that really scored it (v2 biases towards good)
        assert (r.defect_score > 0.1) if r.model_version == "v1" else (r.defect_score < 0.1), r
    assert metric(text, "defect_model_swaps_total") == 1
    assert metric(text, "defect_model_refusals_total", '{reason="integrity"}') == 1
    assert metric(text, "defect_model_refusals_total", '{reason="load"}') == 1
    assert 'version="v2"' in text and 'version="v1"' not in text


def test_bad_arguments_fail_fast_with_a_clear_message(tmp_path, tiny_model):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.serve", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=60)

    out = run("--model", str(tiny_model), "--db", str(tmp_path / "r.sqlite"))
    assert out.returncode == 2 and "no image source" in out.stderr
    out = run("--model", str(tmp_path), "--db", str(tmp_path / "r.sqlite"), "--watch", str(tmp_path / "in"))
    assert out.returncode == 1 and "--line" in out.stderr
    tiny_model.write_bytes(tiny_model.read_bytes() + b"\0")
    out = run("--model", str(tiny_model), "--db", str(tmp_path / "r.sqlite"), "--watch", str(tmp_path / "in"))
    assert out.returncode == 1 and "integrity" in out.stderr


def test_defect_cli_registers_serve_and_results(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    store = ResultStore(tmp_path / "r.sqlite")
    store.insert_many([ResultRow(ts="2025-03-01T10:00:00.000+00:00", source="http", decision="defect",
                                 model_version="v9", label="defect", defect_score=0.9,
                                 probabilities={"good": 0.1, "defect": 0.9}),
                       ResultRow(ts="2025-03-02T10:00:00.000+00:00", source="folder:x.png", decision="error",
                                 model_version="v9", error_kind="empty", error_message="empty file")])
    store.close()
    runner = CliRunner()
    assert runner.invoke(main, ["serve", "--help"]).exit_code == 0
    out = runner.invoke(main, ["results", str(tmp_path / "r.sqlite"), "--json", "--since", "2025-03-02"])
    assert out.exit_code == 0, out.output
    import json

    lines = [json.loads(x) for x in out.output.strip().splitlines()]
    assert len(lines) == 1 and lines[0]["source"] == "folder:x.png"
    assert lines[0]["error"] == {"kind": "empty", "message": "empty file"} and lines[0]["decision"] == "error"
    table = runner.invoke(main, ["results", str(tmp_path / "r.sqlite")])
    assert table.exit_code == 0 and "v9" in table.output
