"""`defect` commands for the drift area."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.drift.reference import DEFAULT_DETECTOR, DETECTORS


@click.group("drift")
def drift() -> None:
    """Check images against a model's in-domain drift reference."""


@drift.command("check")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a sentence.")
@click.option("--detector", type=click.Choice(DETECTORS), default=DEFAULT_DETECTOR, show_default=True,
              help="Detector that decides the verdict (all are reported).")
@click.option("--false-alarm-rate", type=click.FloatRange(0.0, 0.5, min_open=True), default=0.01, show_default=True,
              help="Probability of reporting drift for a folder of in-domain images.")
@click.option("--reference", "reference", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Drift reference .npz (default: the one named in the model's metadata).")
@click.option("--max-images", type=click.IntRange(min=1), help="Use only the first N images (sorted by path).")
@click.option("--fail-on-drift", is_flag=True, help="Exit with status 3 when drift is found.")
def check(model: Path, folder: Path, as_json: bool, detector: str, false_alarm_rate: float,
          reference: Path | None, max_images: int | None, fail_on_drift: bool) -> None:
    """Does the image folder FOLDER (any layout) still look like MODEL's in-domain data?"""
    from pipeline.drift.check import check_folder, format_check
    from pipeline.drift.reference import DriftReferenceError
    from pipeline.runtime import ModelIntegrityError

    try:
        result = check_folder(model, folder, detector=detector, false_alarm_rate=false_alarm_rate,
                              reference=reference, max_images=max_images)
    except (DriftReferenceError, ModelIntegrityError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result) if as_json else format_check(result))
    if fail_on_drift and result["drift"]:
        raise SystemExit(3)


commands: list[click.Command] = [drift]
