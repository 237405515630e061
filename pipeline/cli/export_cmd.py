"""`defect export RUN_DIR --int8 / --fp16`: reduced-precision models beside a run's fp32 model.

Parsing and printing only; the work is ``pipeline.export.precision`` (ONNX Runtime + numpy, no torch).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

commands: list[click.Command] = []


def _summary(name: str, path: Path, sha: str | None, report: dict[str, Any]) -> str:
    head = f"{name:<5} {path} (sha256 {(sha or '')[:12]}…)"
    if report.get("status") == "skipped":
        return f"{head}\n      check skipped: {report['reason']}"
    return (f"{head}\n      on {report['n_images']} images of the {report['images']}: balanced accuracy "
            f"{report['balanced_accuracy']:.3f} vs fp32 {report['balanced_accuracy_fp32']:.3f} "
            f"({100 * report['balanced_accuracy_change']:+.2f} points), top-1 agreement "
            f"{100 * report['top1_agreement']:.1f} %, decisions agree {100 * report['decision_agreement']:.1f} %, "
            f"max |dp| {report['max_abs_prob_diff']:.3f} ({report['provider']})")


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--int8", "int8", is_flag=True, help="Write model.int8.onnx: static INT8 (QDQ, per-channel weights).")
@click.option("--fp16", "fp16", is_flag=True,
              help="Write model.fp16.onnx for CUDA/TensorRT hosts (checked where CUDA initialises).")
@click.option("--calib", "calib_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of line images to calibrate INT8 on [default: the run's training images].")
@click.option("--data", "data_root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Where the run's training data is now, if it moved [default: data_dir in manifest.json].")
@click.option("--check-data", "check_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Labelled folder (one sub-folder per class) to check against fp32 on [default: every image "
                   "of the run's data folder not used for training: validation split + images left out of the shots].")
@click.option("--max-drop", default=1.0, show_default=True, type=click.FloatRange(0, 100),
              help="Largest balanced-accuracy loss vs fp32 allowed, in points; a worse model is not published.")
@click.option("--calib-method", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax",
              show_default=True, help="How INT8 activation ranges are set from the calibration images.")
@click.option("--calib-images", type=click.IntRange(min=1), default=128, show_default=True,
              help="Calibration images used at most.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def export(run_dir: Path, int8: bool, fp16: bool, calib_dir: Path | None, data_root: Path | None,
           check_dir: Path | None, max_drop: float, calib_method: str, calib_images: int, as_json: bool) -> None:
    """Write INT8 and/or FP16 versions of RUN_DIR/model.onnx beside it, each with model.<precision>.json.

    Each is compared with the fp32 model on labelled images (top-1 agreement, balanced-accuracy change)
    and published only if it loses at most --max-drop points. Exit status 1 when one is refused."""
    from pipeline.export.calibration import CalibrationDataError
    from pipeline.export.precision import PrecisionError, QuantConfig, export_fp16, export_int8

    if not (int8 or fp16):
        raise click.UsageError("nothing to do: give --int8 and/or --fp16")
    if calib_dir is not None and not int8:
        raise click.UsageError("--calib is for --int8")
    out: dict[str, Any] = {}
    refused: dict[str, str] = {}
    jobs = []
    if int8:
        cfg = QuantConfig(calibrate_method=calib_method, max_images=calib_images)
        jobs.append(("int8", lambda: export_int8(run_dir, calib_dir=calib_dir, data_root=data_root,
                                                 check_dir=check_dir, config=cfg, max_drop=max_drop / 100)))
    if fp16:
        jobs.append(("fp16", lambda: export_fp16(run_dir, data_root=data_root, check_dir=check_dir,
                                                 max_drop=max_drop / 100)))
    for name, job in jobs:
        try:
            res = job()
        except PrecisionError as exc:
            refused[name] = str(exc)
            if not as_json:
                click.secho(f"error: {exc}", fg="red", err=True)
            continue
        except (CalibrationDataError, ValueError, FileNotFoundError, RuntimeError) as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)
        out[name] = {"path": str(res.path), "sha256": res.metadata.onnx_sha256, "parity": res.report}
        if not as_json:
            click.echo(_summary(name, res.path, res.metadata.onnx_sha256, res.report))
    if as_json:
        click.echo(json.dumps({"published": out, "refused": refused}))
    if refused:
        sys.exit(1)


commands.append(export)
