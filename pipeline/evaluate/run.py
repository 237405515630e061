"""Evaluate an exported model (ONNX Runtime, no torch) on a labelled image folder.

This is the same code path the daemon uses (decode_file -> shared preprocess -> ORT), so the
numbers describe the artefact that will be served, not the torch model it came from.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.evaluate.metrics import classification_metrics, defect_scores
from pipeline.evaluate.plots import plot_confusion_matrix, plot_recall_vs_frr, plot_score_histogram
from pipeline.evaluate.report import save_metrics, write_report

if TYPE_CHECKING:  # keep metric-only imports of pipeline.evaluate free of onnxruntime/OpenCV
    from pipeline.data.folders import ImageFolder
    from pipeline.runtime import OnnxModel

Progress = Callable[[int, int], None]


@dataclass
class EvalOutputs:
    """Per-image outputs of an evaluation, kept for plots, drift references and promotion gates.

    Row i of ``probs``/``embeddings`` belongs to ``paths[i]`` with true class index ``y_true[i]``
    (an index into ``classes``, the model's class order).
    """

    y_true: np.ndarray
    probs: np.ndarray
    embeddings: np.ndarray
    paths: list[Path]
    classes: list[str]
    good_class: str
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def good_index(self) -> int:
        return self.classes.index(self.good_class)

    @property
    def scores(self) -> np.ndarray:
        """Defect scores, 1 - p(good), as the runtime computes them."""
        return defect_scores(self.probs, self.good_index)

    @property
    def is_defect(self) -> np.ndarray:
        return self.y_true != self.good_index


def class_mapping(dataset_classes: list[str], model_classes: list[str], used: set[int] | None = None) -> np.ndarray:
    """Dataset label index -> model class index, by name. A dataset class the model does not know is an
    error if it has samples (``used``: the dataset label indices that occur; None = all)."""
    unknown = [c for i, c in enumerate(dataset_classes)
               if c not in model_classes and (used is None or i in used)]
    if unknown:
        raise ValueError(f"dataset classes {unknown} are not classes of the model {model_classes}; "
                         "rename or remove those folders, or evaluate a model trained on them")
    return np.array([model_classes.index(c) if c in model_classes else -1 for c in dataset_classes], dtype=np.int64)


def evaluate_model(model: "OnnxModel", dataset: "ImageFolder", batch_size: int = 32,
                   progress: Progress | None = None) -> tuple[dict[str, Any], EvalOutputs]:
    """Run ``model`` over every image of ``dataset`` and compute metrics at the model's own threshold.

    Dataset classes are matched to model classes by name. Files that cannot be read or decoded are
    skipped and listed in ``metrics["skipped"]`` ({path, error}); if none can be read, ValueError.
    ``progress(n_done, n_total)`` is called after each batch (skipped files count as done).
    """
    from pipeline.data.decode import ImageDecodeError, decode_file

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    classes = list(model.classes)
    mapping = class_mapping(list(dataset.classes), classes, {s.label for s in dataset.samples})
    total = len(dataset.samples)
    if total == 0:
        raise ValueError(f"{dataset.root}: the dataset has no images")

    probs_parts, emb_parts, labels, paths = [], [], [], []
    skipped: list[dict[str, str]] = []
    for start in range(0, total, batch_size):
        images, batch_labels, batch_paths = [], [], []
        for sample in dataset.samples[start:start + batch_size]:
            try:
                img = decode_file(sample.path, spec=model.metadata.preprocess)
            except ImageDecodeError as exc:
                skipped.append({"path": str(sample.path), "error": f"{exc.kind}: {exc}"})
                continue
            except OSError as exc:
                skipped.append({"path": str(sample.path), "error": f"unreadable: {exc.strerror or exc}"})
                continue
            images.append(img)
            batch_labels.append(int(mapping[sample.label]))
            batch_paths.append(Path(sample.path))
        if images:
            p, e = model.run(model.preprocess(images))
            probs_parts.append(p)
            emb_parts.append(e)
            labels += batch_labels
            paths += batch_paths
        if progress is not None:
            progress(min(start + batch_size, total), total)

    if not labels:
        raise ValueError(f"{dataset.root}: none of the {total} images could be read "
                         f"(first error: {skipped[0]['path']}: {skipped[0]['error']})")
    meta = model.metadata
    outputs = EvalOutputs(
        y_true=np.asarray(labels, dtype=np.int64),
        probs=np.concatenate(probs_parts).astype(np.float32, copy=False),
        embeddings=np.concatenate(emb_parts).astype(np.float32, copy=False),
        paths=paths, classes=classes, good_class=meta.good_class, skipped=skipped,
    )
    metrics = classification_metrics(outputs.y_true, outputs.probs, classes, meta.good_class,
                                     threshold=meta.threshold, target_frr=meta.target_frr)
    metrics.update({
        "n_files": total,
        "n_skipped": len(skipped),
        "skipped": skipped,
        "dataset_root": str(dataset.root),
        "model": {"path": str(model.path), "sha256": model.sha256, "backbone": meta.backbone,
                  "provider": model.provider, "version": meta.version, "line": meta.line},
    })
    return metrics, outputs


def evaluate_to_dir(model: "OnnxModel", dataset: "ImageFolder", out_dir: str | os.PathLike,
                    title: str | None = None, extra: dict[str, Any] | None = None, batch_size: int = 32,
                    progress: Progress | None = None) -> tuple[dict[str, Any], EvalOutputs, Path]:
    """evaluate_model + ``metrics.json`` + the PNG plots + ``report.html`` in ``out_dir``.

    Returns (metrics, outputs, report path). What a CLI ``evaluate`` command or a flow task calls.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics, outputs = evaluate_model(model, dataset, batch_size=batch_size, progress=progress)
    save_metrics(metrics, out / "metrics.json")
    images = [plot_confusion_matrix(metrics, out / "confusion_matrix.png"),
              plot_recall_vs_frr(outputs.scores, outputs.is_defect, out / "recall_vs_frr.png",
                                 threshold=metrics["threshold"], target_frr=metrics["target_frr"]),
              plot_score_histogram(outputs.scores, outputs.is_defect, out / "score_histogram.png",
                                   threshold=metrics["threshold"])]
    info = {"model": str(model.path), "model sha256": model.sha256, "backbone": model.metadata.backbone,
            "provider": model.provider, "dataset": str(dataset.root), "files": metrics["n_files"],
            "skipped files": metrics["n_skipped"], **(extra or {})}
    report = write_report(out, title or f"Evaluation of {model.path.name}", metrics, images, info)
    return metrics, outputs, report
