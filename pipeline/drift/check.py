"""One-shot drift check: does a folder of images look like the model's in-domain reference?

Used by ``defect drift check MODEL.onnx DIR``. The whole folder is one sample of ``n``
images, tested against the reference with thresholds calibrated at that sample size: null
samples of ``n`` images are resampled from the reference's calibration pool and scored the
same way, and the threshold is their upper ``false_alarm_rate`` quantile. So on a folder of
fresh in-domain images the check reports drift with probability about ``false_alarm_rate``.
For the streaming ``cusum`` detector the folder is one stream (in sorted path order) and the
threshold is set for an in-control run length of ``n / false_alarm_rate`` images.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.data.folders import list_images  # noqa: F401 - re-exported: pipeline.drift.list_images
from pipeline.drift.detectors import cusum_path
from pipeline.drift.reference import DEFAULT_DETECTOR, DETECTORS, WINDOW_DETECTORS, DriftReference, load_reference
from pipeline.drift.stats import IMAGE_STAT_NAMES, image_statistics

if TYPE_CHECKING:
    from pipeline.metadata import ModelMetadata
    from pipeline.runtime import OnnxModel

log = logging.getLogger(__name__)

MIN_CHECK_IMAGES = 8


class NoDriftReferenceError(ValueError):
    """The model's metadata names no drift reference."""


def reference_path(model_path: str | os.PathLike, metadata: "ModelMetadata") -> Path:
    """Where a model's drift reference lives: ``metadata.drift_reference``, relative to the model's folder."""
    if not metadata.drift_reference:
        raise NoDriftReferenceError(
            f"model {model_path} has no drift reference (model.json 'drift_reference' is empty); "
            "export it with a reference, or pass one explicitly")
    p = Path(metadata.drift_reference)
    return p if p.is_absolute() else Path(model_path).parent / p


def load_model_reference(model: "OnnxModel") -> DriftReference:
    """The drift reference of a loaded model, checked against the model's embedding size and classes."""
    ref = load_reference(reference_path(model.path, model.metadata))
    check_reference_matches(ref, model)
    return ref


def check_reference_matches(ref: DriftReference, model: "OnnxModel") -> None:
    """Raise ValueError when a reference was fitted for a different embedding size or class list."""
    meta = model.metadata
    if ref.dim != meta.embedding_dim:
        raise ValueError(f"drift reference is for {ref.dim}-d embeddings, model {model.path} has {meta.embedding_dim}")
    if ref.n_classes != len(meta.classes) or (ref.classes is not None and list(ref.classes) != list(meta.classes)):
        raise ValueError(f"drift reference classes {ref.classes or ref.n_classes} do not match model classes "
                         f"{meta.classes}")


def compute_features(model: "OnnxModel", images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decoded RGB uint8 images -> (embeddings, image statistics, probs), what the monitor consumes."""
    if not images:
        n_cls = len(model.classes)
        return (np.zeros((0, model.metadata.embedding_dim), np.float32), np.zeros((0, len(IMAGE_STAT_NAMES))),
                np.zeros((0, n_cls)))
    probs, emb = model.run(model.preprocess(images))
    stats = np.stack([image_statistics(im) for im in images])
    return emb, stats, probs


def _decode_folder(model: "OnnxModel", paths: list[Path], batch_size: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, str]]]:
    from pipeline.data.decode import ImageDecodeError, decode_file

    embs, stats, probs, failed = [], [], [], []
    batch: list[np.ndarray] = []

    def flush() -> None:
        if batch:
            e, s, p = compute_features(model, batch)
            embs.append(e)
            stats.append(s)
            probs.append(p)
            batch.clear()

    for path in paths:
        try:
            batch.append(decode_file(path, spec=model.metadata.preprocess))
        except (ImageDecodeError, OSError) as exc:
            failed.append({"path": str(path), "error": str(exc)})
            continue
        if len(batch) >= batch_size:
            flush()
    flush()
    if not embs:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0)), np.zeros((0, 0)), failed
    return np.concatenate(embs), np.concatenate(stats), np.concatenate(probs), failed


def sample_test(reference: DriftReference, embeddings: Any, image_stats: Any, probs: Any, *,
                false_alarm_rate: float = 0.01, n_null_windows: int = 2000, seed: int = 0
                ) -> dict[str, Any]:
    """All detectors on one sample of images as a whole, thresholds calibrated at its size.

    Returns {"scores", "thresholds", "n", "false_alarm_rate", "n_null_windows"}.
    """
    feats = reference.features(embeddings, image_stats, probs)
    n = len(feats)
    if n < MIN_CHECK_IMAGES:
        raise ValueError(f"need at least {MIN_CHECK_IMAGES} images for a drift check, got {n}")
    if not 0.0 < false_alarm_rate <= 0.5:
        raise ValueError(f"false_alarm_rate must be in (0, 0.5], got {false_alarm_rate}")
    width = max(reference.n_components, reference.n_image_stats, len(reference.mmd_points))
    # Null sampling costs ~ n_windows * n * width; keep a check of thousands of images to seconds.
    n_windows = int(np.clip(4e7 / (n * width), 300, n_null_windows))
    cal = reference.calibrate(window=n, stride=n, false_alarm_rate=false_alarm_rate,
                              n_null_windows=n_windows, seed=seed)
    scores = {d: float(v) for d, v in reference.window_scores(feats, WINDOW_DETECTORS).items()}
    scores["combined"] = float(cal.combined_score(scores))
    scores["cusum"] = float(cusum_path(reference.cusum_increments(feats.novelty)).max())
    return {"scores": scores, "thresholds": dict(cal.thresholds), "n": n,
            "false_alarm_rate": false_alarm_rate, "n_null_windows": cal.n_null_windows}


def check_folder(model: "OnnxModel | str | os.PathLike", folder: str | os.PathLike, *,
                 detector: str = DEFAULT_DETECTOR, false_alarm_rate: float = 0.01,
                 reference: DriftReference | str | os.PathLike | None = None, max_images: int | None = None,
                 batch_size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Compare a folder of images (any layout; recursed) with the model's drift reference.

    ``model``: a loaded ``OnnxModel`` or a path to one. ``reference``: defaults to the file
    named by the model's ``drift_reference`` metadata. Files that do not decode are skipped
    and listed. Returns a JSON-ready dict: drift, score, threshold, detector, n_images, plus
    every detector's score and threshold.
    """
    from pipeline.runtime import OnnxModel

    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose from {', '.join(DETECTORS)}")
    m = model if isinstance(model, OnnxModel) else OnnxModel(model)
    if reference is None:
        ref_file: str | None = str(reference_path(m.path, m.metadata))
        ref = load_reference(ref_file)
    elif isinstance(reference, DriftReference):
        ref_file, ref = None, reference
    else:
        ref_file, ref = str(reference), load_reference(reference)
    check_reference_matches(ref, m)
    paths = list_images(folder)
    if max_images is not None:
        paths = paths[:max_images]
    if not paths:
        raise ValueError(f"no image files found under {folder}")
    emb, stats, probs, failed = _decode_folder(m, paths, batch_size)
    if len(emb) < MIN_CHECK_IMAGES:
        raise ValueError(f"{folder}: only {len(emb)} decodable images ({len(failed)} failed); "
                         f"a drift check needs at least {MIN_CHECK_IMAGES}")
    res = sample_test(ref, emb, stats, probs, false_alarm_rate=false_alarm_rate, seed=seed)
    score, thr = res["scores"][detector], res["thresholds"][detector]
    return {
        "drift": bool(score > thr), "score": score, "threshold": thr, "detector": detector,
        "n_images": int(len(emb)), "n_failed": len(failed), "false_alarm_rate": false_alarm_rate,
        "scores": res["scores"], "thresholds": res["thresholds"],
        "model": str(m.path), "folder": str(folder), "reference": ref_file,
        "failed": failed[:20],
    }


def format_check(result: dict[str, Any]) -> str:
    """One human-readable line for a ``check_folder`` result."""
    verdict = "DRIFT" if result["drift"] else "no drift"
    rel = ">" if result["drift"] else "<="
    parts = ", ".join(f"{d} {result['scores'][d]:.3g}/{result['thresholds'][d]:.3g}"
                      for d in DETECTORS if d != result["detector"])
    failed = f", {result['n_failed']} unreadable" if result["n_failed"] else ""
    return (f"{verdict}: {result['detector']} score {result['score']:.3g} {rel} threshold "
            f"{result['threshold']:.3g} over {result['n_images']} images{failed} "
            f"(false-alarm rate {result['false_alarm_rate']:g}; others score/threshold: {parts})")
