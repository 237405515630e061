"""In-process checks of the daemon's parts: settings, results store, folder rules, camera, models, observers."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.metadata import load_metadata, save_metadata
from pipeline.runtime import Prediction, RuntimeOptions
from pipeline.serve.camera import CameraSource, classify, redact
from pipeline.serve.config import ServeSettings, load_settings, parse_host_port
from pipeline.serve.folder import HotFolder, is_ignored, unique_destination
from pipeline.serve.jobs import Job, prepare
from pipeline.serve.metrics import ServeMetrics
from pipeline.serve.models import ModelHolder, ModelLocator, ModelRefused, load_verified
from pipeline.serve.observers import BatchResult, ImageResult, ObserverDispatcher
from pipeline.serve.store import ResultRow, ResultStore, parse_since, utc_iso
from tests.tiny_model import make_tiny_model

# -- settings -------------------------------------------------------------------------------------------


def test_settings_precedence_flags_over_env_over_yaml(tmp_path, monkeypatch):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("model: m.onnx\ndb: r.sqlite\nwatch: in\nmax_batch: 4\nworkers: 3\nmax_wait_ms: 7\n")
    monkeypatch.setenv("DEFECT_MAX_BATCH", "8")
    monkeypatch.setenv("DEFECT_WORKERS", "5")
    s = load_settings(cfg, workers=6, http=None)
    assert isinstance(s, ServeSettings)
    assert (s.max_batch, s.workers, s.max_wait_ms) == (8, 6, 7.0)  # env beats file, flag beats env
    assert s.http is None and s.watch == Path("in")


def test_settings_refuse_bad_combinations(tmp_path):
    with pytest.raises(ValidationError, match="no image source"):
        ServeSettings(model="m.onnx", db="r.sqlite")
    with pytest.raises(ValidationError, match="exit_when_done"):
        ServeSettings(model="m.onnx", db="r.sqlite", http="127.0.0.1:1", exit_when_done=True)
    with pytest.raises(ValidationError):
        ServeSettings(model="m.onnx", db="r.sqlite", watch="in", max_batch=0)
    with pytest.raises(ValidationError, match="extra"):
        ServeSettings(model="m.onnx", db="r.sqlite", watch="in", max_btch=3)
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.yaml", model="m.onnx", db="r.sqlite", watch="in")


def test_http_address_parsing_defaults_to_loopback():
    assert parse_host_port("9000") == ("127.0.0.1", 9000)
    assert parse_host_port("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_host_port("[::1]:81") == ("::1", 81)
    with pytest.raises(ValueError):
        parse_host_port("host:notaport")


# -- results store ------------------------------------------------------------------------------------------


def _row(source: str, key: str | None, decision: str = "good", ts: str | None = None) -> ResultRow:
    return ResultRow(ts=ts or utc_iso(), source=source, decision=decision, idem_key=key, sha256="ab" * 32,
                     model_version="v1", label="good", probabilities={"good": 0.9, "defect": 0.1},
                     defect_score=0.1, latency_ms=1.0)


def test_store_wal_full_and_idempotency_key_keeps_first_row(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    assert store._write.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._write.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    first = store.insert_many([_row("folder:a.png", "folder:a.png|x"), _row("http", None), _row("http", None)])
    assert [r.id for r in first] == [1, 2, 3]
    again = _row("folder:a.png", "folder:a.png|x", decision="defect")
    got = store.insert_many([again, _row("folder:b.png", "folder:b.png|y")])
    assert got[0] is not again and got[0].id == 1 and got[0].decision == "good"  # the earlier row wins
    assert got[1].id == 4
    assert store.count() == 4
    assert store.get_by_key("folder:a.png|x").id == 1 and store.get_by_key("nope") is None
    store.close()


def test_store_query_since_and_latest(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    store.insert_many([_row(f"http:{i}", None, ts=f"2025-01-0{i}T00:00:00.000+00:00") for i in range(1, 6)])
    assert [r.source for r in store.query(limit=2)] == ["http:4", "http:5"]  # latest, in time order
    since = [r.source for r in store.query(since="2025-01-03", limit=10)]
    assert since == ["http:3", "http:4", "http:5"]
    assert [r.source for r in store.query(since="2025-01-02T23:00:00-02:00", limit=10)] == ["http:4", "http:5"]
    with pytest.raises(ValueError):
        parse_since("yesterday")
    d = store.query(limit=1)[0].as_dict()
    assert {"source", "model_version", "class", "defect_score", "decision", "error"} <= set(d)
    store.close()


# -- hot folder rules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,ignored", [(".x.png", True), ("x.png.tmp", True), ("x.PART", True),
                                          ("x.png", False), ("tmp.png", False)])
def test_temp_names_ignored(name, ignored):
    assert is_ignored(name) is ignored


def test_unique_destination_never_overwrites(tmp_path):
    d = tmp_path / "a.png"
    assert unique_destination(d, "1234567890") == d
    d.write_bytes(b"1")
    second = unique_destination(d, "1234567890")
    assert second.name == "a.12345678.png"
    second.write_bytes(b"2")
    assert unique_destination(d, "1234567890").name == "a.12345678.1.png"


def test_folder_needs_two_equal_scans_and_skips_temp_files(tmp_path):
    submitted: list[Job] = []
    folder = HotFolder(tmp_path, lambda job, timeout: submitted.append(job) or True, ServeMetrics())
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / ".b.png").write_bytes(b"x")
    (tmp_path / "c.png.part").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.png").write_bytes(b"x")
    (tmp_path / "done" / "old.png").write_bytes(b"x")
    folder.scan()
    folder._submit_ready()
    assert submitted == []  # seen once: not yet stable
    with open(tmp_path / "a.png", "ab") as f:
        f.write(b"more")  # still growing
    folder.scan()
    folder._submit_ready()
    assert [j.source for j in submitted] == ["folder:sub/d.png"]
    folder.scan()
    folder._submit_ready()
    assert sorted(j.source for j in submitted) == ["folder:a.png", "folder:sub/d.png"]
    folder.scan()
    folder._submit_ready()
    assert len(submitted) == 2  # in flight: not submitted again


# -- decode worker ------------------------------------------------------------------------------------------


def test_prepare_marks_bad_input_without_raising(tiny_model, tmp_path):
    spec = load_metadata(tiny_model).preprocess
    cases = {"empty": b"", "undecodable": b"\x89PNG\r\n\x1a\n truncated"}
    for kind, data in cases.items():
        job = prepare(Job(source="http", kind="http", data=data), spec, 10_000, 1 << 20, None)
        assert job.error_kind == kind and not job.ready
    import cv2

    ok, png = cv2.imencode(".png", np.zeros((200, 200, 3), np.uint8))
    job = prepare(Job(source="http", kind="http", data=png.tobytes()), spec, 10_000, 1 << 20, None)
    assert job.error_kind == "too_large"
    ok, png16 = cv2.imencode(".png", np.full((20, 30, 4), 60000, np.uint16))  # 16-bit RGBA is fine
    job = prepare(Job(source="http", kind="http", data=png16.tobytes()), spec, 10_000, 1 << 20, None)
    assert job.ready and job.image.shape == (32, 32, 3) and job.stats.width == 30
    gone = prepare(Job(source="folder:x", kind="folder", path=tmp_path / "missing.png"), spec, 10_000, 1 << 20, None)
    assert gone.skipped == "vanished" and gone.error_kind is None


def test_prepare_computes_drift_statistics_from_the_one_decode(tiny_model, monkeypatch):
    """Drift statistics are of the full decoded image, and cost no second decode."""
    import cv2

    import pipeline.serve.jobs as jobs
    from pipeline.data.decode import decode_bytes
    from pipeline.drift.stats import image_statistics

    spec = load_metadata(tiny_model).preprocess
    img = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    data = cv2.imencode(".png", img)[1].tobytes()
    calls = []
    monkeypatch.setattr(jobs, "decode_bytes", lambda *a, **k: calls.append(1) or decode_bytes(*a, **k))
    job = prepare(Job(source="http", kind="http", data=data), spec, 1 << 20, 1 << 20, None, drift_stats=True)
    assert job.ready and len(calls) == 1
    np.testing.assert_allclose(job.drift_stats, image_statistics(decode_bytes(data)))
    plain = prepare(Job(source="http", kind="http", data=data), spec, 1 << 20, 1 << 20, None)
    assert plain.ready and plain.drift_stats is None


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_prepare_grey_image_gives_what_the_rgb_path_gives(tiny_model, ext):
    """Grey files take the one-channel path in the daemon (decode, resize, statistics); the model input,
    the image statistics and the drift statistics must equal those of the training/RGB path."""
    import cv2

    from pipeline.data.decode import decode_bytes
    from pipeline.drift.stats import image_statistics
    from pipeline.preprocess import resize_image
    from pipeline.serve.jobs import image_stats

    spec = load_metadata(tiny_model).preprocess
    grey = cv2.GaussianBlur(np.random.default_rng(2).integers(0, 255, (257, 607), dtype=np.uint8), (5, 5), 0)
    data = cv2.imencode(ext, grey)[1].tobytes()
    job = prepare(Job(source="http", kind="http", data=data), spec, 1 << 20, 1 << 20, None, drift_stats=True)
    rgb = decode_bytes(data, spec=spec)
    assert job.ready and rgb.shape == (257, 607, 3)
    np.testing.assert_array_equal(job.image, resize_image(rgb, spec))
    np.testing.assert_array_equal(job.drift_stats, image_statistics(rgb))
    assert job.stats == image_stats(rgb)


def test_prepare_scaled_jpeg_decode_reports_the_files_own_size(tiny_model):
    import cv2

    spec = load_metadata(tiny_model).preprocess.model_copy(update={"jpeg_scaled_decode": True})
    img = np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    data = cv2.imencode(".jpg", img)[1].tobytes()
    job = prepare(Job(source="http", kind="http", data=data), spec, 1 << 20, 1 << 20, None, drift_stats=True)
    assert job.ready and job.image.shape == (32, 32, 3)
    assert (job.stats.width, job.stats.height) == (400, 300)  # decoded at 1/8, reported as the file is


# -- camera ---------------------------------------------------------------------------------------------------


def test_camera_source_classification_and_redaction(tmp_path):
    video = tmp_path / "v.avi"
    video.write_bytes(b"x")
    assert classify("0") == ("live", 0)
    assert classify("rtsp://cam/stream")[0] == "live"
    assert classify(str(video)) == ("file", str(video))
    with pytest.raises(FileNotFoundError):
        classify(str(tmp_path / "nope.avi"))
    assert redact("rtsp://admin:secret@10.0.0.5:554/s") == "rtsp://admin:***@10.0.0.5:554/s"
    assert redact("rtsp://10.0.0.5/s") == "rtsp://10.0.0.5/s"


class _FakeCapture:
    """A live stream that delivers ``frames`` frames, then drops."""

    def __init__(self, frames: int):
        self.left = frames

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return True

    def grab(self) -> bool:
        self.left -= 1
        return self.left >= 0

    def retrieve(self):
        return True, np.zeros((8, 8, 3), np.uint8)

    def get(self, prop):
        return 0.0

    def release(self) -> None:
        pass


class _Closed(_FakeCapture):
    def isOpened(self) -> bool:  # noqa: N802
        return False


def test_live_camera_reconnects_with_backoff_then_gives_up():
    opens: list[float] = []
    captures = [_FakeCapture(3), _Closed(0), _FakeCapture(2), _Closed(0), _Closed(0)]

    def open_capture(arg):
        opens.append(time.monotonic())
        return captures[len(opens) - 1] if len(opens) <= len(captures) else _Closed(0)

    jobs: list[Job] = []
    metrics = ServeMetrics()
    cam = CameraSource("0", fps=0, submit=lambda j, t: jobs.append(j) or True, metrics=metrics,
                       reconnect_min_s=0.02, reconnect_max_s=0.05, max_failures=3, open_capture=open_capture)
    cam.start()
    deadline = time.monotonic() + 5
    while not cam.finished and time.monotonic() < deadline:
        time.sleep(0.01)
    cam.stop()
    assert cam.state == "failed" and cam.finished
    assert [j.source for j in jobs] == [f"camera:0#{i}" for i in range(5)]  # numbering continues across drops
    gaps = np.diff(opens)
    assert gaps[1] >= 0.035 and gaps[2] <= 0.2  # doubled after a failed attempt, reset after good frames
    assert cam.reconnects >= 3 and metrics.camera_reconnects._value.get() == cam.reconnects


def test_live_camera_skips_frames_when_queue_full():
    cam = CameraSource("0", fps=0, submit=lambda j, t: False, metrics=ServeMetrics(), max_failures=1,
                       open_capture=lambda arg: _FakeCapture(4))
    cam._run_live()
    assert cam.frames_skipped == 4 and cam.frames_sampled == 0


# -- models and hot-swap ----------------------------------------------------------------------------------------


def _versioned(dir_: Path, version: str, bias: float = 0.0) -> Path:
    path = make_tiny_model(dir_, bias=bias)
    meta = load_metadata(path)
    save_metadata(meta.model_copy(update={"version": version}), path.with_suffix(".json"))
    return path


def test_load_verified_refuses_tampered_broken_and_unchecked(tmp_path):
    good = _versioned(tmp_path / "a", "v1")
    loaded = load_verified(good, RuntimeOptions(max_batch=16), True)
    assert loaded.version == "v1" and loaded.model.options.max_batch == 4  # CPU: small ORT calls (memory)
    assert load_verified(good, RuntimeOptions(max_batch=16), True, infer_batch=8).model.options.max_batch == 8
    # two inference streams share the in-flight images (same peak memory), unless told otherwise
    assert load_verified(good, RuntimeOptions(max_batch=16), True, streams=2).model.options.max_batch == 2
    assert load_verified(good, RuntimeOptions(max_batch=16), True, infer_batch=8, streams=2
                         ).model.options.max_batch == 8
    data = bytearray(good.read_bytes())
    data[-1] ^= 0xFF
    good.write_bytes(bytes(data))
    with pytest.raises(ModelRefused) as e:
        load_verified(good, RuntimeOptions(), True)
    assert e.value.reason == "integrity"
    broken = make_tiny_model(tmp_path / "b")
    broken.write_bytes(b"not onnx at all")
    meta = load_metadata(broken)
    from pipeline.metadata import sha256_file

    save_metadata(meta.model_copy(update={"onnx_sha256": sha256_file(broken)}), broken.with_suffix(".json"))
    with pytest.raises(ModelRefused) as e:
        load_verified(broken, RuntimeOptions(), True)
    assert e.value.reason == "load"
    nosum = make_tiny_model(tmp_path / "c")
    save_metadata(load_metadata(nosum).model_copy(update={"onnx_sha256": None}), nosum.with_suffix(".json"))
    with pytest.raises(ModelRefused, match="onnx_sha256"):
        load_verified(nosum, RuntimeOptions(), True)
    assert load_verified(nosum, RuntimeOptions(), False).version == load_verified(nosum, RuntimeOptions(),
                                                                                 False).sha256[:12]


def test_model_for_another_line_is_refused(tmp_path):
    path = _versioned(tmp_path / "m", "v1")
    save_metadata(load_metadata(path).model_copy(update={"line": "line2"}), path.with_suffix(".json"))
    assert load_verified(path, RuntimeOptions(), True, line="line2").version == "v1"
    with pytest.raises(ModelRefused) as e:
        load_verified(path, RuntimeOptions(), True, line="line1")
    assert e.value.reason == "line"


def test_smoke_test_refuses_wrong_class_count(tmp_path):
    path = make_tiny_model(tmp_path / "m", classes=("good", "a", "b"))
    meta = load_metadata(path)
    save_metadata(meta.model_copy(update={"classes": ["good", "a"]}), path.with_suffix(".json"))
    with pytest.raises(ModelRefused) as e:
        load_verified(path, RuntimeOptions(), True)
    assert e.value.reason == "smoke"


def test_holder_swaps_only_between_batches_and_refuses_tampering(tmp_path):
    path = _versioned(tmp_path / "serve", "v1")
    metrics = ServeMetrics()
    holder = ModelHolder(ModelLocator(path), RuntimeOptions(), metrics, poll_interval_s=60)
    v2 = _versioned(tmp_path / "new", "v2", bias=1.0)
    os.replace(v2.with_suffix(".json"), path.with_suffix(".json"))
    os.replace(v2, path)
    holder.poll()  # change seen: waits one poll to settle
    assert holder.take_pending().version == "v1"
    holder.poll()
    assert holder.current.version == "v1"  # verified and pending, not yet swapped
    assert holder.take_pending().version == "v2" and holder.swaps == 1
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    holder.poll()
    holder.poll()
    holder.poll()  # not retried while unchanged
    assert holder.take_pending().version == "v2"
    assert metrics.refusals.labels("integrity")._value.get() == 1
    assert holder.last_refusal["reason"] == "integrity"
    text = metrics.render().decode()
    assert 'defect_model_info{provider="CPUExecutionProvider",sha256="' in text and 'version="v2"' in text
    assert 'version="v1"' not in text


def test_reverting_before_the_swap_keeps_the_serving_model(tmp_path):
    from pipeline.registry import Registry

    root = tmp_path / "models"
    for v, bias in (("v1", 0.0), ("v2", 1.0)):
        Registry(root).register("l", make_tiny_model(tmp_path / f"run-{v}", bias=bias).parent, version=v)
    champion = root / "l" / "CHAMPION"
    champion.write_text("v1\n")
    holder = ModelHolder(ModelLocator(root, "l"), RuntimeOptions(), ServeMetrics(), poll_interval_s=60)
    champion.write_text("v2\n")
    holder.poll()
    holder.poll()  # v2 verified and pending
    champion.write_text("v1\n")  # promotion undone before any batch ran
    holder.poll()
    holder.poll()
    assert holder.take_pending().version == "v1" and holder.swaps == 0


def test_registry_locator_follows_champion(tmp_path):
    from pipeline.registry import model_dir

    root = tmp_path / "models"
    for v in ("v1", "v2"):
        _versioned(model_dir(root, "line1", v), v)
    loc = ModelLocator(root, "line1")
    with pytest.raises(ModelRefused, match="no champion"):
        loc.resolve()
    (root / "line1" / "CHAMPION").write_text("v1\n")
    path, fp1 = loc.resolve()
    assert path == model_dir(root, "line1", "v1") / "model.onnx"
    (root / "line1" / "CHAMPION").write_text("v2\n")
    assert loc.resolve()[1] != fp1


# -- observers ---------------------------------------------------------------------------------------------------


def test_observer_errors_are_counted_not_raised():
    metrics = ServeMetrics()
    seen: list[BatchResult] = []
    done = threading.Event()

    def bad(batch: BatchResult) -> None:
        raise RuntimeError("boom")

    def good(batch: BatchResult) -> None:
        seen.append(batch)
        done.set()

    disp = ObserverDispatcher([bad, good], metrics)
    disp.start()
    pred = Prediction("defect", {"good": 0.2, "defect": 0.8}, 0.8, "defect")
    item = ImageResult("http", "ab", None, None, np.ones(3, np.float32), pred)
    err = ImageResult("http", "cd", None, None, None, None, error_kind="undecodable")
    disp.publish(BatchResult("v1", "ab" * 32, ("good", "defect"), (item, err), 1.0))
    assert done.wait(5)
    disp.stop()
    assert metrics.observer_errors._value.get() == 1
    b = seen[0]
    assert len(b.scored) == 1 and b.embeddings().shape == (1, 3)
    np.testing.assert_allclose(b.probabilities(), [[0.2, 0.8]])


def test_example_config_loads_and_documents_the_defaults():
    path = Path(__file__).resolve().parents[1] / "deploy" / "serve.example.yaml"
    s = load_settings(path)
    defaults = ServeSettings(model="m", db="d", watch="w")
    examples = {"model", "line", "db", "watch", "http"}
    for name in ServeSettings.model_fields:
        if name not in examples:
            assert getattr(s, name) == getattr(defaults, name), name
    text = path.read_text()
    missing = [n for n in ServeSettings.model_fields if f"\n{n}:" not in text]
    assert not missing, f"serve.example.yaml does not document {missing}"


def test_batch_decoded_for_the_old_model_is_preprocessed_again_after_a_swap(tmp_path):
    """A swap that changes the input spec must not score images prepared for the old geometry."""
    import cv2

    from pipeline.preprocess import resize_image
    from pipeline.serve.daemon import Daemon

    old_path = _versioned(tmp_path / "old", "v1")
    new_path = _versioned(tmp_path / "new", "v2")
    meta = load_metadata(new_path)
    letterbox = meta.preprocess.model_copy(update={"resize": "letterbox", "pad_value": 255})
    save_metadata(meta.model_copy(update={"preprocess": letterbox}), new_path.with_suffix(".json"))
    d = Daemon(ServeSettings(model=str(old_path), db=tmp_path / "r.sqlite", watch=tmp_path / "in"))
    try:
        img = np.zeros((10, 40, 3), np.uint8)  # dark and wide: letterbox pads it with white
        job = prepare(Job(source="http", kind="http", data=cv2.imencode(".png", img)[1].tobytes()),
                      d.holder.current.spec, 10_000, 1 << 20, None)
        new = load_verified(new_path, RuntimeOptions(), True)
        scored = d._score(new, [job])
        assert job.spec == letterbox
        np.testing.assert_array_equal(job.image, resize_image(img, letterbox))
        pred, emb = scored.outputs[0]
        assert emb[0] > -0.5  # the white padding is in what the new model saw (plain dark would be ~-1)
    finally:
        d.shutdown()


def test_daemon_calls_observers_after_commit_and_survives_their_errors(tiny_model, tmp_path):
    import cv2

    from pipeline.serve.daemon import Daemon
    from pipeline.serve.store import iter_all

    watch = tmp_path / "in"
    watch.mkdir()
    got: list[BatchResult] = []

    def collect(batch: BatchResult) -> None:
        got.append(batch)

    def explode(batch: BatchResult) -> None:
        raise ValueError("observer bug")

    settings = ServeSettings(model=str(tiny_model), db=tmp_path / "r.sqlite", watch=watch, poll_interval_s=0.05)
    d = Daemon(settings, observers=[explode, collect])
    d.start()
    try:
        for i, v in enumerate((10, 250, 10)):
            cv2.imwrite(str(tmp_path / "tmp.png"), np.full((20, 30, 3), v, np.uint8))
            os.replace(tmp_path / "tmp.png", watch / f"{i}.png")
        (watch / "bad.png").write_bytes(b"junk")
        deadline = time.monotonic() + 20
        while sum(len(b.items) for b in got) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        d.shutdown()
    items = {i.source: i for b in got for i in b.items}
    assert set(items) == {"folder:0.png", "folder:1.png", "folder:2.png", "folder:bad.png"}
    ok = items["folder:1.png"]
    assert ok.prediction.decision == "defect" and ok.embedding.shape == (3,) and ok.image.shape == (32, 32, 3)
    assert ok.stats.width == 30 and ok.stats.mean[0] == pytest.approx(250, abs=1) and ok.row_id is not None
    assert items["folder:bad.png"].error_kind == "undecodable" and items["folder:bad.png"].prediction is None
    assert all(b.model_version == d.holder.current.version for b in got)
    assert d.metrics.observer_errors._value.get() == len(got)
    assert len(list(iter_all(tmp_path / "r.sqlite"))) == 4


# -- inference streams -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streams, threads, cores, want", [
    (0, 0, 2, (2, 1)),   # auto on a small CPU host: two single-threaded calls
    (0, 0, 16, (2, 8)),  # auto on a big one: two calls on half the cores each
    (0, 0, 1, (1, 0)),   # one core: one call, ORT's default threads
    (3, 0, 8, (3, 2)),   # explicit streams split the cores
    (2, 4, 2, (2, 4)),   # explicit threads are kept as given
    (1, 0, 8, (1, 0)),   # one stream: ORT's default (all cores)
])
def test_stream_plan_on_cpu(streams, threads, cores, want, monkeypatch):
    from pipeline.serve import models

    monkeypatch.setattr(models, "candidate_providers", lambda requested=None: ["CPUExecutionProvider"])
    plan = models.plan_streams(streams, threads, None, cores=cores)
    assert (plan.streams, plan.intra_op_threads) == want


def test_stream_plan_keeps_one_call_on_every_core_for_http_only_daemons(monkeypatch, tmp_path, tiny_model):
    from pipeline.serve import models
    from pipeline.serve.daemon import Daemon

    monkeypatch.setattr(models, "candidate_providers", lambda requested=None: ["CPUExecutionProvider"])
    assert models.plan_streams(0, 0, None, cores=2, queued_sources=False) == models.StreamPlan(1, 0)
    assert models.plan_streams(2, 0, None, cores=2, queued_sources=False) == models.StreamPlan(2, 1)  # as asked
    monkeypatch.setattr(models, "usable_cores", lambda: 4)
    http_only = Daemon(ServeSettings(model=str(tiny_model), db=tmp_path / "a.sqlite", http="127.0.0.1:0"))
    with_folder = Daemon(ServeSettings(model=str(tiny_model), db=tmp_path / "b.sqlite", http="127.0.0.1:0",
                                       watch=tmp_path / "in"))
    try:
        assert http_only.streams == models.StreamPlan(1, 0)
        assert with_folder.streams == models.StreamPlan(2, 2)
        assert with_folder.health()["inference_streams"] == 2
    finally:
        http_only.shutdown()
        with_folder.shutdown()


def test_stream_plan_with_a_gpu_provider_runs_one_call_at_a_time(monkeypatch):
    from pipeline.serve import models

    monkeypatch.setattr(models, "candidate_providers",
                        lambda requested=None: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    plan = models.plan_streams(0, 0, None, cores=16)
    assert (plan.streams, plan.intra_op_threads) == (1, 0)


def test_batches_on_parallel_streams_are_committed_in_acceptance_order(tiny_model, tmp_path):
    """A later batch that finishes first waits for the earlier one: rows, observers and HTTP answers keep
    acceptance order whichever inference stream is faster."""
    import cv2

    from pipeline.serve.daemon import Daemon
    from pipeline.serve.store import iter_all

    seen: list[str] = []
    settings = ServeSettings(model=str(tiny_model), db=tmp_path / "r.sqlite", http="127.0.0.1:0", max_batch=1,
                             inference_streams=3, drift=False)
    d = Daemon(settings, observers=[lambda b: seen.extend(i.source for i in b.items)])
    assert d.streams.streams == 3
    score, running, overlap = d._score, [0], threading.Event()
    lock = threading.Lock()

    def slow_first(model, jobs):
        with lock:
            running[0] += 1
            if running[0] > 1:
                overlap.set()
        try:
            if jobs[0].seq == 0:
                time.sleep(0.6)  # the first batch is the slowest: the next ones overtake it
            return score(model, jobs)
        finally:
            with lock:
                running[0] -= 1

    d._score = slow_first
    d.start()
    try:
        futures = []
        for i in range(6):
            job = Job(source=f"http:{i}", kind="http",
                      data=cv2.imencode(".png", np.full((20, 30, 3), 40 * i, np.uint8))[1].tobytes())
            job.future = Future()
            assert d.submit(job, timeout=5)
            futures.append(job.future)
            time.sleep(0.02)  # one image per batch, in this order
        rows = [f.result(timeout=20) for f in futures]
    finally:
        d.shutdown()
    assert overlap.is_set()  # batches really ran at the same time
    stored = sorted(iter_all(tmp_path / "r.sqlite"), key=lambda r: r.id)
    assert [r.source for r in stored] == [f"http:{i}" for i in range(6)]
    assert [r.source for r in rows] == [f"http:{i}" for i in range(6)]
    assert seen == [f"http:{i}" for i in range(6)]
