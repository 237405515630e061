"""`defect registry` commands: list, show, register, promote, rollback, history.

Parsing and printing only; the work is :class:`pipeline.registry.Registry`. Errors end as one
line on stderr and exit status 1.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click

from pipeline.registry import LineBusyError, ModelVersion, Registry, RegistryError, line_lock, read_champion

DEFAULT_REGISTRY = "models"

_registry_option = click.option(
    "--registry", "registry_dir", envvar="DEFECT_REGISTRY", show_envvar=True, default=DEFAULT_REGISTRY,
    show_default=True, type=click.Path(file_okay=False), help="Registry root folder.")
_json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output (JSON lines).")
_wait_option = click.option(
    "--wait", type=click.FloatRange(min=0), default=0.0, show_default=True,
    help="Seconds to wait for the line lock if a retrain or promotion holds it.")


def _errors_to_click(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Registry refusals become a one-line ``Error: ...`` on stderr with exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LineBusyError as e:
            raise click.ClickException(f"{e} (retry later or pass --wait SECONDS)") from e
        except (RegistryError, ValueError, OSError) as e:
            raise click.ClickException(" ".join(str(e).split())) from e
    return wrapper


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _print_versions_table(versions: list[ModelVersion], title: str) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    show_line = len({v.line for v in versions}) > 1
    table = Table(title=title, box=box.SIMPLE_HEAD, caption="* champion; recall = defect recall at the operating FRR",
                  pad_edge=False, collapse_padding=True)
    cols = (["line"] if show_line else []) + ["version", "registered", "bal.acc", "recall", "FRR", "n",
                                              "sha256", "note"]
    for col in cols:
        table.add_column(col, no_wrap=col in ("version", "registered", "sha256"),
                         justify="right" if col in ("bal.acc", "recall", "FRR", "n") else "left")
    for v in versions:
        m = v.metrics
        row = [v.version + (" *" if v.champion else ""), v.created.strftime("%Y-%m-%d %H:%M"),
               _fmt(m.get("balanced_accuracy")), _fmt(m.get("defect_recall_at_frr")),
               _fmt(m.get("false_reject_rate")), _fmt(m.get("n_images")), v.onnx_sha256[:8], v.note or ""]
        table.add_row(*([v.line] if show_line else []), *row)
    Console().print(table)


@click.group("registry")
def registry() -> None:
    """Model versions per line, the champion pointer, promotion and rollback."""


@registry.command("list")
@click.argument("line", required=False)
@_registry_option
@_json_option
@_errors_to_click
def list_cmd(line: str | None, registry_dir: str, as_json: bool) -> None:
    """List registered versions (of LINE, or of every line)."""
    versions = Registry(registry_dir).list_versions(line)
    if as_json:
        for v in versions:
            click.echo(json.dumps(v.summary(), default=str))
        return
    if not versions:
        click.echo(f"no models in registry {registry_dir}" + (f" for line {line!r}" if line else ""))
        return
    _print_versions_table(versions, f"registry {registry_dir}" + (f", line {line}" if line else ""))


@registry.command("show")
@click.argument("line")
@click.argument("version")
@_registry_option
@_json_option
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Re-hash the version's files against the sha256 recorded at registration.")
@_errors_to_click
def show_cmd(line: str, version: str, registry_dir: str, as_json: bool, verify: bool) -> None:
    """Metadata, metrics and file checksums of one version."""
    reg = Registry(registry_dir)
    info = reg.show(line, version)
    integrity = "not checked"
    if verify:
        try:
            reg.verify(line, version)
            integrity = "ok"
        except RegistryError as e:
            integrity = f"FAILED: {e}"
    meta = json.loads((info.path / "model.json").read_text(encoding="utf-8"))
    out = {**info.summary(), "integrity": integrity, "source": info.source, "user": info.user,
           "files": info.files, "metadata": {k: v for k, v in meta.items() if k != "metrics"}}
    if as_json:
        click.echo(json.dumps(out, default=str))
    else:
        from rich.console import Console
        from rich.pretty import Pretty

        Console().print(Pretty(out, expand_all=False))
    if integrity not in ("ok", "not checked"):
        raise click.ClickException(f"{line}/{version}: integrity check {integrity}")


@registry.command("register")
@click.argument("line")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--version", "version", default=None, help="Version name (default: next v0001, v0002, ...).")
@click.option("--note", default=None, help="Free text kept with the version.")
@_registry_option
@_json_option
@_errors_to_click
def register_cmd(line: str, run_dir: str, version: str | None, note: str | None, registry_dir: str,
                 as_json: bool) -> None:
    """Copy an exported run folder (model.onnx + model.json, metrics, report...) into LINE as a new version."""
    info = Registry(registry_dir).register(line, run_dir, version=version, note=note)
    click.echo(json.dumps(info.summary(), default=str) if as_json else f"registered {info.line}/{info.version}")


@registry.command("promote")
@click.argument("line")
@click.argument("version")
@click.option("--reason", default="manual promotion", show_default=True, help="Recorded in history.jsonl.")
@_wait_option
@_registry_option
@_json_option
@_errors_to_click
def promote_cmd(line: str, version: str, reason: str, wait: float, registry_dir: str, as_json: bool) -> None:
    """Make VERSION the champion of LINE (refused while a retrain of the line holds its lock)."""
    reg = Registry(registry_dir)
    reg.show(line, version)  # unknown line/version: fail before creating any lock file
    with line_lock(registry_dir, line, timeout=wait) as lock:
        before = read_champion(registry_dir, line)
        info = reg.promote(line, version, reason, lock=lock)
    if as_json:
        click.echo(json.dumps({**info.summary(), "previous": before}, default=str))
    elif before == info.version:
        click.echo(f"{line}/{version} is already the champion")
    else:
        click.echo(f"promoted {line}/{version} (previous champion: {before or 'none'})")


@registry.command("rollback")
@click.argument("line")
@click.option("--reason", default="manual rollback", show_default=True, help="Recorded in history.jsonl.")
@_wait_option
@_registry_option
@_json_option
@_errors_to_click
def rollback_cmd(line: str, reason: str, wait: float, registry_dir: str, as_json: bool) -> None:
    """Make the previous champion of LINE the champion again."""
    reg = Registry(registry_dir)
    if read_champion(registry_dir, line) is None:
        raise click.ClickException(f"line {line!r} has no champion in {registry_dir} to roll back from")
    with line_lock(registry_dir, line, timeout=wait) as lock:
        before = read_champion(registry_dir, line)
        info = reg.rollback(line, reason, lock=lock)
    if as_json:
        click.echo(json.dumps({**info.summary(), "previous": before}, default=str))
    else:
        click.echo(f"rolled {line} back to {info.version} (was {before or 'none'})")


@registry.command("history")
@click.argument("line")
@_registry_option
@_json_option
@_errors_to_click
def history_cmd(line: str, registry_dir: str, as_json: bool) -> None:
    """Promotions and rollbacks of LINE, oldest first."""
    entries = Registry(registry_dir).history(line)
    for e in entries:
        if as_json:
            click.echo(e.model_dump_json())
        else:
            click.echo(f"{e.time.isoformat(timespec='seconds')}  {e.action:<8} {e.version:<10} "
                       f"(was {e.previous or '-'})  by {e.user or '-'}: {e.reason}")
    if not entries and not as_json:
        click.echo(f"no promotions recorded for line {line!r}")


commands: list[click.Command] = [registry]
