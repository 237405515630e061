"""`defect` commands for a model's life before serving: synth, train, evaluate, predict.

Torch is imported only inside ``train``; ``evaluate`` and ``predict`` run on ONNX Runtime alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pipeline.cli.progress import progress_bar
from pipeline.cli.synth_cmd import synth

commands: list[click.Command] = [synth]


def _fail(msg: str) -> None:
    click.secho(f"error: {msg}", fg="red", err=True)
    sys.exit(2)


@click.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder for model.onnx, model.json, metrics.json, report.html and plots.")
@click.option("--shots", type=click.IntRange(min=1), help="Use only K labelled images per class (few-shot).")
@click.option("--good-shots", type=click.IntRange(min=1),
              help="With --shots: label G good parts instead of K (a line has many more good parts than defects).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--good-class", help="The defect-free class folder (default: guessed from good/ok/free/normal).")
@click.option("--img-size", type=click.IntRange(32, 1024), help="Square input size (default: backbone's native).")
@click.option("--resize", type=click.Choice(["stretch", "letterbox"]), default="stretch", show_default=True)
@click.option("--backbone", default="efficientnet_lite0", show_default=True,
              help="efficientnet_lite0|1|2, or timm:<name> with timm installed.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="State dict for the backbone.")
@click.option("--epochs", type=click.IntRange(min=0), help="Fine-tuning epochs (stage 2).")
@click.option("--target-frr", default=0.02, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="False-reject rate the operating threshold is set for.")
@click.option("--validation-split", type=click.Choice(["auto", "all", "good"]), default="auto", show_default=True,
              help="Classes the validation split (threshold, report) takes images from: good = only good parts, "
                   "every defect image trains; auto = good when a defect class has fewer than 40 images.")
@click.option("--masks", "masks_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Pixel masks of the defect images, mirroring DATA_DIR (MASKS/<class>/<image stem>.png, non-zero "
                   "= defect): the per-cell head then learns which cells show the defect.")
@click.option("--threshold-images", "threshold_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder of good-part images (never trained on) whose scores also set the operating "
                   "threshold: a few-shot run validates on a handful of good parts, too few for a 2 % rate.")
@click.option("--head", type=click.Choice(["auto", "cells", "pooled"]), default=None,
              help="cells: every 32x32 cell is classified and the most defective decides; pooled: one prediction "
                   "from the image's mean features; auto (default): cells with --masks, else pooled.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML/JSON file with TrainConfig fields (command-line options win).")
def train(data_dir: Path, out_dir: Path, shots: int | None, good_shots: int | None, seed: int, good_class: str | None,
          img_size: int | None, resize: str, backbone: str, weights: str | None, epochs: int | None, target_frr: float,
          validation_split: str, masks_dir: Path | None, threshold_dir: Path | None, head: str | None,
          config_file: Path | None) -> None:
    """Fine-tune a pretrained backbone on DATA_DIR (one folder per class) and export a checked ONNX model."""
    from pipeline.backbones import MissingWeightsError
    from pipeline.cli.adapt_cmd import load_run_config
    from pipeline.run import RunConfig, run_training
    from pipeline.train import TrainConfig

    try:
        base, gate = load_run_config(config_file)
    except ValueError as exc:
        _fail(str(exc))
        return
    if gate is not None:
        _fail(f"{config_file}: a 'gate:' section applies to retrain and readapt (promotion), not to train")
        return
    overrides = {"seed": seed, "backbone": backbone, "resize": resize, "img_size": img_size, "weights": weights,
                 "head": head}
    if epochs is not None:
        overrides["finetune_epochs"] = epochs
    try:
        tcfg = TrainConfig(**{**base, **{k: v for k, v in overrides.items() if v is not None}})
        cfg = RunConfig(data_dir=data_dir, out_dir=out_dir, good_class=good_class, shots=shots,
                        good_shots=good_shots, target_frr=target_frr, validation_split=validation_split,
                        masks_dir=masks_dir, threshold_dir=threshold_dir, train=tcfg)
        with progress_bar() as update:
            summary = run_training(cfg, progress=update)
    except (MissingWeightsError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
        return
    m = summary.metrics
    for s in summary.skipped:
        click.secho(f"skipped unreadable {s['path']}: {s['error']}", fg="yellow", err=True)
    click.echo(f"model      {summary.onnx_path}")
    click.echo(f"report     {summary.out_dir / 'report.html'}")
    click.echo(f"classes    {', '.join(summary.metadata.classes)} (good: {summary.metadata.good_class})")
    click.echo(f"head       {summary.metadata.head}" + (f" ({summary.masked_images} defect training images with a mask)"
                                                        if masks_dir else " (no pixel masks)"))
    if m.get("n_defect"):
        click.echo(f"validation balanced accuracy {m['balanced_accuracy']:.3f}, defect recall "
                   f"{m['defect_recall_at_frr']:.3f} at false-reject rate {m['false_reject_rate']:.3f} "
                   f"(threshold {summary.metadata.threshold:.3f}, {m['n_images']} images)")
    else:  # validation_split "good": every defect image trained, only good parts were held back
        click.echo(f"validation good parts only (every defect image trained): false-reject rate "
                   f"{m['false_reject_rate']:.3f} at threshold {summary.metadata.threshold:.3f} ({m['n_images']} images)")
    click.echo(f"threshold  set on {m['threshold_good_images']} good images"
               + (f" ({m['threshold_extra_images']} from --threshold-images)" if threshold_dir else ""))
    if m.get("threshold_warning"):
        click.echo(f"warning    {m['threshold_warning']}")
    click.echo(f"parity     max |dp| {summary.parity['max_abs_prob_diff']:.1e}, top-1 agreement "
               f"{summary.parity['top1_agreement']:.0%} on {summary.parity['n_images']} images")
    click.echo("time       " + ", ".join(f"{k} {v:.1f}s" for k, v in summary.timings.items()))


@click.command()
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write report.html and plots here.")
def evaluate(model_path: Path, data_dir: Path, as_json: bool, report_dir: Path | None) -> None:
    """Evaluate MODEL_PATH (.onnx with its model.json) on DATA_DIR (one folder per class)."""
    from pipeline import evaluate as ev
    from pipeline.data.folders import scan_image_folder
    from pipeline.runtime import OnnxModel

    try:
        model = OnnxModel(model_path)
        ds = scan_image_folder(data_dir)
        with progress_bar(disable=as_json) as update:
            step = lambda d, n: update("evaluate", d, n)  # noqa: E731
            if report_dir:
                metrics, _, _ = ev.evaluate_to_dir(model, ds, report_dir, progress=step)
            else:
                metrics, _ = ev.evaluate_model(model, ds, progress=step)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(str(exc))
        return
    metrics["model"] = str(model_path)
    if as_json:
        click.echo(json.dumps(metrics))
        return
    click.echo(f"{metrics['n_images']} images, balanced accuracy {metrics['balanced_accuracy']:.3f}, "
               f"defect recall {metrics['defect_recall_at_frr']:.3f} at false-reject rate "
               f"{metrics['false_reject_rate']:.3f} (threshold {metrics['threshold']:.3f})")
    for name, pc in metrics["per_class"].items():
        if pc["support"]:
            click.echo(f"  {name:<14} recall {pc['recall']:.3f}  precision {pc['precision'] or 0:.3f}  n={pc['support']}")


@click.command()
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
def predict(model_path: Path, paths: tuple[Path, ...]) -> None:
    """Classify images (files or folders): one JSON line per image; unreadable files give an error line."""
    from pipeline.data.decode import IMAGE_EXTENSIONS, ImageDecodeError, decode_file
    from pipeline.runtime import OnnxModel

    try:
        model = OnnxModel(model_path)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(str(exc))
        return
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            files.append(p)
    failed = 0
    step = model.options.max_batch
    for i in range(0, len(files), step):  # chunks keep memory flat; lines come out in input order
        rows: list[dict] = []
        decoded = []
        for f in files[i:i + step]:
            try:
                decoded.append((len(rows), decode_file(f, spec=model.metadata.preprocess)))
                rows.append({"path": str(f)})
            except (ImageDecodeError, OSError) as exc:
                failed += 1
                kind = getattr(exc, "kind", type(exc).__name__)
                rows.append({"path": str(f), "class": None, "probabilities": None, "defect_score": None,
                             "decision": None, "error": f"{kind}: {exc}"})
        if decoded:
            for (j, _), pr in zip(decoded, model.predict([im for _, im in decoded])):
                rows[j].update(pr.as_dict(), error=None)
        for row in rows:
            click.echo(json.dumps(row))
    if failed:
        sys.exit(1)


commands += [train, evaluate, predict]


@click.command()
@click.option("--workdir", default="demo", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, type=int)
def demo(workdir: Path, seed: int) -> None:
    """The closed loop on generated images: train, serve, lamp change, drift alarm, re-adapt, gate, hot-swap."""
    from pipeline.demo import DemoConfig, run_demo

    say = lambda msg: click.secho(f"[demo] {msg}", fg="cyan", err=True)  # noqa: E731
    with progress_bar() as update:
        s = run_demo(DemoConfig(workdir=workdir, seed=seed), progress=update, say=say)
    click.echo("")
    click.secho("defect-pipeline demo: summary", bold=True)
    for name, m in s.metrics.items():
        click.echo(f"  {name:<28} balanced accuracy {m['balanced_accuracy']:.3f}, defect recall "
                   f"{m['defect_recall_at_frr']:.3f} at false-reject rate {m['false_reject_rate']:.3f}")
    click.echo(f"  drift alarm after  {s.images_to_alarm} images of the new lamp")
    click.echo(f"  re-adaptation      {s.v2} {'promoted' if s.promoted else 'NOT promoted'} over {s.v1}"
               + (f" {s.alarm_to_promotion_s:.0f} s after the alarm" if s.alarm_to_promotion_s else "")
               + (f"; serving {s.alarm_to_swap_s:.0f} s after the alarm (target <= 600 s)" if s.alarm_to_swap_s else ""))
    if s.alarms_after_swap is not None:
        click.echo(f"  after the swap     {s.alarms_after_swap} drift alarms from the new model on the new lamp")
    click.echo(f"  exactly once       {s.n_streamed} images streamed, {s.n_results} with one result each")
    click.echo(f"  report             {s.report}")


commands.append(demo)
