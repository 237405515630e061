"""Command line of the serve area: ``serve`` (the daemon) and ``results`` (read the results DB).

Parsing only: the daemon is ``pipeline.serve.Daemon``. Nothing here imports torch. It lives in the
serve package (and ``pipeline.cli.serve_cmds`` re-exports it into ``defect``) so that
``python -m pipeline.serve`` on an inference host does not depend on the training-side command
modules importing cleanly.
"""

from __future__ import annotations

import json
import sqlite3
import sys

import click


def _settings_error(exc: Exception) -> click.UsageError:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        lines = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"]) or "settings"
            lines.append(f"{where}: {err['msg']}")
        return click.UsageError("invalid settings:\n  " + "\n  ".join(lines))
    return click.UsageError(str(exc))


@click.command("serve")
@click.option("--model", "model", help="model.onnx (with its model.json) or a registry folder (needs --line)")
@click.option("--db", type=click.Path(dir_okay=False), help="SQLite results database (created if missing)")
@click.option("--line", help="production line whose registry champion is served")
@click.option("--precision", type=click.Choice(["fp32", "int8", "fp16"]),
              help="serve model.int8.onnx / model.fp16.onnx beside the model (fp32 when absent) [fp32]")
@click.option("--watch", type=click.Path(file_okay=False), help="hot folder to process")
@click.option("--http", "http", metavar="HOST:PORT", help="serve the HTTP API (default host 127.0.0.1)")
@click.option("--camera", metavar="SRC", help="device index, RTSP/HTTP URL or video file")
@click.option("--camera-fps", type=float, help="frames sampled per second (0 = every frame) [2]")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML settings file (flags > DEFECT_* env > file > defaults)")
@click.option("--max-batch", type=int, help="images per model batch [16]")
@click.option("--infer-batch", type=int, help="images per ONNX Runtime call; 0 = auto (4 on CPU) [0]")
@click.option("--max-wait-ms", type=float, help="longest wait for a batch to fill [20]")
@click.option("--workers", type=int, help="decode/preprocess threads [2]")
@click.option("--inference-streams", type=int,
              help="ONNX Runtime calls at once; 0 = auto (2 on a CPU host with >= 2 cores and a folder or "
                   "camera source, else 1) [0]")
@click.option("--intra-op-threads", type=int, help="ONNX Runtime threads per call; 0 = auto [0]")
@click.option("--max-queue", type=int, help="images accepted but not committed [32]")
@click.option("--max-upload-bytes", type=int, help="HTTP upload limit -> 413 [32 MiB]")
@click.option("--max-pixels", type=int, help="refuse decoded images larger than this [50e6]")
@click.option("--poll-interval", "poll_interval_s", type=float, help="hot-folder scan period, s [0.2]")
@click.option("--model-poll-interval", "model_poll_interval_s", type=float,
              help="model / CHAMPION change check period, s [2]")
@click.option("--drain-timeout", "drain_timeout_s", type=float, help="on SIGTERM, time to finish accepted images [30]")
@click.option("--exit-when-done/--no-exit-when-done", default=None,
              help="exit once the video file ended / the hot folder is empty (batch mode)")
@click.option("--drift/--no-drift", default=None,
              help="monitor drift against the model's reference (on when the model has one) [on]")
@click.option("--emit-events/--no-emit-events", "emit_prefect_events", default=None,
              help="send defect.drift.detected to Prefect (PREFECT_API_URL) when a drift episode starts [off]")
@click.option("--event-min-interval", "drift_event_min_interval_s", type=float,
              help="at most one drift event per this many seconds [1800]")
@click.option("--drift-log-interval", "drift_log_interval_s", type=float,
              help="write drift scores to the database at most this often, s; 0 = every window [60]")
@click.option("--recent-dir", type=click.Path(file_okay=False),
              help="keep a bounded sample of recent scored images here (what re-adaptation learns from)")
@click.option("--recent-every", type=int, help="keep 1 of every N scored images [10]")
@click.option("--recent-max-images", type=int, help="images kept in --recent-dir [500]")
@click.option("--observer", "observers", multiple=True, help="'module:factory' batch observer (repeatable)")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="log lines as text or JSON [text]")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def serve(config_file: str | None, observers: tuple[str, ...], **flags: object) -> None:
    """Run the inference daemon until SIGTERM/SIGINT: score images from a hot folder, HTTP and/or a
    camera with ONNX Runtime, store one row per image in SQLite, follow model updates."""
    from pipeline.serve.config import load_settings

    if observers:
        flags["observers"] = list(observers)
    try:
        settings = load_settings(config_file, **flags)
    except Exception as exc:
        raise _settings_error(exc) from None

    from pipeline.serve.daemon import Daemon
    from pipeline.serve.logs import configure_logging
    from pipeline.serve.models import ModelRefused

    configure_logging(settings.log_format, settings.log_level)
    try:
        daemon = Daemon(settings)
    except ModelRefused as exc:
        raise click.ClickException(f"cannot serve the model ({exc.reason}): {exc}") from None
    except (OSError, ValueError, sqlite3.Error, RuntimeError) as exc:  # paths, DB, observers
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    try:
        code = daemon.run()
    except (RuntimeError, OSError, ValueError) as exc:  # the HTTP address is taken, an unusable hot folder
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


@click.command("results")
@click.argument("db", type=click.Path(exists=True, dir_okay=False))
@click.option("--since", help="only rows at or after this ISO 8601 time")
@click.option("--limit", type=click.IntRange(min=0), default=50, show_default=True,
              help="rows to show (latest ones when --since is not given)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def results(db: str, since: str | None, limit: int, as_json: bool) -> None:
    """Show stored inference results from a daemon's SQLite database."""
    from pipeline.serve.store import read_results

    try:
        rows = read_results(db, since=since, limit=limit)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    if as_json:
        for r in rows:
            click.echo(json.dumps(r.as_dict()))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} results from {db}")
    for col in ("id", "time (UTC)", "source", "model", "class", "score", "decision", "ms", "error"):
        table.add_column(col, overflow="fold", no_wrap=col in ("id", "time (UTC)", "ms"))
    for r in rows:
        err = f"{r.error_kind}: {r.error_message}" if r.error_kind else ""
        table.add_row(str(r.id), r.ts, r.source, r.model_version or "", r.label or "",
                      "" if r.defect_score is None else f"{r.defect_score:.3f}",
                      r.decision, "" if r.latency_ms is None else f"{r.latency_ms:.1f}", err)
    Console().print(table)

