"""Faults: kill -9 of the daemon at random points over many cycles, a full disk under the results database
and under the registry, the results database locked by another process, a model file rewritten in place
while the daemon watches it, and the retrain flow killed during training, export and promotion.

Each test injects the fault into the real code (subprocesses, real files, a real small filesystem) and checks
the promise that matters after it: one row per image, nothing lost, nothing doubled, the champion whole and
loadable, the next run fine.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from pipeline.metadata import load_metadata, save_metadata, sha256_file, write_json_atomic
from pipeline.registry import Registry, line_lock, read_champion
from tests.test_serve_daemon import REPO, count_rows, drop, free_port, metric, png, rows, served  # noqa: F401
from tests.tiny_model import make_tiny_model

# -- shared checks -----------------------------------------------------------------------------------------


def integrity_ok(db: Path) -> bool:
    with sqlite3.connect(db, timeout=30) as c:
        return c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def folder_state(watch: Path) -> dict[str, list[str]]:
    """Input files by where they are: still in the inbox, in done/, in quarantine/ (reason files apart)."""
    out: dict[str, list[str]] = {"inbox": [], "done": [], "quarantine": []}
    for p in watch.rglob("*"):
        if not (p.is_file() or p.is_symlink()) or p.name.startswith("."):
            continue
        top = p.relative_to(watch).parts[0]
        if top in ("done", "quarantine"):
            if not p.name.endswith(".reason.txt"):
                out[top].append(p.relative_to(watch / top).as_posix())
        else:
            out["inbox"].append(p.relative_to(watch).as_posix())
    return out


def assert_exactly_once(watch: Path, db: Path, inputs: dict[str, bytes], *, finished: bool) -> None:
    """The hot folder's promise at any instant: every input exactly once somewhere, at most one row per
    input, a row for everything that left the inbox (done/ = ok row, quarantine/ = error row)."""
    state = folder_state(watch)
    everywhere = Counter(state["inbox"] + state["done"] + state["quarantine"])
    assert set(everywhere) == set(inputs) and max(everywhere.values()) == 1, (everywhere - Counter(inputs))
    got = [r for r in rows(db) if r.source.startswith("folder:")]
    by_name = Counter(r.source.split(":", 1)[1] for r in got)
    assert not by_name or max(by_name.values()) == 1, by_name.most_common(3)
    table = {r.source.split(":", 1)[1]: r for r in got}
    for name in state["done"]:
        assert name in table and table[name].ok, name
        assert table[name].sha256 == hashlib.sha256(inputs[name]).hexdigest()
    for name in state["quarantine"]:
        assert name in table and not table[name].ok, name
        assert f"result_id: {table[name].id}" in (watch / "quarantine" / f"{name}.reason.txt").read_text()
    if finished:
        assert not state["inbox"] and len(table) == len(inputs)
    assert integrity_ok(db)


# -- kill -9 at random points ------------------------------------------------------------------------------


def test_kill_9_at_random_points_over_many_cycles_is_exactly_once(tiny_model, tmp_path, served):  # noqa: F811
    """Ten SIGKILLs at random moments while files keep arriving (decode, batch, commit, move, reason file,
    HTTP reply); after each, the exactly-once state holds and every HTTP answer given is in the database;
    then one clean run finishes everything."""
    rnd = random.Random(20261123)
    watch, db = tmp_path / "in", tmp_path / "r.sqlite"
    (watch / "sub").mkdir(parents=True)
    inputs: dict[str, bytes] = {}
    lock = threading.Lock()  # held by the feeder while it writes one file; the checks take it
    stop_feeding = threading.Event()

    def feeder() -> None:
        i = 0
        while not stop_feeding.is_set():
            name = f"{'sub/' if i % 7 == 0 else ''}img{i:05d}.png"
            data = png(240 if i % 3 else 15, seed=i) if i % 10 else b"broken %d" % i  # 10 % are quarantined
            with lock:
                inputs[name] = data
                drop((watch / name).parent, Path(name).name, data)
            i += 1
            time.sleep(0.008)

    feed = threading.Thread(target=feeder, daemon=True)
    feed.start()
    acked: list[dict] = []
    in_flight_at_kill = 0
    for cycle in range(10):
        port = free_port()
        d = served("--model", str(tiny_model), "--db", str(db), "--watch", str(watch), "--http", f"127.0.0.1:{port}",
                   "--poll-interval", "0.02", "--max-batch", str(rnd.choice([1, 2, 4, 8])), "--workers",
                   str(rnd.choice([1, 2])), "--max-queue", "8", name=f"cycle{cycle}-")
        stop = threading.Event()

        def client(port: int = port, cycle: int = cycle) -> None:
            i = 0
            while not stop.is_set():
                try:
                    r = httpx.post(f"http://127.0.0.1:{port}/predict", content=png(100, seed=10_000 + 1000 * cycle + i),
                                   timeout=5)
                    if r.status_code == 200:
                        acked.append(r.json())
                except httpx.HTTPError:
                    time.sleep(0.02)
                i += 1

        t = threading.Thread(target=client, daemon=True)
        t.start()
        before = count_rows(db)
        deadline = time.monotonic() + 30
        while count_rows(db) <= before and time.monotonic() < deadline and d.proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rnd.uniform(0.0, 0.8))  # somewhere in the stream
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        stop.set()
        t.join()
        with lock:
            in_flight_at_kill += bool(folder_state(watch)["inbox"])
            assert_exactly_once(watch, db, inputs, finished=False)
        stored = {r.id: r for r in rows(db)}
        for a in acked:  # an answer is only given after its row is committed
            assert a["id"] in stored and stored[a["id"]].sha256 == a["sha256"], a
    stop_feeding.set()
    feed.join()
    assert in_flight_at_kill >= 5, f"only {in_flight_at_kill} kills found files waiting: they prove little"
    assert len(acked) > 10, "too few HTTP answers to test the commit-before-reply rule"
    d = served("--model", str(tiny_model), "--db", str(db), "--watch", str(watch), "--exit-when-done",
               "--poll-interval", "0.02", name="final-")
    assert d.wait_exit(90) == 0, d.log()
    assert_exactly_once(watch, db, inputs, finished=True)
    leftovers = [p for p in watch.rglob(".*") if p.is_file()]
    assert not leftovers, leftovers[:5]  # no temp files left behind (the writers' .part files are all renamed)


# -- full disk ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of 8 MiB (tmpfs) that the test can fill: ENOSPC, not a simulation."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0777", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk: Path) -> Path:
    """Write a filler file until the filesystem is full; return it (delete it to make room again)."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def test_results_database_on_a_full_disk_delays_results_but_loses_none(tiny_model, tmp_path, small_disk,
                                                                         served):  # noqa: F811
    watch, db, port = tmp_path / "in", small_disk / "r.sqlite", free_port()
    watch.mkdir()
    inputs = {f"a{i:02d}.png": png(200, seed=i) for i in range(20)}
    for name, data in inputs.items():
        drop(watch, name, data)
    d = served("--model", str(tiny_model), "--db", str(db), "--watch", str(watch), "--http", f"127.0.0.1:{port}",
               "--poll-interval", "0.05")
    d.wait_http()
    deadline = time.monotonic() + 30
    while count_rows(db) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    filler = fill(small_disk)
    more = {f"b{i:02d}.png": png(30, seed=100 + i) for i in range(30)}
    for name, data in more.items():
        drop(watch, name, data)
    inputs.update(more)
    answer: list[httpx.Response] = []
    t = threading.Thread(target=lambda: answer.append(httpx.post(f"{d.url}/predict", content=png(99), timeout=60)))
    t.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and httpx.get(f"{d.url}/health").json()["status"] != "degraded":
        time.sleep(0.05)
    health = httpx.get(f"{d.url}/health").json()
    assert health["status"] == "degraded", health
    time.sleep(1.0)
    assert count_rows(db) == 20 and all((watch / n).exists() for n in more)  # nothing moved without its row
    assert "database or disk is full" in d.log()
    filler.unlink()  # room again: the retried commit goes through
    deadline = time.monotonic() + 30
    while count_rows(db) < 51 and time.monotonic() < deadline:
        time.sleep(0.1)
    t.join(30)
    assert answer and answer[0].status_code == 200, answer
    time.sleep(0.3)
    assert httpx.get(f"{d.url}/health").json()["status"] == "ok"
    text = httpx.get(f"{d.url}/metrics").text
    assert metric(text, "defect_store_failures_total") >= 1
    assert d.terminate() == 0, d.log()
    assert_exactly_once(watch, db, inputs, finished=True)
    assert len(rows(db)) == 51


def _run_dir(tmp_path: Path, name: str, bias: float = 0.0) -> Path:
    return make_tiny_model(tmp_path / name, bias=bias).parent


def test_registering_a_model_on_a_full_disk_fails_cleanly(tmp_path, small_disk):
    reg = Registry(small_disk / "models")
    v1 = reg.register("l", _run_dir(tmp_path, "r1"))
    reg.promote("l", v1.version)
    big = _run_dir(tmp_path, "r2", bias=1.0)
    (big / "report.html").write_bytes(os.urandom(9 * 1024 * 1024))  # more than the disk holds
    with pytest.raises(OSError) as exc:
        reg.register("l", big)
    assert exc.value.errno == errno.ENOSPC
    ldir = small_disk / "models" / "l"
    assert sorted(p.name for p in ldir.iterdir() if not p.name.startswith(".")) == ["CHAMPION", "history.jsonl",
                                                                                   v1.version]
    assert not [p for p in ldir.iterdir() if p.name.startswith(".tmp-")]  # the partial copy is gone
    assert read_champion(reg.root, "l") == v1.version and reg.verify("l", v1.version)
    reg.load_champion("l")
    # a full disk while promoting: CHAMPION and history stay as they were
    (big / "report.html").unlink()
    v2 = reg.register("l", big)
    filler = fill(small_disk)
    champion_before = (ldir / "CHAMPION").read_bytes()
    history_before = (ldir / "history.jsonl").read_bytes()
    with pytest.raises(OSError):
        reg.promote("l", v2.version)
    assert (ldir / "CHAMPION").read_bytes() == champion_before
    assert (ldir / "history.jsonl").read_bytes() in (history_before,)
    assert not [p for p in ldir.iterdir() if p.name.startswith(".CHAMPION.tmp")]
    filler.unlink()
    reg.promote("l", v2.version)  # and it works once there is room
    assert read_champion(reg.root, "l") == v2.version and reg.verify("l", v2.version)


def test_model_metadata_written_on_a_full_disk_keeps_the_old_file(tmp_path, small_disk):
    path = make_tiny_model(small_disk / "m")
    side = path.with_suffix(".json")
    before = side.read_bytes()
    filler = fill(small_disk)
    with pytest.raises(OSError):
        write_json_atomic(side, before.decode() + " " * 200_000)
    assert side.read_bytes() == before and load_metadata(path).onnx_sha256 == sha256_file(path)
    assert sorted(p.name for p in side.parent.iterdir()) == ["model.json", "model.onnx"]  # no temp file left
    filler.unlink()


# -- the results database locked by another process ---------------------------------------------------------


LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN EXCLUSIVE" if sys.argv[2] == "exclusive" else "BEGIN")
conn.execute("SELECT COUNT(*) FROM results").fetchone()
print("locked", flush=True)
time.sleep(float(sys.argv[3]))
conn.execute("COMMIT")
"""


def test_database_locked_by_a_reader_delays_results_but_loses_none(tiny_model, tmp_path, served,  # noqa: F811
                                                                    monkeypatch):
    """A reader holding a long read transaction (WAL: the daemon writes on), then one holding an exclusive
    lock for 3 s, far past the daemon's busy timeout (0.3 s here): commits fail, are retried, and every
    image ends with one row; HTTP answers wait for their commit."""
    watch, db, port = tmp_path / "in", tmp_path / "r.sqlite", free_port()
    watch.mkdir()
    monkeypatch.setenv("DEFECT_DB_BUSY_TIMEOUT_S", "0.3")
    d = served("--model", str(tiny_model), "--db", str(db), "--watch", str(watch), "--http", f"127.0.0.1:{port}",
               "--poll-interval", "0.05")
    d.wait_http()
    inputs: dict[str, bytes] = {}

    def feed(prefix: str, n: int) -> None:
        for i in range(n):
            name = f"{prefix}{i:03d}.png"
            inputs[name] = png(200, seed=hash(prefix) % 1000 + i)
            drop(watch, name, inputs[name])

    def hold(mode: str, seconds: float) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", LOCKER, str(db), mode, str(seconds)], stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout.readline().strip() == "locked"
        return p

    reader = hold("read", 4.0)
    feed("r", 60)  # all committed while the read transaction is open
    deadline = time.monotonic() + 30
    while count_rows(db) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count_rows(db) == 60 and reader.poll() is None
    reader.wait()

    locker = hold("exclusive", 3.0)
    feed("x", 40)
    answers: list[httpx.Response] = []
    t = threading.Thread(target=lambda: answers.append(httpx.post(f"{d.url}/predict", content=png(77), timeout=30)))
    t.start()
    time.sleep(1.5)
    assert locker.poll() is None and httpx.get(f"{d.url}/health").json()["status"] == "degraded"
    locker.wait()
    deadline = time.monotonic() + 30
    while count_rows(db) < 101 and time.monotonic() < deadline:
        time.sleep(0.1)
    t.join(30)
    assert answers and answers[0].status_code == 200
    time.sleep(0.3)
    text = httpx.get(f"{d.url}/metrics").text
    assert metric(text, "defect_store_failures_total") >= 1  # the retry path really ran
    assert "database is locked" in d.log()
    assert d.terminate() == 0
    assert_exactly_once(watch, db, inputs, finished=True)
    assert len(rows(db)) == 101


def test_big_files_waiting_on_a_locked_database_keep_memory_bounded(tiny_model, tmp_path, served,  # noqa: F811
                                                                      monkeypatch):
    """Each accepted image keeps its file's bytes until its row is committed. With commits blocked (the
    database locked by another process) and big files arriving, the queue fills: memory must stay within
    the in-flight byte budget instead of max_queue x file size."""
    watch, db, port = tmp_path / "in", tmp_path / "r.sqlite", free_port()
    watch.mkdir()
    monkeypatch.setenv("DEFECT_DB_BUSY_TIMEOUT_S", "0.3")
    monkeypatch.setenv("DEFECT_MAX_INFLIGHT_MB", "256")
    d = served("--model", str(tiny_model), "--db", str(db), "--watch", str(watch), "--http", f"127.0.0.1:{port}",
               "--poll-interval", "0.05", "--max-queue", "32")
    d.wait_http()
    status = Path(f"/proc/{d.proc.pid}/status")

    def vm(field: str) -> float:
        return next(int(x.split()[1]) for x in status.read_text().splitlines() if x.startswith(field)) / 1024

    base = vm("VmRSS")
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db), "exclusive", "6"], stdout=subprocess.PIPE,
                              text=True)
    assert locker.stdout.readline().strip() == "locked"
    blob = os.urandom(24 * 1024 * 1024)
    inputs = {}
    for i in range(32):  # 768 MB of (undecodable) files, as many as the queue accepts, while nothing commits
        name = f"big{i:02d}.bin"
        inputs[name] = blob[:-1] + bytes([i])
        drop(watch, name, inputs[name])
    time.sleep(2.0)
    peak_locked = vm("VmHWM")
    locker.wait()
    deadline = time.monotonic() + 60
    while count_rows(db) < len(inputs) and time.monotonic() < deadline:
        time.sleep(0.1)
    peak = vm("VmHWM")
    assert d.terminate() == 0, d.log()
    assert_exactly_once(watch, db, inputs, finished=True)
    budget_mb = 256  # DEFECT_MAX_INFLIGHT_MB above; without a budget the queue held 32 x 24 MB
    assert peak_locked - base < budget_mb + 150 and peak - base < budget_mb + 150, (base, peak_locked, peak)


# -- a model file rewritten in place -----------------------------------------------------------------------


def test_model_file_rewritten_in_place_is_refused_until_it_is_whole(tmp_path, served):  # noqa: F811
    """A careless deploy copies the new model over the served one in place, slowly: the daemon sees a half
    file that stays unchanged for a while, refuses it (sha256), keeps serving the old model, and swaps
    once the copy is complete. No image is scored by a half model; none is lost."""
    watch, db, port = tmp_path / "in", tmp_path / "r.sqlite", free_port()
    watch.mkdir()
    served_path = make_tiny_model(tmp_path / "serve")
    save_metadata(load_metadata(served_path).model_copy(update={"version": "v1"}), served_path.with_suffix(".json"))
    new = make_tiny_model(tmp_path / "next", bias=3.0)
    new_meta = load_metadata(new).model_copy(update={"version": "v2"})
    d = served("--model", str(served_path), "--db", str(db), "--watch", str(watch), "--http", f"127.0.0.1:{port}",
               "--model-poll-interval", "0.1", "--poll-interval", "0.05")
    assert d.wait_http()["model_version"] == "v1"
    sent: list[str] = []
    stop = threading.Event()

    def feed() -> None:
        i = 0
        while not stop.is_set():
            drop(watch, f"f{i:04d}.png", png(120, seed=i))
            sent.append(f"f{i:04d}.png")
            i += 1
            time.sleep(0.01)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        blob = new.read_bytes()
        save_metadata(new_meta, served_path.with_suffix(".json"))  # sidecar first, then the model, in place
        with open(served_path, "r+b") as f:
            f.truncate(0)
            f.write(blob[: len(blob) // 2])
            f.flush()
            time.sleep(1.0)  # ten polls with a half-written file
            f.write(blob[len(blob) // 2:])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and httpx.get(f"{d.url}/health").json()["model_version"] != "v2":
            time.sleep(0.05)
        health = httpx.get(f"{d.url}/health").json()
        assert health["model_version"] == "v2", d.log()
        time.sleep(0.3)
    finally:
        stop.set()
        feeder.join()
    deadline = time.monotonic() + 20
    while count_rows(db) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    text = httpx.get(f"{d.url}/metrics").text
    assert d.terminate() == 0
    assert metric(text, "defect_model_refusals_total", '{reason="integrity"}') >= 1
    got = rows(db)
    assert sorted(r.source for r in got) == sorted(f"folder:{n}" for n in sent)
    assert all(r.ok and r.model_version in ("v1", "v2") for r in got)
    versions = [r.model_version for r in sorted(got, key=lambda r: r.id)]
    assert "v2" in versions and versions == sorted(versions)  # v1 until the swap, v2 after


# -- the retrain flow killed during training, export and promotion ------------------------------------------


def _line_snapshot(reg: Path, line: str) -> dict:
    ldir = reg / line
    return {"champion": (ldir / "CHAMPION").read_bytes(), "history": (ldir / "history.jsonl").read_bytes(),
            "versions": sorted(p.name for p in ldir.iterdir() if p.is_dir() and not p.name.startswith("."))}


def _assert_registry_consistent(reg: Path, line: str) -> None:
    r = Registry(reg)
    for v in r.list_versions(line):
        r.verify(line, v.version)  # every registered file still matches its recorded sha256
    model = r.load_champion(line)  # and the champion loads, checksum-verified
    assert model.metadata.classes == ["good", "spot"]
    with line_lock(reg, line, timeout=0):  # a killed holder's lock is gone with it
        pass


@pytest.mark.hardening  # five real flow runs (torch, Prefect): ~3-4 min on 2 cores, so CI runs it after the suite
def test_retrain_killed_in_training_export_and_promotion_leaves_a_whole_champion(prefect_server, tmp_path):
    """SIGKILL of the real flow at each stage. Before the CHAMPION rename: the champion is unchanged (bytes),
    history unchanged, no new version visible unless it was fully registered. After the rename but before
    the history line: the new champion is whole and verified. Always: every version verifies, the champion
    loads, the line lock is free, and the next run succeeds and leaves no scratch behind."""
    from pipeline.synth import generate_dataset

    line = "line1"
    data = tmp_path / "data"
    generate_dataset(data, n=16, size=64, good_multiplier=2, seed=3, classes=("good", "spot"))
    reg = tmp_path / "models"
    r = Registry(reg)
    first = r.register(line, make_tiny_model(tmp_path / "tiny", classes=("good", "spot")).parent)
    r.promote(line, first.version, reason="initial")
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
    rnd = random.Random(7)

    def run(stage: str) -> tuple[subprocess.Popen, Path, Path]:
        marker, log = tmp_path / f"marker-{stage}", tmp_path / f"flow-{stage}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "tests.fault_flow_runner", line, str(data), str(reg)],
                                    cwd=REPO, env={**env, "FAULT_STAGE": stage, "FAULT_MARKER": str(marker)},
                                    stdout=out, stderr=subprocess.STDOUT)
        return proc, marker, log

    def kill_at(stage: str) -> None:
        proc, marker, log = run(stage)
        deadline = time.monotonic() + 240
        while not (marker.exists() and stage in marker.read_text().split()):
            assert proc.poll() is None, f"flow ended before reaching {stage}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"flow never reached {stage}"
            time.sleep(0.02)
        if stage in ("training", "export"):
            time.sleep(rnd.uniform(0.05, 0.4))  # somewhere inside the real function
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert f"{stage}-done" not in marker.read_text().split(), f"{stage} finished before the kill"

    for stage in ("training", "export", "champion-switch"):
        before = _line_snapshot(reg, line)
        kill_at(stage)
        after = _line_snapshot(reg, line)
        assert after["champion"] == before["champion"] and after["history"] == before["history"], stage
        if stage == "champion-switch":  # registered before the gate, so the new version exists, unpromoted
            assert len(after["versions"]) == len(before["versions"]) + 1
        else:
            assert after["versions"] == before["versions"], stage
        _assert_registry_consistent(reg, line)
        assert read_champion(reg, line) == first.version

    before = _line_snapshot(reg, line)
    kill_at("history")  # CHAMPION already replaced: the new champion must be whole and verified
    after = _line_snapshot(reg, line)
    new = read_champion(reg, line)
    assert new != first.version and new in after["versions"] and after["history"] == before["history"]
    _assert_registry_consistent(reg, line)

    proc, marker, log = run("none")
    assert proc.wait(300) == 0, log.read_text()[-3000:]
    result = json.loads(log.read_text().strip().splitlines()[-1])
    assert result["promoted"] and result["champion_before"] == new
    assert read_champion(reg, line) == result["version"]
    _assert_registry_consistent(reg, line)
    history = Registry(reg).history(line)
    assert history[-1].version == result["version"] and history[-1].previous == new
    stray = sorted(p.name for p in (reg / line).iterdir() if p.name.startswith((".run-", ".tmp-", ".CHAMPION.tmp")))
    assert stray == [], f"killed runs left scratch behind: {stray}"
