"""Metrics for a defect classifier, numpy only (inference and registry hosts have no scikit-learn).

Two views of the same predictions:

* multi-class: argmax class vs true class (accuracy, balanced accuracy, per-class P/R/F1, confusion);
* binary good/defect at an operating threshold: defect score = 1 - p(good), a part is rejected when
  ``score >= threshold``. The false-reject rate (FRR) is the fraction of good parts rejected; the
  threshold is chosen on validation data so FRR <= a target, and defect recall is read off there.

Everything returned by :func:`classification_metrics` is plain JSON (``None`` where undefined,
never NaN) so it can go straight into ``metrics.json`` and ``model.json``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ORACLE_NOTE = ("threshold chosen on this very data: an optimistic reference, not a performance estimate; "
               "the honest number is defect_recall_at_frr at the threshold fixed on validation data")
# Guards floor(target * n) against binary round-off (0.29 * 100 = 28.999999999999996).
_EPS = 1e-9


def _scores_1d(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _check_target(target_frr: float) -> float:
    t = float(target_frr)
    if not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise ValueError(f"target_frr must be in [0, 1], got {target_frr!r}")
    return t


def _num(x: float | None) -> float | None:
    """A JSON-safe float: None for undefined (None/NaN/inf)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def defect_scores(probs: np.ndarray, good_index: int) -> np.ndarray:
    """Defect scores 1 - p(good), computed in float32 exactly as the runtime does (ONNX outputs float32).

    The threshold is set at the next float above a good part's score, so a float64 score here and a
    float32 one in the daemon would disagree at that very boundary (two thirds of scores above 0.5
    round differently). Returned as float64 holding the float32 values.
    """
    p = np.asarray(probs, dtype=np.float32)
    if p.ndim != 2 or not 0 <= good_index < p.shape[1]:
        raise ValueError(f"probs must be (N, C) with good_index in [0, C), got {p.shape} and {good_index}")
    return (np.float32(1.0) - p[:, good_index]).astype(np.float64)


def allowed_false_rejects(n_good: int, target_frr: float) -> int:
    """How many of ``n_good`` good parts may be rejected at ``target_frr``: floor(target * n).

    This is why the achievable FRR is coarse with few good images: with 10 goods and a 2 % target
    floor(0.2) = 0, so no good part may be rejected and the threshold sits above the highest good score.
    """
    return min(int(n_good), int(math.floor(_check_target(target_frr) * n_good + _EPS)))


def false_reject_rate(good_scores: np.ndarray, threshold: float) -> float:
    """Fraction of good parts rejected (``score >= threshold``)."""
    g = _scores_1d(good_scores, "good_scores")
    if g.size == 0:
        raise ValueError("no good-class scores: the false-reject rate is undefined")
    return float(np.count_nonzero(g >= threshold) / g.size)


def threshold_warning(n_good: int, target_frr: float) -> str | None:
    """Why a threshold set on ``n_good`` good parts is not the ``target_frr`` one, or None when it can be.

    Below 1 / target good parts none may be rejected, so the threshold sits above the highest good score and
    one odd good part can push it so high that few defects reach it (measured on magnetic-tile with 25
    validation good parts: a good part scored ~1.0 and the model rejected nothing).
    """
    if target_frr <= 0 or allowed_false_rejects(n_good, target_frr) > 0:
        return None
    needed = max(n_good + 1, math.floor(1 / target_frr))
    while allowed_false_rejects(needed, target_frr) == 0:
        needed += 1
    return (f"the threshold was set on {n_good} good images: a {target_frr:.4g} false-reject rate needs at least "
            f"{needed} to reject any, so it sits above the highest-scoring one and may pass defects; give more "
            f"good parts (--threshold-images)")


def choose_threshold(good_scores: np.ndarray, target_frr: float) -> float:
    """Smallest threshold in [0, 1] whose false-reject rate on ``good_scores`` is <= ``target_frr``.

    Smallest, because a lower threshold rejects more defects: this maximises defect recall within the
    FRR budget. With k = floor(target * n) allowed rejects, the (k+1)-th highest good score s must be
    accepted, so the threshold is the next float above s. Ties count as a block: if several goods share
    s, none of them is rejected (rejecting only some of a tie is impossible with ``>=``). With k = 0
    (target 0, or e.g. 10 goods at 2 %) no good is rejected. With k = n everything may be rejected: 0.0.

    Scores are expected in [0, 1] (1 - p(good)) and the result is kept in [0, 1] as the model
    metadata requires. If a good part scored exactly 1.0 and must be accepted, no threshold in [0, 1]
    can do it: 1.0 is returned, a warning is logged and the achieved FRR exceeds the target (check it
    with :func:`false_reject_rate`).
    """
    g = _scores_1d(good_scores, "good_scores")
    if g.size == 0:
        raise ValueError("no good-class scores: cannot choose a threshold at a false-reject rate")
    k = allowed_false_rejects(g.size, target_frr)
    if k >= g.size:
        return 0.0
    must_accept = float(np.sort(g)[::-1][k])
    thr = float(np.nextafter(must_accept, np.inf))
    if thr > 1.0:
        log.warning("a good part scored %.6g; no threshold <= 1 accepts it, using 1.0 (FRR above target %.4g)",
                    must_accept, target_frr)
        return 1.0
    return max(thr, 0.0)


def binary_curve(scores: np.ndarray, is_defect: np.ndarray) -> dict[str, Any]:
    """The defect-recall vs false-reject-rate curve (an ROC curve) and its area.

    One point per distinct score t (reject ``score >= t``), highest first, preceded by a threshold above
    every score (nothing rejected, (0, 0)); the last point rejects everything, (1, 1). AUROC is the
    trapezoid area, which equals P(defect score > good score) + 0.5 P(tie). Both classes are needed.
    Returns numpy arrays ``thresholds``, ``frr``, ``defect_recall`` and ints/float ``n_good``,
    ``n_defect``, ``auroc``.
    """
    s = _scores_1d(scores, "scores")
    d = np.asarray(is_defect).astype(bool)
    if d.shape != s.shape:
        raise ValueError(f"is_defect shape {d.shape} does not match scores shape {s.shape}")
    n_def = int(d.sum())
    n_good = int(s.size - n_def)
    if n_def == 0 or n_good == 0:
        raise ValueError(f"the recall/FRR curve needs good and defect samples (good={n_good}, defect={n_def})")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, d_sorted = s[order], d[order]
    group_end = np.r_[np.nonzero(np.diff(s_sorted))[0], s.size - 1]  # last index of each tie group
    tp = np.cumsum(d_sorted)[group_end]
    fp = np.cumsum(~d_sorted)[group_end]
    thresholds = np.r_[np.nextafter(s_sorted[0], np.inf), s_sorted[group_end]]
    frr = np.r_[0.0, fp / n_good]
    recall = np.r_[0.0, tp / n_def]
    auroc = float(np.sum(np.diff(frr) * (recall[1:] + recall[:-1]) * 0.5))
    return {"thresholds": thresholds, "frr": frr, "defect_recall": recall,
            "auroc": auroc, "n_good": n_good, "n_defect": n_def}


def _labels(y_true: Any, n_classes: int) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be one-dimensional, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
            raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"y_true has class indices outside [0, {n_classes})")
    return y


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str], good_class: str,
                           threshold: float | None = None, target_frr: float = 0.02) -> dict[str, Any]:
    """Multi-class and good/defect metrics as a JSON-ready dict (see the module docstring).

    ``threshold`` is the operating threshold to report at (e.g. the one fixed on validation data);
    None chooses it on this data with :func:`choose_threshold`. Balanced accuracy and macro F1 average
    over the classes present in ``y_true``. Undefined values are None: recall of a
    class absent from ``y_true``, precision of a class never predicted, FRR without good images,
    recall and AUROC without defect images.
    """
    classes = list(classes)
    if good_class not in classes:
        raise ValueError(f"good_class {good_class!r} not in classes {classes}")
    p = np.asarray(probs, dtype=np.float64)
    n_cls = len(classes)
    if p.ndim != 2 or p.shape[1] != n_cls:
        raise ValueError(f"probs must have shape (N, {n_cls}), got {p.shape}")
    y = _labels(y_true, n_cls)
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} labels but probs has {p.shape[0]} rows")
    if y.size == 0:
        raise ValueError("no images to evaluate")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or infinite values")
    target_frr = _check_target(target_frr)
    if threshold is not None and not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be finite, got {threshold!r}")

    n = int(y.size)
    pred = p.argmax(axis=1)
    cm = np.zeros((n_cls, n_cls), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm)

    per_class: dict[str, dict[str, Any]] = {}
    recalls, f1s = [], []
    for i, name in enumerate(classes):
        prec = tp[i] / predicted[i] if predicted[i] else None
        rec = tp[i] / support[i] if support[i] else None
        denom = support[i] + predicted[i]  # 2TP + FP + FN
        f1 = 2 * tp[i] / denom if denom else None
        per_class[name] = {"precision": _num(prec), "recall": _num(rec), "f1": _num(f1), "support": int(support[i])}
        if rec is not None:
            recalls.append(rec)
            f1s.append(f1)

    good = classes.index(good_class)
    scores = defect_scores(p, good)
    is_defect = y != good
    good_scores, bad_scores = scores[~is_defect], scores[is_defect]
    n_good, n_def = int(good_scores.size), int(bad_scores.size)

    source = "given"
    if threshold is None:
        source = "chosen_on_this_data"
        threshold = choose_threshold(good_scores, target_frr) if n_good else None
    thr = _num(threshold)

    def frr_at(t: float | None) -> float | None:
        return float(np.mean(good_scores >= t)) if (t is not None and n_good) else None

    def recall_at(t: float | None) -> float | None:
        return float(np.mean(bad_scores >= t)) if (t is not None and n_def) else None

    oracle_thr = choose_threshold(good_scores, target_frr) if n_good else None
    rejected = scores >= thr if thr is not None else None
    reject_rate = {name: (float(np.mean(rejected[y == i])) if (rejected is not None and support[i]) else None)
                   for i, name in enumerate(classes)}

    return {
        "n_images": n,
        "classes": classes,
        "good_class": good_class,
        "accuracy": float(np.mean(pred == y)),
        "balanced_accuracy": _num(float(np.mean(recalls))),  # recalls is non-empty since n > 0
        "macro_f1": _num(float(np.mean(f1s))),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "n_good": n_good,
        "n_defect": n_def,
        "threshold": thr,
        "threshold_source": source,
        "target_frr": target_frr,
        "false_reject_rate": _num(frr_at(thr)),
        "defect_recall_at_frr": _num(recall_at(thr)),
        "false_rejects": int(np.count_nonzero(good_scores >= thr)) if thr is not None else None,
        "missed_defects": int(np.count_nonzero(bad_scores < thr)) if thr is not None else None,
        "reject_rate_per_class": reject_rate,
        "frr_resolution": _num(1.0 / n_good) if n_good else None,
        "allowed_false_rejects": allowed_false_rejects(n_good, target_frr) if n_good else None,
        "auroc": _num(binary_curve(scores, is_defect)["auroc"]) if (n_good and n_def) else None,
        "oracle_threshold": _num(oracle_thr),
        "defect_recall_at_target_frr_oracle": _num(recall_at(oracle_thr)),
        "oracle_note": ORACLE_NOTE,
    }
