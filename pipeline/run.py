"""One training run, start to finish: data -> fine-tune -> threshold -> export + parity -> drift reference -> report.

This is the library-level composition behind ``defect train``; the Prefect flow calls the same
steps as separate tasks. Everything a run produces lands in ``out_dir``:
``model.onnx``, ``model.json``, ``metrics.json``, ``manifest.json``, ``drift_reference.npz``,
``report.html`` and PNG plots.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.data.folders import (ImageFolder, guess_good_class, manifest_sha256, sample_shots, scan_image_folder,
                                   stratified_split)
from pipeline.metadata import ModelMetadata, write_json_atomic
from pipeline.train import Progress, TrainConfig, TrainResult

log = logging.getLogger(__name__)

DRIFT_REFERENCE_FILE = "drift_reference.npz"


class RunConfig(BaseModel):
    """What to train on and how to split it; the recipe itself is ``train``."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent default

    data_dir: Path
    out_dir: Path
    good_class: str | None = None
    shots: int | None = Field(None, ge=1)
    # labelled good parts when ``shots`` samples the set (default: ``shots`` too). Good parts are what a line
    # has most of: measured on magnetic-tile, 20 per defect class and 300 good ones beat 20 good ones.
    good_shots: int | None = Field(None, ge=1)
    val_fraction: float = Field(0.25, gt=0, lt=1)
    # Which classes lend images to the validation split. The split serves the operating threshold (good
    # parts' scores only) and the run's report; the fixed training schedule does not pick epochs on it.
    # "good": only the good class is split and every defect image trains, where defect images are scarce
    # (measured on magnetic-tile, 20 shots: see BENCHMARKS.md core); "all": every class is split (the
    # report then has defect recall on unseen images); "auto": "good" when the smallest defect class has
    # fewer than SCARCE_DEFECT_IMAGES images to learn from, else "all".
    validation_split: Literal["auto", "all", "good"] = "auto"
    target_frr: float = Field(0.02, ge=0, lt=1)
    # pixel masks of the defect images, mirroring data_dir (``<class>/<stem>.png``): the per-cell head then
    # learns which cells show the defect and which good surface (see pipeline.data.masks)
    masks_dir: Path | None = None
    # more good-part images (not labelled otherwise, never trained on) whose scores set the operating threshold
    # beside the validation split's good parts: a few-shot run has ~5 of those, too few for a 2 % quantile
    threshold_dir: Path | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _good_shots_need_shots(self) -> RunConfig:
        if self.good_shots and not self.shots:
            raise ValueError("good_shots (--good-shots) samples the good class of a few-shot run: give shots too")
        return self


@dataclass
class RunSummary:
    out_dir: Path
    onnx_path: Path
    metadata: ModelMetadata
    metrics: dict
    parity: dict
    timings: dict[str, float]
    counts: dict[str, dict[str, int]]
    skipped: list[dict]
    masked_images: int = 0  # defect training images that had a pixel mask


def split_dataset(ds: ImageFolder, cfg: RunConfig, good_class: str
                  ) -> tuple[ImageFolder, ImageFolder, ImageFolder | None]:
    """(train, val, remainder). With ``shots`` only K images per class are labelled: train and val both
    come from those K; the rest is returned for honest held-out testing. ``cfg.validation_split`` decides
    which classes the validation split takes images from."""
    seed = cfg.train.seed
    remainder = None
    pool = ds
    if cfg.shots:
        pool, remainder = sample_shots(ds, cfg.shots, seed, {good_class: cfg.good_shots} if cfg.good_shots else None)
    train_set, val_set = stratified_split(pool, cfg.val_fraction, seed)
    if validation_classes(pool.counts(), good_class, cfg) == "good":  # every defect image trains
        gi = pool.classes.index(good_class)
        keep = [s for s in val_set.samples if s.label == gi]
        train_set = pool.subset(train_set.samples + [s for s in val_set.samples if s.label != gi])
        val_set = pool.subset(keep)
    return train_set, val_set, remainder


SCARCE_DEFECT_IMAGES = 40


def validation_classes(counts: dict[str, int], good_class: str, cfg: RunConfig) -> str:
    """``cfg.validation_split`` resolved for a labelled pool with these images per class: "good" or "all"."""
    if cfg.validation_split != "auto":
        return cfg.validation_split
    defect_counts = [n for name, n in counts.items() if name != good_class]
    return "good" if defect_counts and min(defect_counts) < SCARCE_DEFECT_IMAGES else "all"


def fit_threshold(val_good_scores: np.ndarray, target_frr: float) -> float:
    """Operating threshold on validation good-part scores (see ``pipeline.evaluate.choose_threshold``)."""
    from pipeline.evaluate import choose_threshold

    return float(choose_threshold(val_good_scores, target_frr))


def threshold_image_scores(result: TrainResult, folder: Path, used: list[ImageFolder]) -> np.ndarray:
    """Defect scores of the good-part images under ``folder`` (recursively) for the threshold.

    Images of the ``used`` sets are left out: training images score optimistically, validation images
    are counted already. Unreadable ones are reported and skipped. ValueError when none is left: the
    folder was meant to count.
    """
    import torch

    from pipeline.data.augment import load_images
    from pipeline.data.folders import Sample, list_images
    from pipeline.train import embed

    root = Path(folder)
    seen = {os.path.realpath(s.path) for ds in used for s in ds.samples}
    files = list_images(root)
    keep = [p for p in files if os.path.realpath(p) not in seen]
    if len(keep) < len(files):
        log.warning("%d threshold images are the run's training or validation images and were left out",
                    len(files) - len(keep))
    x, _, skipped = load_images(ImageFolder(root, [result.good_class], [Sample(p, 0) for p in keep]), result.spec)
    for s in skipped:
        log.warning("skipped unreadable threshold image %s: %s", s["path"], s["error"])
    if len(x) == 0:
        raise ValueError(f"{root}: no readable good-part image that was not trained on, for the threshold")
    _, probs = embed(result.model, x, result.spec, torch.device("cpu"))
    return 1.0 - probs[:, result.classes.index(result.good_class)]


def export_and_check(result: TrainResult, out_dir: Path, threshold: float, target_frr: float, metrics: dict,
                     manifest_hash: str, check_paths: list[Path]) -> tuple[Path, ModelMetadata, dict]:
    """ONNX + metadata, then the runtime-vs-torch parity check on real images; a failing export is removed."""
    from pipeline.export import finalize_artefact, export_onnx, load_check_images, parity_check, remove_artefact
    from pipeline.metadata import precision_path

    for stale in ("int8", "fp16"):  # made from the model being replaced: never serve them beside the new one
        remove_artefact(precision_path(out_dir / "model.onnx", stale))
    onnx_path = export_onnx(result.model, result.spec, out_dir / "model.onnx")
    meta = ModelMetadata(
        classes=result.classes, good_class=result.good_class, preprocess=result.spec,
        threshold=threshold, target_frr=target_frr, frr_at_threshold=metrics.get("false_reject_rate"),
        metrics={k: metrics[k] for k in ("balanced_accuracy", "defect_recall_at_frr", "false_reject_rate", "auroc",
                                         "n_images") if k in metrics},
        backbone=result.config.backbone, head=result.model.head_mode, embedding_dim=int(result.val_embeddings.shape[1]),
        train_manifest_sha256=manifest_hash, drift_reference=DRIFT_REFERENCE_FILE, opset=17,
        extra={"train_config": result.config.model_dump(mode="json"), "best_epoch": result.best_epoch},
    )
    meta = finalize_artefact(onnx_path, meta)
    try:
        parity = parity_check(result.model, onnx_path, load_check_images(check_paths)).as_dict()
    except Exception:
        onnx_path.unlink(missing_ok=True)
        onnx_path.with_suffix(".json").unlink(missing_ok=True)
        raise
    return onnx_path, meta, parity


def fit_drift_reference(result: TrainResult, out_dir: Path) -> Path:
    """Reference statistics of the training domain, saved beside the model."""
    from pipeline.data.decode import decode_file
    from pipeline.drift import fit_reference, image_statistics

    stats, embs, probs = [], [], []
    sources = [(result.train_set, result.train_embeddings, result.train_probs),
               (result.val_set, result.val_embeddings, result.val_probs)]
    skipped = {s["path"] for s in result.skipped}
    for ds, e, p in sources:
        readable = [s for s in ds.samples if str(s.path) not in skipped]
        for sample, emb, prob in zip(readable, e, p):
            stats.append(image_statistics(decode_file(sample.path, spec=result.spec)))
            embs.append(emb)
            probs.append(prob)
    ref = fit_reference(np.asarray(embs), np.asarray(stats), np.asarray(probs), seed=result.config.seed)
    path = out_dir / DRIFT_REFERENCE_FILE
    ref.save(path)
    return path


def run_training(cfg: RunConfig, progress: Progress | None = None, dataset: ImageFolder | None = None,
                 init_checkpoint: str | os.PathLike | None = None) -> RunSummary:
    """Train, pick the operating threshold, export with parity, fit the drift reference, write the report.

    ``dataset``: train on this subset of ``cfg.data_dir`` (e.g. what a retrain keeps after holding out its
    gate set). ``init_checkpoint``: warm-start from a previous model's ``checkpoint.npz`` (same classes).
    """
    from pipeline import evaluate
    from pipeline.train import CHECKPOINT_FILE, load_checkpoint, save_checkpoint, train

    t_start = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = dataset if dataset is not None else scan_image_folder(cfg.data_dir)
    good = cfg.good_class or guess_good_class(ds.classes)
    if good not in ds.classes:
        raise ValueError(f"--good-class {good!r} is not a class folder of {cfg.data_dir} ({ds.classes})")
    train_set, val_set, remainder = split_dataset(ds, cfg, good)
    manifest = {"data_dir": os.path.abspath(cfg.data_dir),  # absolute: replay and INT8 calibration read it
                "train": train_set.manifest(), "val": val_set.manifest()}
    manifest_hash = manifest_sha256(manifest["train"] + manifest["val"])
    write_json_atomic(out / "manifest.json", json.dumps(manifest, indent=1))

    init = load_checkpoint(init_checkpoint) if init_checkpoint else None
    result = train(train_set, val_set, good, cfg.train, progress=progress, init_state=init,
                   masks_dir=cfg.masks_dir)
    save_checkpoint(result.model, out / CHECKPOINT_FILE, bn_source=result.bn_source)
    gi = result.classes.index(good)
    val_scores = 1.0 - result.val_probs[:, gi]
    good_scores = val_scores[result.val_labels == gi]
    threshold_images = 0
    if cfg.threshold_dir is not None:
        extra_scores = threshold_image_scores(result, cfg.threshold_dir, [train_set, val_set])
        threshold_images = len(extra_scores)
        good_scores = np.concatenate([good_scores, extra_scores])
    threshold = fit_threshold(good_scores, cfg.target_frr)
    metrics = evaluate.classification_metrics(result.val_labels, result.val_probs, result.classes, good,
                                              threshold=threshold, target_frr=cfg.target_frr)
    counts = {"train": train_set.counts(), "val": val_set.counts()}
    pool_counts = {c: counts["train"][c] + counts["val"][c] for c in counts["train"]}
    metrics["validation_split"] = validation_classes(pool_counts, good, cfg)
    metrics["threshold_good_images"] = int(len(good_scores))  # validation good parts + --threshold-images
    metrics["threshold_extra_images"] = threshold_images
    metrics["threshold_warning"] = evaluate.threshold_warning(len(good_scores), cfg.target_frr)
    if metrics["threshold_warning"]:
        log.warning("%s", metrics["threshold_warning"])
    if not metrics.get("n_defect"):  # good parts only: an average over one class is not a balanced accuracy
        metrics["balanced_accuracy"] = metrics["macro_f1"] = None

    t0 = time.perf_counter()
    check_paths = [s.path for s in val_set.samples] + [s.path for s in train_set.samples]
    onnx_path, meta, parity = export_and_check(result, out, threshold, cfg.target_frr, metrics, manifest_hash,
                                               check_paths)
    drift_error = None
    try:
        fit_drift_reference(result, out)
    except ValueError as exc:  # e.g. 5 shots x 6 classes: too few images to calibrate the detectors
        from pipeline.export import finalize_artefact

        drift_error = str(exc)
        log.warning("no drift reference for this model (%s); it will be served without drift monitoring", exc)
        meta = finalize_artefact(onnx_path, meta.model_copy(update={"drift_reference": None, "onnx_sha256": None}))
    export_s = time.perf_counter() - t0

    timings = {**{k: round(v, 2) for k, v in result.timings.items()}, "export_parity_drift_s": round(export_s, 2),
               "total_s": round(time.perf_counter() - t_start, 2)}
    if remainder is not None:
        counts["held_out"] = remainder.counts()
    full = {"validation": metrics, "parity": parity, "timings": timings, "counts": counts,
            "history": result.history, "best_epoch": result.best_epoch, "skipped": result.skipped,
            "backbone": result.config.backbone, "head": result.model.head_mode, "device": result.device,
            "drift_reference_error": drift_error,
            "masks_dir": str(cfg.masks_dir) if cfg.masks_dir else None, "masked_defect_images": result.masked_images,
            "sampling": result.sampling}
    write_json_atomic(out / "metrics.json", json.dumps(full, indent=2))

    pngs = [evaluate.plot_confusion_matrix(metrics, out / "confusion_matrix.png"),
            evaluate.plot_recall_vs_frr(val_scores, result.val_labels != gi, out / "recall_vs_frr.png",
                                        threshold=threshold, target_frr=cfg.target_frr)]
    evaluate.write_report(out, f"Training run: {out.name}", metrics, [Path(p) for p in pngs if p], extra={
        "backbone": result.config.backbone, "input": f"{result.spec.height}x{result.spec.width} {result.spec.resize}",
        "train images": sum(counts["train"].values()), "validation images": sum(counts["val"].values()),
        "best epoch": result.best_epoch, "device": result.device, "head": result.model.head_mode,
        "defect images with a mask": result.masked_images if cfg.masks_dir else "no masks given",
        "good-class draw weight": result.sampling.get("good_weight"),
        "fine-tuning steps per epoch": result.sampling.get("steps_per_epoch"),
        "parity max |dp|": f"{parity['max_abs_prob_diff']:.2e} on {parity['n_images']} images",
        **{f"time {k}": f"{v:.1f} s" for k, v in timings.items()},
        "skipped files": len(result.skipped),
    })
    return RunSummary(out, onnx_path, meta, metrics, parity, timings, counts, result.skipped, result.masked_images)
