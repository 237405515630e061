"""`defect adapt` (retrain one line now) and `defect prefect ...` (deploy the retrain flow on a site).

``adapt`` runs the Prefect flow ``flows.retrain.retrain`` in this process: with ``PREFECT_API_URL``
set the run is recorded on that server (UI, artifacts, logs); without it Prefect starts a temporary
local server for the run (about half a minute). Parsing, checking and printing only: the work is
the flow's, the deployments are :mod:`flows.deployments`. Prefect and torch are imported inside the
commands.

Exit status: 0 done (promoted or not: read the output), 1 the run failed, 2 bad input (data,
config, names), 75 the line is busy (another retrain or promotion holds its lock; try later).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from pipeline.cli.registry_cmds import DEFAULT_REGISTRY

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_BUSY = 75  # sysexits EX_TEMPFAIL: the same command may succeed later

_registry_option = click.option(
    "--registry", "registry_dir", envvar="DEFECT_REGISTRY", show_envvar=True, default=DEFAULT_REGISTRY,
    show_default=True, type=click.Path(file_okay=False, path_type=Path), help="Registry root folder.")


def _fail(msg: str, code: int) -> None:
    click.secho("error: " + " ".join(str(msg).split()), fg="red", err=True)
    sys.exit(code)


def load_run_config(path: Path | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(train_config, gate) from a YAML/JSON file of TrainConfig fields, with an optional ``gate:`` section.

    Both are validated here (a typo fails before any training starts) and returned as plain dicts
    for the flow's parameters.
    """
    import yaml
    from pydantic import ValidationError

    from pipeline.gate import GateConfig
    from pipeline.train import TrainConfig

    if path is None:
        return {}, None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read config: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of TrainConfig fields, got {type(raw).__name__}")
    raw = dict(raw)
    gate = raw.pop("gate", None)
    try:
        TrainConfig(**raw)
        if gate is not None:
            if not isinstance(gate, dict):
                raise ValueError(f"{path}: 'gate' must be a mapping of GateConfig fields")
            GateConfig(**gate)
    except ValidationError as e:  # a misspelt field is one of these (the configs forbid unknown fields)
        raise ValueError(f"{path}: {e}") from e
    return raw, gate


def _check_data(data_dir: Path) -> dict[str, int]:
    """Image counts per class folder; ValueError/FileNotFoundError when this is no labelled dataset."""
    from pipeline.data.folders import scan_image_folder

    ds = scan_image_folder(data_dir)
    counts = ds.counts()
    empty = [c for c, n in counts.items() if n == 0]
    if not ds.samples:
        raise ValueError(f"{data_dir}: no images in the class folders {ds.classes}")
    if len([c for c, n in counts.items() if n > 0]) < 2:
        raise ValueError(f"{data_dir}: need images in at least two class folders, have {counts}")
    if empty:
        click.secho(f"warning: class folders without images: {', '.join(empty)}", fg="yellow", err=True)
    return counts


def _metrics_line(m: dict[str, Any] | None) -> str:
    if not m:
        return "-"

    def f(k: str) -> str:
        v = m.get(k)
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    return (f"bal.acc {f('balanced_accuracy')}  recall {f('defect_recall_at_frr')}  "
            f"FRR {f('false_reject_rate')}  n={f('n_images')}")


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@click.command("adapt")
@click.option("--line", required=True, help="Production line whose model is retrained.")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Labelled images, one folder per class; a share of it becomes the gate set.")
@_registry_option
@click.option("--shots", type=click.IntRange(min=1), help="Use only K labelled images per class (few-shot).")
@click.option("--reason", default="", help="Why: kept in the registry history and the run's artifact.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the gate split and training.")
@click.option("--warm-start", is_flag=True, help="Start from the champion's weights (same classes).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML/JSON of TrainConfig fields, plus an optional 'gate:' section of GateConfig fields.")
@click.option("--good-class", help="The defect-free class (default: the champion's, else guessed).")
@click.option("--target-frr", type=click.FloatRange(0, 1, max_open=True), default=0.02, show_default=True,
              help="False-reject rate the operating threshold is set for.")
@click.option("--gate-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.3,
              show_default=True, help="Share of --data held out to compare challenger and champion.")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=3600.0, show_default=True,
              help="Seconds to wait for the line lock if another retrain or promotion holds it.")
@click.option("--masks", "masks_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Pixel masks of the defect images, mirroring --data (<class>/<image stem>.png).")
@click.option("--json", "as_json", is_flag=True, help="Print the flow's result as one JSON object.")
def adapt(line: str, data_dir: Path, registry_dir: Path, shots: int | None, reason: str, seed: int,
          warm_start: bool, config_file: Path | None, good_class: str | None, target_frr: float,
          gate_fraction: float, wait_s: float, masks_dir: Path | None, as_json: bool) -> None:
    """Retrain LINE on --data now; promote the new version only if the gate says it is no worse.

    Runs the Prefect flow `retrain` in this process (reported to PREFECT_API_URL when set).
    Exit status: 0 done (promoted or not), 1 failed, 2 bad input, 75 line busy.
    """
    from pipeline.registry import InvalidNameError, LineBusyError, RegistryError, validate_name

    try:
        validate_name(line, "line")
        train_config, gate = load_run_config(config_file)
        _check_data(data_dir)
    except (InvalidNameError, ValueError, FileNotFoundError, NotADirectoryError) as e:
        _fail(str(e), EXIT_BAD_INPUT)

    from flows.retrain import retrain

    if _api_url() is None and not as_json:
        click.echo("PREFECT_API_URL is not set: this run uses a temporary local Prefect server.", err=True)
    try:
        result = retrain(line=line, data_dir=str(data_dir.absolute()), registry=str(registry_dir.absolute()),
                         shots=shots, reason=reason, good_class=good_class, gate_fraction=gate_fraction,
                         target_frr=target_frr, seed=seed, warm_start=warm_start,
                         train_config=train_config or None, gate=gate, lock_timeout_s=wait_s,
                         masks_dir=str(masks_dir.absolute()) if masks_dir else None)
    except LineBusyError as e:
        _fail(f"{e}; retry later or pass a longer --wait", EXIT_BUSY)
    except (FileNotFoundError, NotADirectoryError, InvalidNameError) as e:
        _fail(str(e), EXIT_BAD_INPUT)
    except (RegistryError, ValueError, OSError, RuntimeError) as e:
        _fail(f"retrain of {line!r} failed: {type(e).__name__}: {e}", EXIT_FAILED)

    if as_json:
        click.echo(json.dumps(result, default=str))
        return
    verdict = click.style("PROMOTED", fg="green", bold=True) if result["promoted"] else \
        click.style("not promoted", fg="yellow", bold=True)
    was = result["champion_before"] or "none"
    click.echo(f"{line}: {result['version']} registered, {verdict} (champion before: {was})")
    click.echo(f"  challenger  {_metrics_line(result['challenger'])}")
    click.echo(f"  champion    {_metrics_line(result['champion'])}")
    for r in result["reasons"]:
        click.echo(f"  gate: {r}")


@click.group("prefect")
def prefect_group() -> None:
    """Deploy the retrain flow on a Prefect server: work pool, deployments, drift automation."""


def _require_server() -> str:
    url = _api_url()
    if url is None:
        _fail("PREFECT_API_URL is not set. Start a server (prefect server start) and export "
              "PREFECT_API_URL=http://HOST:4200/api; a temporary server would forget everything", EXIT_BAD_INPUT)
    return url  # type: ignore[return-value]


@prefect_group.command("setup")
@click.option("--work-pool", default="defect-training", show_default=True,
              help="Process work pool the training machines' workers poll.")
@_registry_option
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path),
              help="<data-root>/<line> is the labelled folder a line retrains on (weekly, and on drift "
                   "when the event names no data_dir). Required unless --no-drift-trigger and no --line.")
@click.option("--line", "lines", multiple=True,
              help="Give LINE a weekly schedule (repeatable; default: the lines in the registry when "
                   "--data-root is given).")
@click.option("--cron", default="0 2 * * 0", show_default=True, help="Weekly schedule (cron syntax).")
@click.option("--timezone", default="UTC", show_default=True, help="IANA time zone of --cron.")
@click.option("--pool-concurrency", type=click.IntRange(min=1),
              help="Most retrains the pool runs at once over all its workers.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Site-wide TrainConfig (+ 'gate:') defaults for every deployed run.")
@click.option("--no-drift-trigger", is_flag=True, help="Do not create the drift automation.")
@click.option("--json", "as_json", is_flag=True, help="Print what was created as JSON.")
def setup_cmd(work_pool: str, registry_dir: Path, data_root: Path | None, lines: tuple[str, ...], cron: str,
              timezone: str, pool_concurrency: int | None, config_file: Path | None, no_drift_trigger: bool,
              as_json: bool) -> None:
    """Create or update the work pool, retrain/on-demand, retrain/weekly and readapt/on-drift (+ drift automation)."""
    from pydantic import ValidationError

    from flows.deployments import DeploymentSettings, apply_deployments
    from pipeline.registry import Registry

    url = _require_server()
    try:
        train_config, gate = load_run_config(config_file)
        defaults: dict[str, Any] = {}
        if train_config:
            defaults["train_config"] = train_config
        if gate:
            defaults["gate"] = gate
        if not lines and data_root is not None:
            lines = tuple(ln for ln in Registry(registry_dir).lines() if (data_root / ln).is_dir())
        settings = DeploymentSettings(work_pool=work_pool, registry=registry_dir, data_root=data_root,
                                      lines=list(lines), cron=cron, timezone=timezone,
                                      pool_concurrency=pool_concurrency, defaults=defaults,
                                      drift_trigger=not no_drift_trigger)
        result = apply_deployments(settings)
    except (ValidationError, ValueError) as e:
        _fail(str(e), EXIT_BAD_INPUT)
    except Exception as e:  # the server refused or is unreachable: say which server
        _fail(f"setup on {url} failed: {type(e).__name__}: {e}", EXIT_FAILED)
    if as_json:
        click.echo(result.model_dump_json())
        return
    click.echo(f"Prefect API {result.api_url}")
    click.echo(f"work pool   {result.work_pool} ({'created' if result.work_pool_created else 'exists'})")
    for name, dep_id in result.deployments.items():
        click.echo(f"deployment  {name}  {dep_id}")
    click.echo(f"automation  {', '.join(map(str, result.automation_ids)) or 'none'} (on defect.drift.detected)")
    click.echo(f"weekly      {', '.join(result.scheduled_lines) or 'no lines scheduled'} ({cron} {timezone})")
    click.echo(f"registry    {result.registry}   data root {result.data_root or '-'}")
    click.echo(f"\nOn each training machine: prefect worker start --pool {result.work_pool} --limit 1")


@prefect_group.command("emit-drift")
@click.option("--line", required=True, help="The line that drifted.")
@click.option("--registry", "registry_dir", envvar="DEFECT_REGISTRY", show_envvar=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Registry to retrain into (default: the one given at setup).")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Labelled folder to retrain on (default: what setup's --data-root gives).")
@click.option("--recent", "recent_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the recent images that drifted (for the record).")
@click.option("--summary", default="manual drift event", show_default=True, help="One line for the run's reason.")
def emit_drift_cmd(line: str, registry_dir: Path | None, data_dir: Path | None, recent_dir: Path | None,
                   summary: str) -> None:
    """Send a defect.drift.detected event for LINE, as the daemon does (to test the automation)."""
    from flows.deployments import emit_drift_event
    from pipeline.registry import InvalidNameError

    url = _require_server()
    try:
        event_id = emit_drift_event(line, registry=None if registry_dir is None else registry_dir.absolute(),
                                    data_dir=None if data_dir is None else data_dir.absolute(),
                                    recent_dir=None if recent_dir is None else recent_dir.absolute(),
                                    summary=summary)
    except InvalidNameError as e:
        _fail(str(e), EXIT_BAD_INPUT)
    except Exception as e:  # unreachable or refusing server
        _fail(f"sending the event to {url} failed: {type(e).__name__}: {e}", EXIT_FAILED)
    click.echo(event_id)


commands: list[click.Command] = [adapt, prefect_group]
