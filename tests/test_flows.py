"""The Prefect side of re-training: the retrain flow's promotion rules, failure safety and line lock,
`defect adapt`, the deployments, the drift automation and the event -> flow run path.

One temporary Prefect server serves the whole session (``prefect_server`` in conftest: it takes
20-45 s to start). Every retrain here trains for real on a small synthetic two-class line, so the
default suite keeps them few (five and a half): a degenerate config (no training steps) gives a
bad challenger cheaply, a head-only config a clearly better one. Why two classes and n=16: the drift
reference a run fits needs at least 32 training-pool images, and 48 images over five classes do
not learn anything in one fast epoch, so "better" would be a coin toss.

The ``slow`` test at the end starts a real ``prefect server start`` and ``prefect worker start`` as
subprocesses and goes through deployments, ``run_deployment`` and a drift event end to end.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("prefect")
pytest.importorskip("torch")
yaml = pytest.importorskip("yaml")

from click.testing import CliRunner  # noqa: E402

from pipeline.registry import (CHAMPION_FILE, HISTORY_FILE, LineBusyError, Registry, RegistryError,  # noqa: E402
                               line_lock, read_champion)
from pipeline.synth import generate_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LINE = "line1"
# Head only (300 steps on cached features, no fine-tuning): learns this line reliably in ~10 s and does
# not depend on the stage-2 recipe (epoch selection, schedules), which a one-epoch fine-tune did.
TRAINED = {"img_size": 64, "feature_views": 1, "head_steps": 300, "finetune_epochs": 0, "batch_size": 8}
DEGENERATE = {**TRAINED, "head_steps": 0}  # an untrained head: a bad challenger, cheaply


# --------------------------------------------------------------------------- helpers and fixtures


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/line1/{good,spot}: 32 good + 16 defect images of 64 px.

    Seed 3: on its gate set the trained head scores balanced accuracy 0.85 / recall 0.8 / FRR 0 against
    the degenerate model's 0.5 / 0 / 0 (deterministic; measured with the recipe of this commit).
    """
    root = tmp_path_factory.mktemp("line-data")
    generate_dataset(root / LINE, n=16, size=64, good_multiplier=2, seed=3, classes=("good", "spot"))
    return root


@dataclass
class Lineage:
    registry: Path
    first: dict[str, Any]   # a degenerate model on an empty line
    second: dict[str, Any]  # a trained one against it
    champion_after_first: str | None


@pytest.fixture(scope="module")
def lineage(prefect_server: str, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    """Two retrains of one line: the first model (degenerate), then a better one. Other tests copy it."""
    from flows.retrain import retrain

    reg = tmp_path_factory.mktemp("lineage") / "models"
    first = retrain(LINE, str(data_root / LINE), registry=str(reg), train_config=DEGENERATE, reason="first model")
    after_first = read_champion(reg, LINE)
    second = retrain(LINE, str(data_root / LINE), registry=str(reg), train_config=TRAINED, reason="better model")
    return Lineage(reg, first, second, after_first)


def _line_state(reg: Path) -> dict[str, Any]:
    """Everything a failed or refused run must leave alone, and any scratch it must not leave behind."""
    ldir = reg / LINE
    return {"champion": (ldir / CHAMPION_FILE).read_bytes(),
            "history": (ldir / HISTORY_FILE).read_bytes(),
            "versions": sorted(p.name for p in ldir.iterdir() if p.is_dir() and not p.name.startswith(".")),
            "scratch": sorted(p.name for p in ldir.iterdir() if p.name.startswith((".run-", ".tmp-")))}


def _copy_registry(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _write_config(path: Path, train: dict[str, Any], gate: dict[str, Any] | None = None) -> Path:
    path.write_text(yaml.safe_dump({**train, **({"gate": gate} if gate else {})}))
    return path


def _adapt_cli() -> Any:
    from pipeline.cli.adapt_cmd import adapt

    return adapt


def _wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _flow_runs(deployment_id: Any = None, state: str | None = None) -> list[Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateName)

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=None if deployment_id is None else DeploymentFilter(
                id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=None if state is None else FlowRunFilter(
                state=FlowRunFilterState(name=FlowRunFilterStateName(any_=[state]))))


# --------------------------------------------------------------------------- the flow: gate and promotion


def test_first_model_of_a_line_is_promoted(lineage: Lineage) -> None:
    first = lineage.first
    assert first["version"] == "v0001" and first["promoted"] is True
    assert first["champion_before"] is None and first["champion"] is None
    assert any("no champion yet" in r for r in first["reasons"])
    assert lineage.champion_after_first == "v0001"


def test_better_challenger_is_promoted(lineage: Lineage) -> None:
    second, reg = lineage.second, lineage.registry
    assert second["champion_before"] == "v0001"
    assert second["promoted"] is True, second["reasons"]
    assert second["version"] == "v0002" and read_champion(reg, LINE) == "v0002"
    # Both were scored on the same gate set, and the trained model is clearly better on it.
    assert second["challenger"]["n_images"] == second["champion"]["n_images"]
    assert second["challenger"]["balanced_accuracy"] > second["champion"]["balanced_accuracy"]
    assert second["challenger"]["defect_recall_at_frr"] > second["champion"]["defect_recall_at_frr"]
    registry = Registry(reg)
    history = registry.history(LINE)
    assert [(h.action, h.version, h.previous) for h in history] == [("promote", "v0001", None),
                                                                     ("promote", "v0002", "v0001")]
    assert history[1].reason.startswith("better model; promote:")
    for version in ("v0001", "v0002"):
        registry.verify(LINE, version)  # every registered file still has its registered sha256
    assert _line_state(reg)["scratch"] == []
    # The run reported to the server: its gate artifact names the decision.
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["retrain-line1"])))
    assert any("v0002 PROMOTED" in (a.data or "") for a in artifacts)


def _events(name: str, resource_id: str) -> list[dict[str, Any]]:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        r = client.request("POST", "/events/filter", json={"filter": {
            "event": {"name": [name]}, "resource": {"id": [resource_id]}, "any_resource": None}, "limit": 50})
    return r.json().get("events", [])


def test_promotions_are_announced_as_events(lineage: Lineage) -> None:
    """Each champion change of the flow is a ``defect.model.promoted`` event on the line's resource."""
    from flows.events import PROMOTED_EVENT

    events = _wait_for(lambda: len(got := _events(PROMOTED_EVENT, f"defect.line.{LINE}")) >= 2 and got, 60,
                       "two promotion events")
    by_version = {e["payload"]["version"]: e for e in events}
    assert set(by_version) >= {"v0001", "v0002"}
    assert by_version["v0002"]["payload"]["previous"] == "v0001"
    assert by_version["v0002"]["payload"]["metrics"]["balanced_accuracy"] == lineage.second["challenger"][
        "balanced_accuracy"]
    assert by_version["v0002"]["resource"]["registry"] == str(lineage.registry)


def test_regression_is_registered_but_not_promoted(lineage: Lineage, data_root: Path, tmp_path: Path) -> None:
    from flows.retrain import retrain

    reg = _copy_registry(lineage.registry, tmp_path / "models")
    before = _line_state(reg)
    result = retrain(LINE, str(data_root / LINE), registry=str(reg), train_config=DEGENERATE, reason="regression")
    assert result["promoted"] is False
    assert result["version"] == "v0003" and result["champion_before"] == "v0002"
    assert any("regresses beyond tolerance" in r for r in result["reasons"])
    after = _line_state(reg)
    assert after["champion"] == before["champion"] and after["history"] == before["history"]
    assert after["versions"] == ["v0001", "v0002", "v0003"] and after["scratch"] == []
    info = Registry(reg).verify(LINE, "v0003")
    assert info.champion is False and info.note == "regression"


def test_labelled_readapt_replays_the_champions_data_and_refits_drift_on_the_new_domain(
        lineage: Lineage, data_root: Path, tmp_path: Path) -> None:
    """readapt with labels: warm start + the champion's own labelled files (never a gate-set file), and the
    new version's drift reference is fitted on the new-domain images (it serves them from now on)."""
    from flows.adapt import readapt
    from pipeline.drift import load_reference

    reg = _copy_registry(lineage.registry, tmp_path / "models")
    champion = Registry(reg).champion(LINE)
    old = json.loads((champion.path / "manifest.json").read_text())
    new_dir = tmp_path / "new_lamp"
    generate_dataset(new_dir, n=16, size=64, good_multiplier=2, seed=5, exposure=1.6, classes=("good", "spot"))
    out = readapt(LINE, registry=str(reg), data_dir=str(new_dir), train_config=TRAINED, reason="new lamp")
    assert out["mode"] == "supervised" and out["version"] == "v0003"
    info = out["adaptation"]
    assert info["replay"]["replayed"] == len(old["train"]) + len(old["val"]) > 0
    assert info["replay"]["missing"] == info["replay"]["changed"] == 0
    assert info["drift_reference"] == "current domain (48 images)"
    v3 = Registry(reg).show(LINE, "v0003").path
    manifest = json.loads((v3 / "manifest.json").read_text())
    used = {r["path"] for r in manifest["train"] + manifest["val"]}
    replayed = {str(Path(old["data_dir"]) / r["path"]) for r in old["train"] + old["val"]}
    assert replayed <= used  # absolute paths: the next adaptation can replay them again
    trained_new = {p for p in used if not Path(p).is_absolute()}
    assert 0 < len(trained_new) < 48  # the gate set (30 % of the new images) was held out
    ref = load_reference(v3 / "drift_reference.npz")
    assert ref.n_fit + ref.n_pool == 48


# --------------------------------------------------------------------------- failure safety and the line lock


def test_failed_step_leaves_champion_untouched_and_next_run_works(
        lineage: Lineage, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.retrain import retrain

    reg = _copy_registry(lineage.registry, tmp_path / "models")
    before = _line_state(reg)

    def broken_parity(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected parity failure")

    monkeypatch.setattr("pipeline.export.parity_check", broken_parity)
    with pytest.raises(RuntimeError, match="injected parity failure"):
        retrain(LINE, str(data_root / LINE), registry=str(reg), train_config=DEGENERATE)
    assert _line_state(reg) == before  # same champion bytes, versions, history; no scratch left
    with line_lock(reg, LINE, timeout=0):  # and the lock was released
        pass
    monkeypatch.undo()

    # The next run, through `defect adapt`, works and is judged normally.
    cfg = _write_config(tmp_path / "train.yaml", DEGENERATE)
    res = CliRunner().invoke(_adapt_cli(), ["--line", LINE, "--data", str(data_root / LINE), "--registry", str(reg),
                                            "--config", str(cfg), "--reason", "after a failure", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["version"] == "v0003" and out["promoted"] is False and out["champion_before"] == "v0002"
    after = _line_state(reg)
    assert after["champion"] == before["champion"] and after["versions"] == ["v0001", "v0002", "v0003"]
    assert after["scratch"] == []
    assert Registry(reg).show(LINE, "v0003").note == "after a failure"


def test_second_retrain_of_a_line_waits_for_the_first(prefect_server: str, data_root: Path, tmp_path: Path) -> None:
    """The line lock serialises retrains: an impatient one fails at once, a patient one starts after release."""
    from flows.retrain import retrain

    reg = tmp_path / "models"
    missing = tmp_path / "not-there"  # fails right after the lock is taken: no training needed to see the order
    outcome: dict[str, Any] = {}

    def patient() -> None:
        try:
            retrain(LINE, str(missing), registry=str(reg), lock_timeout_s=120)
        except Exception as e:  # noqa: BLE001 - recorded for the assertions below
            outcome["error"], outcome["at"] = e, time.monotonic()

    with line_lock(reg, LINE):  # stands in for a retrain (or promotion) of the line in progress
        t0 = time.monotonic()
        with pytest.raises(LineBusyError, match="held by pid"):
            retrain(LINE, str(data_root / LINE), registry=str(reg), lock_timeout_s=0)
        assert time.monotonic() - t0 < 30
        thread = threading.Thread(target=patient, daemon=True)
        thread.start()
        _wait_for(lambda: _flow_runs(state="Running"), 60, "the second retrain to start running")
        time.sleep(1.5)
        assert thread.is_alive() and "error" not in outcome  # blocked on the lock, not failed or done
        assert not list((reg / LINE).glob(".run-*"))
        released = time.monotonic()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert isinstance(outcome["error"], FileNotFoundError)  # it got the lock, then found no data
    assert outcome["at"] >= released
    assert Registry(reg).list_versions(LINE) == []


# --------------------------------------------------------------------------- defect adapt


def test_adapt_refuses_bad_input_and_a_busy_line(prefect_server: str, data_root: Path, tmp_path: Path) -> None:
    adapt, runner, reg = _adapt_cli(), CliRunner(), tmp_path / "models"
    (tmp_path / "empty" / "good").mkdir(parents=True)
    (tmp_path / "empty" / "bad").mkdir()
    res = runner.invoke(adapt, ["--line", LINE, "--data", str(tmp_path / "empty"), "--registry", str(reg)])
    assert res.exit_code == 2 and "no image" in res.output
    res = runner.invoke(adapt, ["--line", LINE, "--data", str(tmp_path / "absent"), "--registry", str(reg)])
    assert res.exit_code == 2 and "not found" in res.output
    res = runner.invoke(adapt, ["--line", "../etc", "--data", str(data_root / LINE), "--registry", str(reg)])
    assert res.exit_code == 2 and "invalid line name" in res.output
    bad = _write_config(tmp_path / "bad.yaml", {"head_steps": -1})
    res = runner.invoke(adapt, ["--line", LINE, "--data", str(data_root / LINE), "--config", str(bad)])
    assert res.exit_code == 2 and "head_steps" in res.output
    typo = _write_config(tmp_path / "typo.yaml", {"head_step": 5})
    res = runner.invoke(adapt, ["--line", LINE, "--data", str(data_root / LINE), "--config", str(typo)])
    assert res.exit_code == 2 and "head_step" in res.output
    with line_lock(reg, LINE):
        res = runner.invoke(adapt, ["--line", LINE, "--data", str(data_root / LINE), "--registry", str(reg),
                                    "--wait", "0"])
    assert res.exit_code == 75, res.output
    assert "busy" in res.output and "held by pid" in res.output and "--wait" in res.output
    assert Registry(reg).list_versions(LINE) == []


def test_retrain_refuses_a_misspelt_parameter_before_it_trains(prefect_server: str, data_root: Path,
                                                                tmp_path: Path) -> None:
    """A typo in gate or train_config (the UI's flow parameters) fails at once: nothing trained, nothing locked."""
    from pydantic import ValidationError

    from flows.retrain import retrain

    reg = tmp_path / "models"
    with pytest.raises(ValidationError, match="tolerance_balanced_acc"):
        retrain(LINE, str(data_root / LINE), registry=str(reg), train_config=TRAINED,
                gate={"tolerance_balanced_acc": 0.5})
    with pytest.raises(ValidationError, match="head_step"):
        retrain(LINE, str(data_root / LINE), registry=str(reg), train_config={**TRAINED, "head_step": 5})
    with pytest.raises(ValidationError, match="replay_all"):
        retrain(LINE, str(data_root / LINE), registry=str(reg), train_config=TRAINED,
                supervised_adapt={"replay_all": True})
    assert not (reg / LINE).exists()


def test_adapt_passes_options_and_prints_the_verdict(data_root: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing and printing only (the flow is replaced): what reaches the flow and what the operator reads."""
    calls: list[dict[str, Any]] = []

    def fake_retrain(**kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs)
        return {"line": LINE, "version": "v0007", "promoted": False, "champion_before": "v0006",
                "reasons": ["balanced_accuracy 0.8000 vs 0.9000 (-0.1000): regresses beyond tolerance 0.01"],
                "challenger": {"balanced_accuracy": 0.8, "defect_recall_at_frr": 0.5, "false_reject_rate": 0.0,
                               "n_images": 15},
                "champion": {"balanced_accuracy": 0.9, "defect_recall_at_frr": 0.6, "false_reject_rate": 0.0,
                             "n_images": 15}, "timings": {}}

    monkeypatch.setattr("flows.retrain.retrain", fake_retrain)
    cfg = _write_config(tmp_path / "c.yaml", {"head_steps": 5, "img_size": 64}, gate={"require_improvement": True})
    res = CliRunner().invoke(_adapt_cli(), [
        "--line", LINE, "--data", str(data_root / LINE), "--registry", str(tmp_path / "reg"), "--shots", "4",
        "--seed", "7", "--warm-start", "--config", str(cfg), "--reason", "new batch", "--wait", "5",
        "--masks", str(tmp_path)])
    assert res.exit_code == 0, res.output
    (kw,) = calls
    assert kw["line"] == LINE and kw["shots"] == 4 and kw["seed"] == 7 and kw["warm_start"] is True
    assert kw["train_config"] == {"head_steps": 5, "img_size": 64} and kw["gate"] == {"require_improvement": True}
    assert kw["registry"] == str((tmp_path / "reg").absolute()) and kw["lock_timeout_s"] == 5.0
    assert kw["reason"] == "new batch" and kw["masks_dir"] == str(tmp_path.absolute())
    assert "v0007 registered, not promoted (champion before: v0006)" in res.stdout
    assert "regresses beyond tolerance" in res.stdout and "bal.acc 0.800" in res.stdout


# --------------------------------------------------------------------------- deployments and the automation


def test_setup_creates_deployments_and_the_drift_automation(prefect_server: str, tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.events.actions import RunDeployment

    from flows.deployments import ENTRYPOINT, READAPT_ENTRYPOINT
    from pipeline.cli.adapt_cmd import prefect_group

    cfg = _write_config(tmp_path / "site.yaml", DEGENERATE)
    reg, root = tmp_path / "models", tmp_path / "data"
    args = ["setup", "--work-pool", "pool-setup-test", "--registry", str(reg), "--data-root", str(root),
            "--cron", "0 3 * * 1", "--timezone", "Europe/Berlin", "--pool-concurrency", "2", "--config", str(cfg),
            "--json"]
    res = CliRunner().invoke(prefect_group, args + ["--line", "a", "--line", "b"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["work_pool_created"] is True and out["scheduled_lines"] == ["a", "b"]
    assert out["api_url"] == prefect_server

    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("pool-setup-test")
        on_demand = client.read_deployment_by_name("retrain/on-demand")
        weekly = client.read_deployment_by_name("retrain/weekly")
        on_drift = client.read_deployment_by_name("readapt/on-drift")
        automations = client.read_resource_related_automations(f"prefect.deployment.{on_drift.id}")
        assert client.read_resource_related_automations(f"prefect.deployment.{on_demand.id}") == []
    assert pool.type == "process" and pool.concurrency_limit == 2
    for dep in (on_demand, weekly, on_drift):
        assert dep.work_pool_name == "pool-setup-test"
        assert dep.parameters == {"registry": str(reg), "train_config": DEGENERATE}
        assert "retrain" in dep.tags
    assert on_demand.entrypoint == weekly.entrypoint == ENTRYPOINT == "flows.retrain.retrain"
    assert on_drift.entrypoint == READAPT_ENTRYPOINT == "flows.adapt.readapt"
    assert on_demand.schedules == [] and on_drift.schedules == []
    by_slug = {s.slug: s for s in weekly.schedules}
    assert set(by_slug) == {"weekly-a", "weekly-b"}
    assert by_slug["weekly-b"].schedule.cron == "0 3 * * 1" and by_slug["weekly-b"].schedule.timezone == "Europe/Berlin"
    assert by_slug["weekly-b"].parameters["line"] == "b"
    assert by_slug["weekly-b"].parameters["data_dir"] == str(root / "b")

    (auto,) = automations
    assert auto.name == "defect-drift-readapt" and auto.enabled
    trigger = auto.trigger
    assert trigger.expect == {"defect.drift.detected"}
    assert trigger.match.model_dump() == {"prefect.resource.id": "defect.line.*"}
    assert trigger.for_each == {"prefect.resource.id"}
    assert trigger.posture == "Reactive" and trigger.threshold == 1
    (action,) = auto.actions
    assert isinstance(action, RunDeployment) and action.deployment_id == on_drift.id
    assert set(action.parameters) == {"line", "data_dir", "recent_dir", "registry", "reason"}
    assert "event.payload.get('data_dir')" in action.parameters["data_dir"]

    # Idempotent: again with one line -> same deployments, one schedule, still one automation.
    res = CliRunner().invoke(prefect_group, args + ["--line", "a"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["deployments"] == out["deployments"]
    with get_client(sync_client=True) as client:
        weekly = client.read_deployment_by_name("retrain/weekly")
        automations = client.read_resource_related_automations(f"prefect.deployment.{on_drift.id}")
    assert [s.slug for s in weekly.schedules] == ["weekly-a"] and len(automations) == 1

    bad = CliRunner().invoke(prefect_group, ["setup", "--work-pool", "pool-setup-test", "--cron", "61 * * *"])
    assert bad.exit_code == 2 and "invalid schedule" in bad.output
    nodata = CliRunner().invoke(prefect_group, ["setup", "--work-pool", "pool-setup-test", "--line", "a"])
    assert nodata.exit_code == 2 and "data root" in nodata.output


def test_drift_event_runs_the_readapt_deployment(prefect_server: str, data_root: Path, tmp_path: Path) -> None:
    """defect.drift.detected -> automation -> flow run of readapt/on-drift -> a worker runs it -> champion.

    The line has labelled data and no champion yet, so readapt trains its first model (supervised)."""
    import anyio
    from prefect import get_client
    from prefect.workers.process import ProcessWorker

    from flows.deployments import DeploymentSettings, apply_deployments
    from pipeline.cli.adapt_cmd import prefect_group

    reg = tmp_path / "models"
    setup = apply_deployments(DeploymentSettings(work_pool="pool-drift-test", registry=reg, data_root=data_root,
                                                 defaults={"train_config": DEGENERATE}))
    dep_id = setup.deployments["readapt/on-drift"]
    sent = CliRunner().invoke(prefect_group, ["emit-drift", "--line", LINE, "--summary", "embedding drift 0.31 > 0.12",
                                              "--recent", str(tmp_path / "recent"),
                                              "--registry", "/mnt/elsewhere/models"])
    assert sent.exit_code == 0, sent.output
    event_id = str(uuid.UUID(sent.stdout.strip()))
    (run,) = _wait_for(lambda: _flow_runs(dep_id), 60, "the automation to create a flow run")
    assert run.parameters["line"] == LINE
    assert run.parameters["data_dir"] == str(data_root / LINE)  # the event named none: <data root>/<line>
    assert run.parameters["registry"] == str(reg)  # the site's, whatever the event says
    assert run.parameters["train_config"] == DEGENERATE  # the deployment's defaults still apply
    assert run.parameters["recent_dir"] == str(tmp_path / "recent")  # for label-free adaptation
    assert f"recent images: {tmp_path / 'recent'}" in run.parameters["reason"]
    assert "the daemon serves from /mnt/elsewhere/models" in run.parameters["reason"]
    assert run.parameters["reason"].startswith(f"drift alarm on {LINE} at ")
    assert event_id in run.parameters["reason"] and "embedding drift 0.31 > 0.12" in run.parameters["reason"]

    anyio.run(ProcessWorker(work_pool_name="pool-drift-test").start, True)  # one poll; waits for its runs
    with get_client(sync_client=True) as client:
        final = client.read_flow_run(run.id)
    assert final.state is not None and final.state.is_completed(), final.state
    assert read_champion(reg, LINE) == "v0001"
    (entry,) = Registry(reg).history(LINE)
    assert entry.reason.startswith(f"drift alarm on {LINE}")


def _render_like_the_server(parameters: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """Render RunDeployment parameters for one event with the server's own template code."""
    from prefect.server.events.actions import RunDeployment
    from prefect.server.events.schemas.events import Event
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    params = copy.deepcopy(parameters)
    RunDeployment._upgrade_v1_templates(params)
    ev = Event(**{"id": uuid.uuid4(), "occurred": datetime.now(timezone.utc), **event})
    out = hydrate(params, HydrationContext(raise_on_error=True, render_jinja=True, jinja_context={"event": ev}))
    return {"event_id": str(ev.id), **out}


def test_drift_templates_take_data_from_the_event_or_the_site(tmp_path: Path) -> None:
    from flows.deployments import DeploymentSettings, drift_event, drift_trigger_parameters

    reg, root = tmp_path / "models", tmp_path / "data"
    params = drift_trigger_parameters(DeploymentSettings(registry=reg, data_root=root))
    # Nothing in the event: the site's registry and <data root>/<line>.
    out = _render_like_the_server(params, drift_event("L7", summary="mmd"))
    assert out["line"] == "L7" and out["data_dir"] == str(root / "L7") and out["registry"] == str(reg)
    assert out["reason"].startswith("drift alarm on L7 at ")
    assert out["reason"].endswith(f"(event {out['event_id']}): mmd")
    # The event names labelled data: it wins. Its registry does not (the site's is what workers mount),
    # but the reason says so; the unlabelled recent sample is only pointed to.
    out = _render_like_the_server(params, drift_event("L7", registry="/elsewhere", data_dir="/d/new",
                                                      recent_dir="/recent/L7"))
    assert (out["data_dir"], out["registry"]) == ("/d/new", str(reg))
    assert "; recent images: /recent/L7" in out["reason"]
    assert f"the daemon serves from /elsewhere, retrained into {reg}" in out["reason"]
    out = _render_like_the_server(params, drift_event("L7", registry=reg))
    assert "daemon serves" not in out["reason"]
    # Resource labels only (no payload), the line taken from the resource id alone.
    ev = {"event": "defect.drift.detected", "resource": {"prefect.resource.id": "defect.line.L8",
                                                         "data_dir": "/lab/L8"}, "payload": {}}
    out = _render_like_the_server(params, ev)
    assert (out["line"], out["data_dir"]) == ("L8", "/lab/L8") and "None" not in out["reason"]
    with pytest.raises(ValueError, match="not usable"):
        drift_trigger_parameters(DeploymentSettings(registry=Path("/srv/it's"), data_root=root))
    with pytest.raises(ValueError, match="data root"):
        DeploymentSettings(registry=reg)  # the drift trigger needs somewhere labelled to train from
    DeploymentSettings(registry=reg, drift_trigger=False)  # no trigger, no schedules: no data root needed


def test_drift_templates_understand_the_daemons_event(tmp_path: Path) -> None:
    """The event the inference daemon really sends (pipeline.serve.drift) renders to a valid run."""
    from flows.deployments import DeploymentSettings, drift_trigger_parameters
    from pipeline.drift.monitor import DriftStatus
    from pipeline.serve.drift import build_drift_event

    status = DriftStatus(n_seen=96, detector="mmd", score=0.31, threshold=0.12, alarm=True, in_episode=True,
                         alarm_started=True, alarm_ended=False, episodes=1, scores={"mmd": 0.31},
                         thresholds={"mmd": 0.12})
    event = build_drift_event("line-3", status, model_version="v0004", model_sha256="ab" * 32,
                              registry=str(tmp_path / "models"), recent_dir="/var/lib/defect/recent")
    event = json.loads(json.dumps(event, default=str))  # as it travels
    params = drift_trigger_parameters(DeploymentSettings(registry=tmp_path / "models", data_root=tmp_path / "data"))
    out = _render_like_the_server(params, event)
    assert out["line"] == "line-3" and out["data_dir"] == str(tmp_path / "data" / "line-3")
    assert out["registry"] == str(tmp_path / "models") and out["event_id"] == event["id"]
    assert "mmd score 0.31 > threshold 0.12" in out["reason"] and "daemon serves" not in out["reason"]
    assert "; recent images: /var/lib/defect/recent" in out["reason"]


def test_prefect_yaml_matches_the_python_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/prefect.yaml, with the environment filled in as `prefect deploy` does, equals flows.deployments."""
    from prefect.utilities.templating import apply_values

    from flows.deployments import DRIFT_EVENT, DeploymentSettings, drift_trigger

    monkeypatch.setenv("DEFECT_REGISTRY", str(tmp_path / "models"))
    monkeypatch.setenv("DEFECT_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("DEFECT_WORK_POOL", "site-pool")
    spec = apply_values(yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text()), dict(os.environ),
                        remove_notset=False)
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"on-demand", "weekly", "on-drift"}
    assert spec["pull"] == [] and spec["build"] is None
    for d in deps.values():
        assert d["work_pool"]["name"] == "site-pool"
        assert d["parameters"] == {"registry": str(tmp_path / "models")}
    assert deps["on-demand"]["entrypoint"] == deps["weekly"]["entrypoint"] == "flows.retrain.retrain"
    assert deps["on-drift"]["entrypoint"] == "flows.adapt.readapt"
    assert "triggers" not in deps["on-demand"] and "triggers" not in deps["weekly"]
    (yaml_trigger,) = deps["on-drift"]["triggers"]
    py = drift_trigger(DeploymentSettings(registry=tmp_path / "models", data_root=tmp_path / "data"))
    assert yaml_trigger["parameters"] == py.parameters
    assert yaml_trigger["expect"] == [DRIFT_EVENT] and set(yaml_trigger["expect"]) == py.expect
    assert yaml_trigger["match"] == py.match.model_dump() and set(yaml_trigger["for_each"]) == py.for_each
    assert yaml_trigger["name"] == py.name and yaml_trigger["threshold"] == py.threshold


def test_retries_only_where_a_retry_can_help() -> None:
    from prefect.states import Failed

    from flows.retrain import _transient_io_error, evaluate_on, register, snapshot_data, train_challenger

    def retried(exc: BaseException) -> bool:
        return _transient_io_error(None, None, Failed(data=exc))

    assert retried(OSError(errno.EIO, "I/O error")) and retried(OSError(errno.ESTALE, "stale NFS handle"))
    for permanent in (FileNotFoundError("gone"), PermissionError("no"), ValueError("bad data"),
                      RegistryError("refused"), LineBusyError("busy"), RuntimeError("parity")):
        assert not retried(permanent), permanent
    assert snapshot_data.retries >= 1 and register.retries >= 1
    assert snapshot_data.retry_condition_fn is _transient_io_error is register.retry_condition_fn
    assert train_challenger.retries == 0 and evaluate_on.retries == 0  # deterministic: would fail again


# --------------------------------------------------------------------------- slow: real server + worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM the process group (worker + the flow runs it started), SIGKILL what is left after 20 s."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@pytest.mark.slow
def test_real_server_worker_run_deployment_and_drift_event(data_root: Path, tmp_path: Path) -> None:
    """`prefect server start` + `prefect worker start` as subprocesses: deploy (prefect.yaml, then
    `defect prefect setup`), run_deployment -> first champion, drift event -> better champion."""
    import httpx
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deployments import emit_drift_event

    port, pool, reg = _free_port(), "defect-training-slow", tmp_path / "models"
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false",
           "DEFECT_REGISTRY": str(reg), "DEFECT_DATA_ROOT": str(data_root), "DEFECT_WORK_POOL": pool,
           "PYTHONUNBUFFERED": "1"}
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    cli = [sys.executable, "-c", "import sys; from pipeline.cli.adapt_cmd import prefect_group; "
                                 "prefect_group(sys.argv[1:], prog_name='defect prefect')"]
    trained_cfg = _write_config(tmp_path / "trained.yaml", TRAINED)
    server = worker = None

    def logs() -> str:
        return f"\n--- server ---\n{_tail(server_log)}\n--- worker ---\n{_tail(worker_log)}"

    def run(cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
        p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, f"{cmd}: {p.stdout[-3000:]}\n{p.stderr[-3000:]}{logs()}"
        return p

    try:
        with open(server_log, "wb") as log:
            server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                       "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

        def healthy() -> bool:
            assert server.poll() is None, f"server exited{logs()}"
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(healthy, 180, "prefect server start", interval=1)
        run(cli + ["setup", "--work-pool", pool, "--registry", str(reg), "--data-root", str(data_root)])
        # The prefect.yaml route must give a working deployment too; setup then re-applies the site config.
        run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
             str(REPO / "deploy" / "prefect.yaml")], timeout=240)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            from prefect import get_client

            with get_client(sync_client=True) as client:
                dep = client.read_deployment_by_name("readapt/on-drift")
                autos = client.read_resource_related_automations(f"prefect.deployment.{dep.id}")
            assert dep.entrypoint == "flows.adapt.readapt" and dep.parameters == {"registry": str(reg)}
            assert [a.name for a in autos] == ["defect-drift-readapt"]
        run(cli + ["setup", "--work-pool", pool, "--registry", str(reg), "--data-root", str(data_root),
                   "--line", LINE, "--config", str(trained_cfg)])

        with open(worker_log, "wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                                       "--type", "process", "--limit", "1"], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

        with temporary_settings(updates={PREFECT_API_URL: url}):
            # 1. By hand: run_deployment waits for the worker to finish the run.
            first = run_deployment("retrain/on-demand", timeout=480, parameters={
                "line": LINE, "data_dir": str(data_root / LINE), "train_config": DEGENERATE, "reason": "slow: first"})
            assert first.state is not None and first.state.is_completed(), f"{first.state}{logs()}"
            assert read_champion(reg, LINE) == "v0001"

            # 2. A drift event: the automation runs readapt/on-drift with the site's (trained) config; the line's
            #    folder is labelled, so a supervised, warm-started retrain: a better model.
            emit_drift_event(LINE, summary="slow test drift")

            def drift_run_done() -> Any:
                runs = _flow_runs(dep.id)
                if runs and runs[0].state is not None and runs[0].state.is_final():
                    return runs[0]
                assert worker.poll() is None, f"worker exited{logs()}"
                return None

            second = _wait_for(drift_run_done, 480, "the drift-triggered run to finish", interval=2)
            assert second.state.is_completed(), f"{second.state}{logs()}"
            assert second.parameters["reason"].startswith(f"drift alarm on {LINE}")
            assert read_champion(reg, LINE) == "v0002", Registry(reg).history(LINE)
    finally:
        _stop(worker)
        _stop(server)
    assert server.returncode is not None and (worker is None or worker.returncode is not None)
