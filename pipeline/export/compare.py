"""A reduced-precision model against its fp32 original on the same labelled images.

Both models see the same decoded, preprocessed batches (decoded once), so every difference in the
report comes from the model files. Metrics are the evaluation's own (``classification_metrics`` at
each model's threshold), so "balanced accuracy change" means what it means everywhere else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.evaluate.metrics import classification_metrics, defect_scores
from pipeline.evaluate.run import class_mapping
from pipeline.export.calibration import load_batch

if TYPE_CHECKING:
    from pipeline.data.folders import ImageFolder
    from pipeline.runtime import OnnxModel

SUMMARY_METRICS = ("balanced_accuracy", "defect_recall_at_frr", "false_reject_rate", "auroc", "n_images")


@dataclass
class PrecisionReport:
    """How far a reduced-precision model is from fp32 on labelled images (the ``parity`` of its sidecar)."""

    precision: str
    images: str  # where the images came from (validation split, a folder)
    n_images: int
    images_per_class: dict[str, int]  # one flip in a class of n moves balanced accuracy by 1/(n x classes)
    n_skipped: int
    top1_agreement: float  # share of images with the same argmax class
    decision_agreement: float  # share with the same good/defect decision at the model threshold
    max_abs_prob_diff: float
    mean_abs_prob_diff: float
    min_embedding_cosine: float
    balanced_accuracy_fp32: float
    balanced_accuracy: float
    balanced_accuracy_change: float  # candidate - fp32, in [-1, 1] (x100 = points)
    max_balanced_accuracy_drop: float  # the limit it was checked against
    provider: str
    candidate_metrics: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def passed(self) -> bool:
        # A tiny epsilon: a drop of exactly the limit (e.g. one image of a class of 100) is allowed.
        return -self.balanced_accuracy_change <= self.max_balanced_accuracy_drop + 1e-9


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-12)


def compare_models(reference: "OnnxModel", candidate: "OnnxModel", dataset: "ImageFolder", precision: str,
                   images_label: str, max_drop: float, batch_size: int = 16) -> PrecisionReport:
    """Run both models over ``dataset`` and report agreement and the balanced-accuracy change."""
    spec = reference.metadata.preprocess
    if candidate.metadata.preprocess != spec or candidate.classes != reference.classes:
        raise ValueError("the candidate's preprocessing or classes differ from the reference model's")
    mapping = class_mapping(list(dataset.classes), reference.classes, {s.label for s in dataset.samples})
    label_of = {s.path: int(mapping[s.label]) for s in dataset.samples}
    ref_p, cand_p, ref_e, cand_e, labels, n_skipped = [], [], [], [], [], 0
    paths = [s.path for s in dataset.samples]
    for start in range(0, len(paths), batch_size):
        batch, used, skipped = load_batch(paths[start:start + batch_size], spec)
        n_skipped += len(skipped)
        if not used:
            continue
        p, e = reference.run(batch)
        q, f = candidate.run(batch)
        ref_p.append(p), ref_e.append(e), cand_p.append(q), cand_e.append(f)
        labels += [label_of[u] for u in used]
    if not labels:
        raise ValueError(f"none of the {len(paths)} check images could be read")
    rp, cp = np.concatenate(ref_p), np.concatenate(cand_p)
    y = np.asarray(labels, np.int64)
    md, cmd = reference.metadata, candidate.metadata
    ref_m = classification_metrics(y, rp, md.classes, md.good_class, threshold=md.threshold, target_frr=md.target_frr)
    cand_m = classification_metrics(y, cp, cmd.classes, cmd.good_class, threshold=cmd.threshold,
                                    target_frr=cmd.target_frr)
    gi = md.good_index
    ref_defect = defect_scores(rp, gi) >= md.threshold
    cand_defect = defect_scores(cp, gi) >= cmd.threshold
    diff = np.abs(rp - cp)
    return PrecisionReport(
        precision=precision, images=images_label, n_images=len(y),
        images_per_class={c: int((y == i).sum()) for i, c in enumerate(md.classes) if (y == i).any()},
        n_skipped=n_skipped,
        top1_agreement=float((rp.argmax(1) == cp.argmax(1)).mean()),
        decision_agreement=float((ref_defect == cand_defect).mean()),
        max_abs_prob_diff=float(diff.max()), mean_abs_prob_diff=float(diff.mean()),
        min_embedding_cosine=float(_cosine(np.concatenate(ref_e), np.concatenate(cand_e)).min()),
        balanced_accuracy_fp32=float(ref_m["balanced_accuracy"]), balanced_accuracy=float(cand_m["balanced_accuracy"]),
        balanced_accuracy_change=float(cand_m["balanced_accuracy"] - ref_m["balanced_accuracy"]),
        max_balanced_accuracy_drop=max_drop, provider=candidate.provider,
        candidate_metrics={k: cand_m.get(k) for k in SUMMARY_METRICS},
    )
