"""Drift monitoring inside the daemon (DriftObserver, drift_events, gauges, the Prefect event) and the
recent-image sample. A tiny torch-free model (embedding = channel means) with a fitted drift reference:
dark random textures are in-domain, brighter ones are a domain shift."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from pipeline.drift import DriftStatus, NoDriftReferenceError, fit_reference, image_statistics
from pipeline.metadata import load_metadata, save_metadata, sha256_file
from pipeline.runtime import OnnxModel
from pipeline.serve.drift import (
    DRIFT_EVENT,
    IMAGE_STATS_KEY,
    DriftObserver,
    EventNotSent,
    EventSender,
    build_drift_event,
)
from pipeline.serve.metrics import ServeMetrics
from pipeline.serve.observers import BatchResult, ImageResult
from pipeline.serve.recent import RecentSample
from pipeline.serve.store import ResultStore, read_drift_events
from tests.test_serve_daemon import drop, free_port, metric, served  # noqa: F401  (served is a fixture)
from tests.tiny_model import make_tiny_model

LINE = "line-a"
SHIFT = 40.0  # grey levels added to the in-domain textures: a new lamp


def texture(rng: np.random.Generator, shift: float = 0.0, size: int = 48) -> np.ndarray:
    """A dark-ish random RGB texture (in-domain); ``shift`` brightens it."""
    base = rng.uniform(40, 80) + shift + rng.normal(0, 4, 3)
    noise = cv2.GaussianBlur(rng.normal(0, 25, (size, size, 3)).astype(np.float32), (0, 0), 1.0)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


class Stream:
    """Per-image (embedding, statistics, prediction) of generated images, scored by the real tiny model."""

    def __init__(self, model: OnnxModel, n: int, shift: float = 0.0, seed: int = 0):
        rng = np.random.default_rng(seed)
        images = [texture(rng, shift) for _ in range(n)]
        probs, self.emb = model.run(model.preprocess(images))
        self.preds = model.decide(probs)
        self.stats = [image_statistics(im) for im in images]
        self.probs = probs

    def batches(self, version: str = "v1", sha: str = "a" * 64, size: int = 16,
                with_error: bool = True) -> list[BatchResult]:
        """BatchResults as the daemon publishes them, each with one undecodable image (an error row)."""
        out = []
        for i in range(0, len(self.preds), size):
            items = [ImageResult(source=f"img{k}", sha256=None, stats=None, image=None, embedding=self.emb[k],
                                 prediction=self.preds[k]) for k in range(i, min(i + size, len(self.preds)))]
            stats: list = list(self.stats[i:i + size])
            if with_error:
                items.append(ImageResult(source="bad", sha256=None, stats=None, image=None, embedding=None,
                                         prediction=None, error_kind="undecodable"))
                stats.append(None)
            out.append(BatchResult(model_version=version, model_sha256=sha, classes=("good", "defect"),
                                   items=tuple(items), inference_ms=1.0, extra={IMAGE_STATS_KEY: tuple(stats)}))
        return out


@pytest.fixture(scope="module")
def drift_model(tmp_path_factory) -> tuple[Path, object]:
    """A tiny model whose model.json names a drift reference fitted on 400 in-domain images at a strict
    budget (0.5 false alarms per 10k images); the ONNX bytes (and so its sha256) are unchanged."""
    path = make_tiny_model(tmp_path_factory.mktemp("drift") / "m")
    model = OnnxModel(path)
    s = Stream(model, 400, seed=100)
    ref = fit_reference(s.emb, np.asarray(s.stats), s.probs, false_alarms_per_10k=0.5,
                        classes=["good", "defect"], seed=0)
    ref.save(path.parent / "drift_reference.npz")
    meta = load_metadata(path)
    save_metadata(meta.model_copy(update={"drift_reference": "drift_reference.npz"}), path.with_suffix(".json"))
    assert load_metadata(path).onnx_sha256 == sha256_file(path)
    return path, ref


@pytest.fixture(scope="module")
def tiny(drift_model) -> OnnxModel:
    return OnnxModel(drift_model[0])


class Clock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def feed(obs: DriftObserver, batches: list[BatchResult]) -> None:
    for b in batches:
        obs(b)


# -------------------------------------------------------------------------------------------------------------


def test_one_event_per_episode_min_interval_and_contract(drift_model, tiny, tmp_path):
    _, ref = drift_model
    store, metrics, clock, events = ResultStore(tmp_path / "r.sqlite"), ServeMetrics(), Clock(0.0), []

    def emitter(event: dict) -> str:
        events.append(event)
        return event["id"]

    def observer() -> DriftObserver:
        return DriftObserver(line=LINE, registry="/srv/models", recent_dir="/srv/recent", metrics=metrics,
                             store=store, reference_loader=lambda b: ref, emitter=emitter,
                             min_event_interval_s=1800.0, clock=clock)

    obs = observer()
    good = [Stream(tiny, 96, seed=s).batches() for s in range(1, 5)]
    shifted = [Stream(tiny, 96, SHIFT, seed=s).batches() for s in range(11, 15)]
    feed(obs, Stream(tiny, 64, seed=9).batches())
    feed(obs, shifted[0])  # episode 1: sent
    feed(obs, good[0])  # ...ends
    clock.t = 100.0
    feed(obs, shifted[1])  # episode 2, 100 s later: suppressed
    feed(obs, good[1])
    clock.t = 2000.0
    feed(obs, shifted[2])  # episode 3, past the minimum interval: sent
    obs.close()
    assert obs.state()["n_seen"] == 64 + 5 * 96  # error rows are not part of the stream

    rows = store.drift_events(limit=1000)
    started = [r for r in rows if r.kind == "alarm_started"]
    assert [r.prefect_event for r in started] == ["emit", "suppressed", "emit"]
    assert [r.episode for r in started] == [1, 2, 3]
    assert len([r for r in rows if r.kind == "alarm_ended"]) == 2
    assert all(r.alarm and r.in_episode and r.score > r.threshold and r.model_version == "v1" for r in started)
    assert [e["id"] for e in events] == [r.event_id for r in started if r.prefect_event == "emit"]

    ev = events[0]
    assert ev["event"] == DRIFT_EVENT == "defect.drift.detected"
    assert ev["resource"] == {"prefect.resource.id": "defect.line.line-a", "prefect.resource.name": LINE,
                              "line": LINE, "defect.line": LINE, "defect.registry": "/srv/models",
                              "defect.model_version": "v1", "registry": "/srv/models", "recent_dir": "/srv/recent"}
    p = ev["payload"]
    assert {k: p[k] for k in ("line", "registry", "recent_dir", "detector", "model_version", "model_sha256")} == {
        "line": LINE, "registry": "/srv/models", "recent_dir": "/srv/recent", "detector": "combined",
        "model_version": "v1", "model_sha256": "a" * 64}
    assert p["score"] > p["threshold"] == pytest.approx(started[0].threshold) and p["n_seen"] == started[0].n_seen
    assert "combined score" in p["summary"]

    text = metrics.render().decode()
    assert metric(text, "defect_drift_episodes_total", '{detector="combined"}') == 3
    assert metric(text, "defect_drift_alarm", '{detector="combined"}') == 1
    assert metric(text, "defect_drift_prefect_events_total", '{outcome="sent"}') == 2
    assert metric(text, "defect_drift_prefect_events_total", '{outcome="suppressed"}') == 1
    assert metric(text, "defect_drift_threshold", '{detector="combined"}') == pytest.approx(started[0].threshold)

    # A restarted daemon remembers the last event (drift_events), so a restart cannot bypass the interval.
    clock.t = 2100.0
    again = observer()
    feed(again, Stream(tiny, 64, seed=21).batches() + shifted[3])
    again.close()
    assert [r.prefect_event for r in store.drift_events(limit=1000) if r.kind == "alarm_started"][-1] == "suppressed"
    assert len(events) == 2
    store.close()


def test_event_matches_the_automation_contract():
    """Everything ``flows.deployments.drift_event`` puts in an event (what the automation reads) is in ours."""
    deployments = pytest.importorskip("flows.deployments")
    st = DriftStatus(n_seen=96, detector="combined", score=2.0, threshold=1.0, alarm=True, in_episode=True,
                     alarm_started=True, alarm_ended=False, episodes=1, scores={"combined": 2.0, "cusum": float("inf")})
    ours = build_drift_event(LINE, st, model_version="v1", model_sha256="b" * 64, registry="/r", recent_dir="/x")
    theirs = deployments.drift_event(LINE, registry="/r", recent_dir="/x")
    assert ours["event"] == theirs["event"]
    assert theirs["resource"].items() <= ours["resource"].items()
    assert theirs["payload"].items() <= ours["payload"].items()
    assert ours["payload"]["scores"]["cusum"] is None  # JSON-safe: no infinities


def test_long_in_domain_stream_never_alarms_and_is_cheap(drift_model, tiny, tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    events: list = []
    obs = DriftObserver(line=LINE, store=store, reference_loader=lambda b: drift_model[1], emitter=events.append,
                        score_log_interval_s=0.0)
    feed(obs, Stream(tiny, 4000, seed=7).batches())
    obs.close()
    rows = store.drift_events(limit=10_000)
    assert obs.state()["n_seen"] == 4000 and obs.state()["episodes"] == 0 and not events
    assert {r.kind for r in rows} == {"score"} and len(rows) == (4000 - 32) // 8 + 1  # every evaluation logged
    assert max(r.score for r in rows) < rows[0].threshold
    assert obs.state()["monitor_ms_per_batch"] < 25.0  # 16 images; measured ~1 ms
    store.close()


def test_hot_swap_resets_the_monitor_and_models_without_reference_are_unmonitored(drift_model, tiny, caplog):
    ref = drift_model[1]

    def loader(batch: BatchResult):
        if batch.model_version == "v3":
            raise NoDriftReferenceError("model v3 has no drift reference")
        return ref

    metrics = ServeMetrics()
    obs = DriftObserver(line=LINE, metrics=metrics, reference_loader=loader)
    feed(obs, Stream(tiny, 32, seed=5).batches() + Stream(tiny, 64, SHIFT, seed=6).batches())
    assert obs.state()["in_episode"] and obs.state()["episodes"] == 1
    feed(obs, Stream(tiny, 16, seed=8).batches(version="v2", sha="c" * 64))
    st = obs.state()
    assert st["model_version"] == "v2" and st["n_seen"] == 16 and st["episodes"] == 0 and not st["in_episode"]
    assert metric(metrics.render().decode(), "defect_drift_alarm", '{detector="combined"}') == 0
    with caplog.at_level(logging.WARNING, logger="pipeline.serve.drift"):
        feed(obs, Stream(tiny, 48, SHIFT, seed=9).batches(version="v3", sha="d" * 64))
    st = obs.state()
    assert not st["active"] and "no drift reference" in st["reason"] and not obs.wants_image_stats
    assert len([r for r in caplog.records if "drift monitoring off" in r.getMessage()]) == 1
    assert "defect_drift_score{" not in metrics.render().decode()  # no stale values from the old model


def test_event_sender_never_raises_and_logs_a_missing_prefect_once(caplog):
    calls: list = []

    def no_prefect(event: dict) -> str:
        calls.append(event)
        raise ImportError("No module named 'prefect'")

    metrics = ServeMetrics()
    sender = EventSender(no_prefect, metrics)
    with caplog.at_level(logging.ERROR, logger="pipeline.serve.drift"):
        assert sender.submit({"id": "1"}) and sender.submit({"id": "2"})
        sender.close()
    assert len(calls) == 2 and sender.failed == 2 and sender.sent == 0  # no retries for a missing package
    assert len([r for r in caplog.records if "prefect is not installed" in r.getMessage()]) == 1
    assert metric(metrics.render().decode(), "defect_drift_prefect_events_total", '{outcome="failed"}') == 2

    attempts: list = []

    def flaky(event: dict) -> str:  # the API is down for a restart, then back
        attempts.append(event["id"])
        if event["id"] == "down" and len(attempts) < 3:
            raise EventNotSent("Prefect API unreachable", retry=True)
        if event["id"] == "misconfigured":
            raise EventNotSent("PREFECT_API_URL is not set")
        return "ok-" + event["id"]

    sender = EventSender(flaky, retry_delays_s=(0.01, 0.01, 0.01))
    sender.submit({"id": "down"})
    sender.submit({"id": "misconfigured"})
    deadline = time.monotonic() + 10
    while sender.sent + sender.failed < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    sender.close()
    assert attempts == ["down", "down", "down", "misconfigured"] and sender.sent == 1 and sender.failed == 1


def _encoded(value: int, ext: str, seed: int) -> bytes:
    img = np.full((20, 30, 3), value, np.uint8)
    img[0, 0] = seed % 256
    return cv2.imencode(ext, img)[1].tobytes()


def test_recent_sample_keeps_one_in_n_bounded_by_count_bytes_and_age(tmp_path, monkeypatch):
    folder, clock = tmp_path / "recent", Clock(1_700_000_000.0)
    folder.mkdir()
    (folder / ".recent-20000101T000000000000-000000-x.png.tmp").write_bytes(b"half")  # a crash's leftover
    (folder / "operator-note.png").write_bytes(b"not ours")
    sample = RecentSample(folder, every=3, max_images=5, max_age_s=3600.0, max_bytes=1 << 20, clock=clock,
                          max_pending=64)  # this test offers faster than any writer: queue them all
    assert not (folder / ".recent-20000101T000000000000-000000-x.png.tmp").exists()
    kinds = [".png", ".jpg", ".bmp", ".tif"]
    for i in range(30):
        clock.t += 1.0
        if i % 5 == 4:
            sample.offer("camera", f"{i:012x}{0:052x}", frame=np.full((10, 12, 3), i, np.uint8))
        else:
            sample.offer("folder", f"{i:012x}{0:052x}", data=_encoded(i * 8, kinds[i % 4], i))
    sample.close()
    files = sample.files()
    assert sample.saved == 10 and len(files) == 5 and sorted(os.listdir(folder)) == sorted(
        [f.name for f in files] + ["operator-note.png"])  # no temp files, the operator's file untouched
    assert [f.name for f in files] == sorted(f.name for f in files)
    kept = [int(f.name.split("-")[3][:12], 16) for f in files]
    assert kept == [15, 18, 21, 24, 27]  # 1 in 3 (images 0, 3, 6, ...), the newest five
    for f in files:
        img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        assert img is not None and img.shape[:2] in ((20, 30), (10, 12))
    assert {f.suffix for f in files} <= {".png", ".jpg", ".bmp", ".tif"}

    # Byte budget: a new sample over a smaller budget drops the oldest until it fits.
    budget = sum(f.stat().st_size for f in files[-2:])
    small = RecentSample(folder, every=1, max_images=100, max_age_s=3600.0, max_bytes=budget, clock=clock)
    assert [f.name for f in small.files()] == [f.name for f in files[-2:]]
    assert not (folder / files[0].name).exists()

    # Age: everything older than max_age goes at the next prune (the writer also prunes when idle).
    clock.t += 3601.0
    assert small.prune() == 2 and small.files() == [] and os.listdir(folder) == ["operator-note.png"]

    # A failed write (disk full, say) leaves neither a temp file nor a partial image, and is counted.
    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pipeline.serve.recent.os.replace", broken_replace)
    small.offer("http", "f" * 64, data=_encoded(100, ".png", 1))
    small.close()
    assert small.dropped == 1 and small.saved == 0 and os.listdir(folder) == ["operator-note.png"]


def test_daemon_alarms_once_on_a_brightness_shift_and_samples_recent_images(drift_model, tmp_path, served,
                                                                          monkeypatch):
    """The real daemon: hot folder -> drift_events row, gauges, /health, one episode, recent sample; the
    Prefect event is attempted (no PREFECT_API_URL here) and its failure does not disturb serving."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    watch, db, recent, port = tmp_path / "in", tmp_path / "r.sqlite", tmp_path / "recent", free_port()
    watch.mkdir()
    d = served("--model", str(drift_model[0]), "--db", str(db), "--watch", str(watch), "--http",
               f"127.0.0.1:{port}", "--line", LINE, "--recent-dir", str(recent), "--recent-every", "4",
               "--emit-events", "--poll-interval", "0.05")
    health = d.wait_http()
    assert health["drift"]["active"] and health["drift"]["events"]["enabled"]

    def wait_seen(n: int) -> dict:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            h = httpx.get(f"{d.url}/health", timeout=5).json()
            if h["drift"].get("n_seen") == n:
                return h
            time.sleep(0.1)
        raise AssertionError(f"drift monitor did not reach {n} images: {h['drift']}\n{d.log()}")

    rng = np.random.default_rng(42)
    for i in range(64):
        drop(watch, f"a{i:03d}.png", cv2.imencode(".png", texture(rng))[1].tobytes())
    h = wait_seen(64)
    assert h["drift"]["episodes"] == 0 and not h["drift"]["in_episode"]
    for i in range(64):
        drop(watch, f"b{i:03d}.png", cv2.imencode(".png", texture(rng, SHIFT))[1].tobytes())
    h = wait_seen(128)
    assert h["drift"]["episodes"] == 1 and h["drift"]["in_episode"]

    rows = read_drift_events(db, limit=1000)
    started = [r for r in rows if r.kind == "alarm_started"]
    assert len(started) == 1 and started[0].prefect_event == "emit" and started[0].alarm
    delay = started[0].n_seen - 64
    assert 0 < delay <= 32, delay  # within one window of the shift
    assert not [r for r in rows if r.n_seen <= 64 and r.alarm]
    text = httpx.get(f"{d.url}/metrics", timeout=5).text
    assert metric(text, "defect_drift_alarm", '{detector="combined"}') == 1
    assert metric(text, "defect_drift_episodes_total", '{detector="combined"}') == 1
    assert metric(text, "defect_drift_images_total") == 128
    assert metric(text, "defect_drift_score", '{detector="combined"}') > metric(
        text, "defect_drift_threshold", '{detector="combined"}')

    deadline = time.monotonic() + 60
    while httpx.get(f"{d.url}/health", timeout=5).json()["drift"]["events"]["failed"] < 1:
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.2)
    assert "PREFECT_API_URL is not set" in d.log()
    assert httpx.get(f"{d.url}/health", timeout=5).json()["status"] == "ok"

    deadline = time.monotonic() + 30
    while (r := httpx.get(f"{d.url}/health", timeout=5).json()["recent"])["saved"] + r["dropped"] < 128 // 4:
        assert time.monotonic() < deadline, r
        time.sleep(0.1)
    files = sorted(recent.iterdir())  # 1 in 4 scored images; the writer may skip some when it lags
    assert len(files) == r["saved"] == r["images"] >= 24, r
    assert all(f.suffix == ".png" and f.name.startswith("recent-") for f in files)
    assert all(cv2.imread(str(f)) is not None for f in files)
    assert d.terminate() == 0
    print(f"\nimages from shift to alarm: {delay}; recent sample {r}")


@pytest.mark.slow
def test_real_prefect_server_receives_the_drift_event(drift_model, tiny, prefect_server):
    """Through the real emitter to the session's temporary Prefect server (``prefect_server`` in conftest).

    Slow only because running this file alone starts that server (20-45 s); with the flow tests it
    shares theirs and adds about two seconds. A line name of its own keeps it apart from their events.
    """
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventIDFilter

    from pipeline.serve.drift import prefect_emitter

    line = "serve-drift-test"
    obs = DriftObserver(line=line, registry="/srv/models", reference_loader=lambda b: drift_model[1],
                        emitter=prefect_emitter())
    feed(obs, Stream(tiny, 32, seed=3).batches() + Stream(tiny, 64, SHIFT, seed=4).batches())
    obs.close(timeout=60)
    assert obs.sender is not None and obs.sender.sent == 1, obs.sender.last
    wanted = EventFilter(id=EventIDFilter(id=[UUID(obs.last_event["id"])]))
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while not (page := client.read_events(wanted, limit=10)).events and time.monotonic() < deadline:
            time.sleep(0.5)
    assert len(page.events) == 1
    ev = page.events[0]
    assert ev.event == DRIFT_EVENT and ev.resource.id == f"defect.line.{line}"
    assert ev.resource["registry"] == "/srv/models" and ev.resource["defect.model_version"] == "v1"
    assert ev.payload["detector"] == "combined" and ev.payload["line"] == line and ev.payload["score"] > 0
