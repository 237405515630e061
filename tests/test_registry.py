"""The on-disk registry: versions, checksums, champion pointer, history, line lock, CLI."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline import registry as registry_mod
from pipeline.cli import main
from pipeline.metadata import load_metadata, sha256_file
from pipeline.registry import (
    CHAMPION_FILE,
    HISTORY_FILE,
    IntegrityError,
    InvalidNameError,
    LineBusyError,
    NoChampionError,
    Registry,
    RegistryError,
    VersionExistsError,
    VersionNotFoundError,
    line_lock,
    model_dir,
    read_champion,
    registered_sha256,
    validate_name,
)
from pipeline.runtime import OnnxModel
from tests.tiny_model import make_tiny_model

FORK = mp.get_context("spawn")  # fresh interpreters: forking after Prefect or ORT threads started is unsafe


def make_run(tiny_model: Path, run_dir: Path, metrics: dict | None = None) -> Path:
    """A run folder as training + export leave it: the artefact, metrics, report, plots, and a checkpoint."""
    run_dir.mkdir(parents=True)
    shutil.copy2(tiny_model, run_dir / "model.onnx")
    shutil.copy2(tiny_model.with_suffix(".json"), run_dir / "model.json")
    m = {"balanced_accuracy": 0.9, "defect_recall_at_frr": 0.8, "false_reject_rate": 0.02, "n_images": 100}
    (run_dir / "metrics.json").write_text(json.dumps(metrics or m))
    (run_dir / "report.html").write_text("<html>report</html>")
    (run_dir / "manifest.json").write_text(json.dumps({"files": [{"path": "a.png", "sha256": "0" * 64}]}))
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "roc.png").write_bytes(b"\x89PNG fake")
    (run_dir / "checkpoint.pt").write_bytes(b"torch weights stay behind")
    (run_dir / ".cache").mkdir()
    (run_dir / ".cache" / "features.npy").write_bytes(b"cache stays behind")
    return run_dir


@pytest.fixture
def run(tiny_model: Path, tmp_path: Path) -> Path:
    return make_run(tiny_model, tmp_path / "run")


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models")


# --------------------------------------------------------------------------- register / list / show


def test_register_copies_artefacts_and_records_checksums(reg: Registry, run: Path) -> None:
    v = reg.register("line-a", run, note="first")
    assert (v.line, v.version, v.note, v.champion) == ("line-a", "v0001", "first", False)
    assert sorted(v.files) == ["manifest.json", "metrics.json", "model.json", "model.onnx",
                               "plots/roc.png", "report.html"]
    vdir = reg.root / "line-a" / "v0001"
    assert not (vdir / "checkpoint.pt").exists() and not (vdir / ".cache").exists()
    assert v.onnx_sha256 == sha256_file(run / "model.onnx") == sha256_file(vdir / "model.onnx")
    for rel, sha in v.files.items():
        assert sha256_file(vdir / rel) == sha
    # The copied sidecar knows where it lives; its sha still matches the unchanged ONNX bytes.
    meta = load_metadata(vdir / "model.onnx")
    assert (meta.line, meta.version, meta.onnx_sha256) == ("line-a", "v0001", v.onnx_sha256)
    assert load_metadata(run / "model.onnx").version is None  # the run folder is left alone
    assert v.metrics["balanced_accuracy"] == 0.9
    assert registered_sha256(reg.root, "line-a", "v0001") == v.onnx_sha256
    assert not [p for p in (reg.root / "line-a").iterdir() if p.name.startswith(".tmp-")]


def test_list_versions_orders_and_marks_champion(reg: Registry, run: Path, tiny_model: Path, tmp_path: Path) -> None:
    for _ in range(3):
        reg.register("a", run)
    reg.register("b", make_run(tiny_model, tmp_path / "run-b", {"balanced_accuracy": 0.5}), version="first")
    reg.promote("a", "v0002", "test")
    listed = [(v.line, v.version, v.champion) for v in reg.list_versions()]
    assert listed == [("a", "v0001", False), ("a", "v0002", True), ("a", "v0003", False), ("b", "first", False)]
    assert [v.version for v in reg.list_versions("b")] == ["first"]
    assert reg.show("b", "first").metrics == {"balanced_accuracy": 0.5}
    assert reg.champion("a").version == "v0002" and reg.champion("b") is None
    assert reg.list_versions("nope") == [] and Registry(tmp_path / "absent").list_versions() == []


def test_list_skips_half_written_and_foreign_folders(reg: Registry, run: Path) -> None:
    reg.register("a", run)
    (reg.root / "a" / ".tmp-deadbeef").mkdir()  # a crashed registration
    (reg.root / "a" / "v0002").mkdir()  # no registry.json: not a registered version
    assert [v.version for v in reg.list_versions("a")] == ["v0001"]
    with pytest.raises(IntegrityError, match="registry.json"):
        reg.show("a", "v0002")
    assert reg.register("a", run).version == "v0003"  # never reuses a name that exists on disk


def test_explicit_version_and_duplicates(reg: Registry, run: Path) -> None:
    assert reg.register("a", run, version="2024-06-01.night").version == "2024-06-01.night"
    with pytest.raises(VersionExistsError):
        reg.register("a", run, version="2024-06-01.night")
    assert reg.register("a", run).version == "v0001"
    with pytest.raises(VersionNotFoundError):
        reg.show("a", "v0009")


def test_register_refuses_incomplete_runs(reg: Registry, run: Path, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="not found"):
        reg.register("a", tmp_path / "missing")
    (run / "model.json").unlink()
    with pytest.raises(RegistryError, match="model.json"):
        reg.register("a", run)


def test_register_keeps_drift_reference_named_in_metadata(reg: Registry, run: Path) -> None:
    meta = json.loads((run / "model.json").read_text())
    meta["drift_reference"] = "drift_reference.bin"
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(RegistryError, match="drift reference"):
        reg.register("a", run)  # named but missing
    (run / "drift_reference.bin").write_bytes(b"stats")  # not an allow-listed suffix: kept because it is named
    assert "drift_reference.bin" in reg.register("a", run).files
    meta["drift_reference"] = "../outside.npz"
    (run / "model.json").write_text(json.dumps(meta))
    (run.parent / "outside.npz").write_bytes(b"x")
    with pytest.raises(RegistryError, match="outside"):
        reg.register("a", run)


def test_headline_metrics_follow_the_artefact_contract(reg: Registry, run: Path, tiny_model: Path,
                                                     tmp_path: Path) -> None:
    """model.json's metrics win; a training run's nested metrics.json is looked into; flat files are used as is."""
    nested = {"validation": {"balanced_accuracy": 0.7, "n_images": 40}, "history": [], "best_epoch": 3}
    (run / "metrics.json").write_text(json.dumps(nested))
    assert reg.register("a", run).metrics == {"balanced_accuracy": 0.7, "n_images": 40}
    meta = json.loads((run / "model.json").read_text())
    meta["metrics"] = {"balanced_accuracy": 0.75, "defect_recall_at_frr": 0.6}
    (run / "model.json").write_text(json.dumps(meta))
    assert reg.register("a", run).metrics == meta["metrics"]
    odd = make_run(tiny_model, tmp_path / "odd", {"loss": 0.1})
    assert reg.register("a", odd).metrics == {"loss": 0.1}
    (odd / "metrics.json").unlink()
    assert reg.register("a", odd).metrics == {}


# --------------------------------------------------------------------------- integrity


def test_tampered_model_refused_at_register(reg: Registry, run: Path) -> None:
    with open(run / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match="does not match"):
        reg.register("a", run)
    assert reg.list_versions() == []
    assert [p.name for p in (reg.root / "a").iterdir() if not p.name.startswith(".")] == []  # nothing left


def test_register_refuses_unverifiable_models(reg: Registry, run: Path, tiny_model: Path) -> None:
    meta = json.loads((run / "model.json").read_text())
    meta["onnx_sha256"] = None
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match="no onnx_sha256"):
        reg.register("a", run)
    shutil.copy2(tiny_model.with_suffix(".json"), run / "model.json")
    shutil.copy2(tiny_model, run / "model.int8.onnx")  # an extra model without its sidecar
    with pytest.raises(IntegrityError, match="model.int8.json"):
        reg.register("a", run)
    make_tiny_model(run, name="model.int8", bias=0.5)
    v = reg.register("a", run)
    assert v.has_int8
    assert load_metadata(v.path / "model.int8.onnx").version == v.version


def test_tampered_model_refused_at_load(reg: Registry, run: Path) -> None:
    reg.register("a", run)
    reg.promote("a", "v0001", "first")
    model = reg.load_champion("a")
    assert model.sha256 == reg.champion("a").onnx_sha256
    bright = np.full((32, 32, 3), 250, np.uint8)
    assert model.predict([bright])[0].decision == "defect"

    onnx_path = reg.root / "a" / "v0001" / "model.onnx"
    original = onnx_path.read_bytes()
    onnx_path.write_bytes(original + b"\0")
    with pytest.raises(IntegrityError):
        reg.load_champion("a")
    with pytest.raises(IntegrityError, match="model.onnx"):
        reg.verify("a", "v0001")
    onnx_path.write_bytes(original)
    reg.load_champion("a")


def test_model_swapped_with_its_sidecar_is_refused(reg: Registry, run: Path, tmp_path: Path) -> None:
    """The runtime alone accepts a consistent pair; the registry's own record catches the swap."""
    reg.register("a", run)
    reg.promote("a", "v0001", "first")
    other = make_tiny_model(tmp_path / "other", bias=3.0)
    vdir = reg.root / "a" / "v0001"
    shutil.copy2(other, vdir / "model.onnx")
    shutil.copy2(other.with_suffix(".json"), vdir / "model.json")
    OnnxModel(vdir / "model.onnx")  # self-consistent: the runtime's check passes
    with pytest.raises(IntegrityError, match="registration"):
        reg.load_champion("a")
    with pytest.raises(IntegrityError):
        reg.promote("a", "v0001", "again")  # already champion, but verification comes first


# --------------------------------------------------------------------------- promotion, rollback, history


def test_promote_rollback_and_history(reg: Registry, run: Path) -> None:
    for _ in range(3):
        reg.register("a", run)
    with pytest.raises(NoChampionError):
        reg.rollback("a")
    assert reg.promote("a", "v0001", "first model", user="alice").champion
    reg.promote("a", "v0002", "gate passed", user="bob")
    reg.promote("a", "v0003", "gate passed")
    reg.promote("a", "v0003", "again")  # no-op: no history line
    assert read_champion(reg.root, "a") == "v0003"
    assert (reg.root / "a" / CHAMPION_FILE).read_text() == "v0003\n"

    assert reg.rollback("a", "bad night shift").version == "v0002"
    assert reg.rollback("a", "still bad").version == "v0001"
    with pytest.raises(NoChampionError, match="no earlier champion"):
        reg.rollback("a")
    assert read_champion(reg.root, "a") == "v0001"
    reg.promote("a", "v0003", "retry")
    assert reg.rollback("a").version == "v0001"

    lines = (reg.root / "a" / HISTORY_FILE).read_text().splitlines()
    entries = [json.loads(x) for x in lines]
    assert [(e["action"], e["version"], e["previous"]) for e in entries] == [
        ("promote", "v0001", None), ("promote", "v0002", "v0001"), ("promote", "v0003", "v0002"),
        ("rollback", "v0002", "v0003"), ("rollback", "v0001", "v0002"),
        ("promote", "v0003", "v0001"), ("rollback", "v0001", "v0003")]
    assert entries[0]["reason"] == "first model" and entries[0]["user"] == "alice"
    assert entries[3]["reason"] == "bad night shift"
    assert all(e["user"] and e["time"] and len(e["onnx_sha256"]) == 64 for e in entries)
    assert [h.version for h in reg.history("a")] == [e["version"] for e in entries]


def test_promote_unknown_version(reg: Registry, run: Path) -> None:
    reg.register("a", run)
    with pytest.raises(VersionNotFoundError):
        reg.promote("a", "v0042", "x")
    with pytest.raises(VersionNotFoundError):
        reg.promote("nope", "v0001", "x")
    assert not (reg.root / "nope").exists()  # no lock file or folder created for a typo


def test_rollback_trusts_champion_over_history(reg: Registry, run: Path) -> None:
    """A crash after CHAMPION was replaced but before history was appended: rollback still goes back one."""
    for _ in range(2):
        reg.register("a", run)
    reg.promote("a", "v0001", "first")
    (reg.root / "a" / CHAMPION_FILE).write_text("v0002\n")  # history never heard of v0002
    assert reg.rollback("a").version == "v0001"


def test_torn_history_line_is_tolerated(reg: Registry, run: Path) -> None:
    for _ in range(2):
        reg.register("a", run)
    reg.promote("a", "v0001", "first")
    with open(reg.root / "a" / HISTORY_FILE, "a") as f:
        f.write('{"time": "2024-01-01T00:00:00Z", "act')  # crash mid-append
    reg.promote("a", "v0002", "second")
    assert [h.version for h in reg.history("a")] == ["v0001", "v0002"]
    assert reg.rollback("a").version == "v0001"


def _crash_during_champion_replace(root: Path) -> None:
    def die(*args: object, **kwargs: object) -> None:
        os._exit(3)  # the process dies after the temp file was written and fsynced, before the rename

    registry_mod.os.replace = die  # only in this forked child
    Registry(root).promote("a", "v0002", "crash")


def test_champion_survives_a_crash_between_write_and_rename(reg: Registry, run: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(2):
        reg.register("a", run)
    reg.promote("a", "v0001", "first")
    p = FORK.Process(target=_crash_during_champion_replace, args=(reg.root,))
    p.start()
    p.join(30)
    assert p.exitcode == 3
    assert (reg.root / "a" / CHAMPION_FILE).read_text() == "v0001\n"
    assert [h.version for h in reg.history("a")] == ["v0001"]
    assert reg.load_champion("a").sha256 == reg.show("a", "v0001").onnx_sha256

    # In-process failure of the rename: old pointer kept, temp file cleaned up, nothing logged.
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(registry_mod.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        reg.promote("a", "v0002", "fails")
    monkeypatch.undo()
    assert read_champion(reg.root, "a") == "v0001"
    assert len(reg.history("a")) == 1
    leftovers = [p.name for p in (reg.root / "a").iterdir() if p.name.startswith(f".{CHAMPION_FILE}.tmp")]
    assert len(leftovers) == 1  # only the one from the killed child; the failed call cleaned up its own
    reg.promote("a", "v0002", "works again")
    assert read_champion(reg.root, "a") == "v0002"


def _flip_champion(root: Path, n: int) -> None:
    reg = Registry(root)
    for i in range(n):
        reg.promote("a", ("v0001", "v0002")[i % 2], "flip")


def test_readers_never_see_a_partial_champion(reg: Registry, run: Path) -> None:
    for _ in range(2):
        reg.register("a", run)
    reg.promote("a", "v0002", "start")
    p = FORK.Process(target=_flip_champion, args=(reg.root, 60))
    p.start()
    seen = set()
    while p.is_alive():
        seen.add((reg.root / "a" / CHAMPION_FILE).read_text())
    p.join()
    assert p.exitcode == 0
    assert seen <= {"v0001\n", "v0002\n"}
    assert len(reg.history("a")) == 61


# --------------------------------------------------------------------------- concurrency and locks


def _register_n(root: Path, run: Path, n: int, out: mp.Queue) -> None:
    reg = Registry(root)
    out.put([reg.register("a", run).version for _ in range(n)])


def test_concurrent_registration_gets_distinct_versions(reg: Registry, run: Path) -> None:
    q = FORK.Queue()
    procs = [FORK.Process(target=_register_n, args=(reg.root, run, 3, q)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [v for _ in procs for v in q.get(timeout=60)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sorted(got) == [f"v{i:04d}" for i in range(1, 13)]
    listed = reg.list_versions("a")
    assert [v.version for v in listed] == sorted(got)
    for v in listed:  # each folder is complete and stamped with its own name
        assert load_metadata(v.onnx_path).version == v.version
        reg.verify("a", v.version)


def _hold_lock(root: Path, line: str, hold_s: float, out: mp.Queue) -> None:
    with line_lock(root, line):
        start = time.monotonic()
        time.sleep(hold_s)
        end = time.monotonic()
    out.put((start, end))


def test_line_lock_serialises_processes(tmp_path: Path) -> None:
    q = FORK.Queue()
    procs = [FORK.Process(target=_hold_lock, args=(tmp_path, "a", 0.3, q)) for _ in range(3)]
    for p in procs:
        p.start()
    spans = sorted(q.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(10)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, spans  # CLOCK_MONOTONIC is system-wide on Linux: comparable across processes


def _hold_until(root: Path, line: str, held: mp.Event, release: mp.Event) -> None:
    with line_lock(root, line):
        held.set()
        release.wait(30)


def _hold_until_killed(root: Path, line: str, held: mp.Event) -> None:
    with line_lock(root, line):
        held.set()
        time.sleep(60)


def test_line_lock_busy_independent_lines_and_holder_death(reg: Registry, run: Path) -> None:
    reg.register("a", run)
    held = FORK.Event()
    p = FORK.Process(target=_hold_until_killed, args=(reg.root, "a", held))
    p.start()
    try:
        assert held.wait(30)
        with line_lock(reg.root, "b", timeout=0):  # another line: independent
            pass
        t0 = time.monotonic()
        with pytest.raises(LineBusyError, match=f"pid {p.pid}"):
            with line_lock(reg.root, "a", timeout=0.2):
                pass
        assert time.monotonic() - t0 >= 0.2
        with pytest.raises(LineBusyError):
            reg.promote("a", "v0001", "during retrain", timeout=0)
        assert read_champion(reg.root, "a") is None
        os.kill(p.pid, signal.SIGKILL)  # the holder dies: the kernel releases the lock
        p.join(10)
        with line_lock(reg.root, "a", timeout=5) as lock:
            reg.promote("a", "v0001", "inside the retrain's lock", lock=lock)  # no self-deadlock
        assert read_champion(reg.root, "a") == "v0001"
    finally:
        if p.is_alive():
            p.kill()
        p.join(10)


def test_lock_of_another_line_is_not_accepted(reg: Registry, run: Path) -> None:
    reg.register("a", run)
    with line_lock(reg.root, "b") as other:
        with pytest.raises(RegistryError, match="not a held lock"):
            reg.promote("a", "v0001", "x", lock=other)
    with pytest.raises(RegistryError, match="not a held lock"):
        reg.promote("a", "v0001", "x", lock=other)  # released


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", "/abs", ".hidden", "-dash", "a b", "x" * 65,
                                 "a\nb", "a\\b", "é"])
def test_unsafe_names_rejected(reg: Registry, run: Path, tmp_path: Path, bad: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_name(bad)
    with pytest.raises(InvalidNameError):
        reg.register(bad, run)
    with pytest.raises(InvalidNameError):
        reg.register("a", run, version=bad)
    with pytest.raises(InvalidNameError):
        reg.show("a", bad)
    with pytest.raises(InvalidNameError):
        model_dir(reg.root, bad, "v1")
    with pytest.raises(InvalidNameError):
        with line_lock(reg.root, bad, timeout=0):
            pass
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("reserved", [CHAMPION_FILE, HISTORY_FILE])
def test_reserved_version_names_rejected(reg: Registry, run: Path, reserved: str) -> None:
    with pytest.raises(InvalidNameError, match="reserved"):
        reg.register("a", run, version=reserved)
    assert validate_name("v0001.rc-1_x", "version") == "v0001.rc-1_x"


# --------------------------------------------------------------------------- CLI


def _cli(args: list[str], env: dict | None = None):
    return CliRunner().invoke(main, ["registry", *args], env=env, catch_exceptions=False)


def test_cli_list_show_promote_rollback(reg: Registry, run: Path) -> None:
    for _ in range(2):
        reg.register("a", run, note="cli")
    r = _cli(["list", "--registry", str(reg.root), "--json"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [(x["line"], x["version"], x["champion"]) for x in rows] == [("a", "v0001", False), ("a", "v0002", False)]
    assert {"line", "version", "champion", "metrics", "created", "onnx_sha256"} <= set(rows[0])
    assert rows[0]["metrics"]["defect_recall_at_frr"] == 0.8

    r = _cli(["promote", "a", "v0001", "--reason", "first", "--registry", str(reg.root)])
    assert r.exit_code == 0 and "promoted a/v0001" in r.stdout
    r = _cli(["promote", "a", "v0002"], env={"DEFECT_REGISTRY": str(reg.root)})
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in _cli(["list", "--json"], env={"DEFECT_REGISTRY": str(reg.root)}).stdout.splitlines()]
    assert [x["champion"] for x in rows] == [False, True]

    r = _cli(["list", "--registry", str(reg.root)])
    assert r.exit_code == 0 and "v0002" in r.stdout and "0.900" in r.stdout

    r = _cli(["show", "a", "v0002", "--registry", str(reg.root), "--json"])
    shown = json.loads(r.stdout)
    assert shown["integrity"] == "ok" and shown["metadata"]["version"] == "v0002" and shown["champion"]

    r = _cli(["rollback", "a", "--reason", "oops", "--registry", str(reg.root), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["version"] == "v0001"
    assert reg.history("a")[-1].reason == "oops"
    r = _cli(["history", "a", "--registry", str(reg.root), "--json"])
    assert [json.loads(x)["action"] for x in r.stdout.splitlines()] == ["promote", "promote", "rollback"]


def test_cli_register_and_errors(reg: Registry, run: Path) -> None:
    r = _cli(["register", "a", str(run), "--registry", str(reg.root)])
    assert r.exit_code == 0 and "registered a/v0001" in r.stdout
    cases = [
        ["promote", "a", "v0009"],
        ["promote", "../etc", "v0001"],
        ["rollback", "a"],
        ["show", "a", "nope"],
        ["register", "a", str(run.parent / "missing")],
    ]
    for args in cases:
        r = _cli([*args, "--registry", str(reg.root)])
        assert r.exit_code == 1, (args, r.output)
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("Error: "), (args, r.stderr)
        assert r.stdout == ""

    with open(reg.root / "a" / "v0001" / "model.onnx", "ab") as f:
        f.write(b"\0")
    r = _cli(["show", "a", "v0001", "--registry", str(reg.root)])
    assert r.exit_code == 1 and "integrity" in r.stderr
    r = _cli(["list", "--registry", str(reg.root / "empty")])
    assert r.exit_code == 0 and "no models" in r.stdout


def test_cli_promote_refused_while_line_busy(reg: Registry, run: Path) -> None:
    reg.register("a", run)
    held, release = FORK.Event(), FORK.Event()
    p = FORK.Process(target=_hold_until, args=(reg.root, "a", held, release))
    p.start()
    try:
        assert held.wait(30)
        r = _cli(["promote", "a", "v0001", "--registry", str(reg.root)])
        assert r.exit_code == 1 and "busy" in r.stderr and "--wait" in r.stderr
    finally:
        release.set()
        p.join(10)
    r = _cli(["promote", "a", "v0001", "--registry", str(reg.root), "--wait", "5"])
    assert r.exit_code == 0, r.output
