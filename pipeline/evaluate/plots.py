"""PNG plots for evaluation reports.

matplotlib is imported inside each function (inference hosts may not have it) and used through its
object API on an Agg canvas: no pyplot, no global backend switch, safe from worker threads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.evaluate.metrics import binary_curve


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png", facecolor="white")
    return p


def plot_confusion_matrix(metrics: dict[str, Any], path: str | os.PathLike) -> Path:
    """Confusion matrix from :func:`classification_metrics` output: counts and row percentages in each
    cell, colours row-normalised (so rare classes are as visible as common ones)."""
    cm = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    classes = list(metrics["classes"])
    n = len(classes)
    if cm.shape != (n, n):
        raise ValueError(f"confusion_matrix shape {cm.shape} does not match {n} classes")
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)

    size = max(4.5, 1.0 + 0.9 * n)
    fig = _figure(size + 1.2, size)
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class (row)")
    fontsize = 10 if n <= 8 else 8
    for i in range(n):
        for j in range(n):
            text = f"{cm[i, j]}\n{frac[i, j]:.0%}" if rows[i, 0] else "0"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                    color="white" if frac[i, j] > 0.55 else "black")
    good = metrics.get("good_class")
    ylabels = [f"{c}{' (good)' if c == good and c.lower() != 'good' else ''}\nn={int(rows[i, 0])}"
               for i, c in enumerate(classes)]
    ax.set_xticks(range(n), labels=classes, rotation=35 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), labels=ylabels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ba = metrics.get("balanced_accuracy")
    title = "Confusion matrix"
    if ba is not None:
        title += f" (balanced accuracy {ba:.3f}, {int(cm.sum())} images)"
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_recall_vs_frr(scores: np.ndarray, is_defect: np.ndarray, path: str | os.PathLike,
                       threshold: float | None = None, target_frr: float | None = None) -> Path:
    """Defect recall vs false-reject rate: the full curve and a zoom on the low-FRR region where lines
    operate, with the operating threshold's point and the target FRR marked. Recall is drawn as the best
    recall achievable within each FRR budget (a step), with the actual operating points as dots."""
    s = np.asarray(scores, dtype=np.float64)
    d = np.asarray(is_defect).astype(bool)
    fig = _figure(10.0, 4.6)
    n_def, n_good = int(d.sum()), int((~d).sum())
    if n_def == 0 or n_good == 0:
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, f"recall vs false-reject curve undefined:\n{n_good} good and {n_def} defect images",
                ha="center", va="center", fontsize=12)
        return _save(fig, path)

    curve = binary_curve(s, d)
    frr, rec = curve["frr"], curve["defect_recall"]
    op = None
    if threshold is not None:
        op = (float(np.mean(s[~d] >= threshold)), float(np.mean(s[d] >= threshold)))
    zoom = max(0.1, 3.0 * (target_frr or 0.0), 1.5 * (op[0] if op else 0.0))
    axes = fig.subplots(1, 2)
    for ax, xmax, name in ((axes[0], 1.0, "full range"), (axes[1], min(zoom, 1.0), "low false-reject region")):
        ax.plot(frr, rec, drawstyle="steps-post", color="tab:blue", lw=1.8, label="best recall at FRR")
        ax.plot(frr, rec, "o", color="tab:blue", ms=2.5, alpha=0.6)
        if target_frr is not None:
            ax.axvline(target_frr, color="tab:red", ls="--", lw=1.2, label=f"target FRR {target_frr:.1%}")
        if op is not None:
            ax.plot([op[0]], [op[1]], marker="*", ms=14, color="tab:orange", mec="black", ls="none",
                    zorder=5, clip_on=False, label=f"threshold {threshold:.4g}: FRR {op[0]:.1%}, recall {op[1]:.1%}")
        ax.set_xlim(-0.02 * xmax, xmax)  # margins keep a curve hugging an axis visible
        ax.set_ylim(-0.02, 1.04)
        ax.set_xlabel("false-reject rate (good parts rejected)")
        ax.set_ylabel("defect recall (defects rejected)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Defect recall vs false rejects (AUROC {curve['auroc']:.3f}, {n_good} good, {n_def} defect)",
                 fontsize=11)
    return _save(fig, path)


def plot_score_histogram(scores: np.ndarray, is_defect: np.ndarray, path: str | os.PathLike,
                         threshold: float | None = None) -> Path:
    """Distribution of defect scores for good and defect parts, with the threshold: shows the margin
    (or the overlap) the recall/FRR numbers come from."""
    s = np.asarray(scores, dtype=np.float64)
    d = np.asarray(is_defect).astype(bool)
    fig = _figure(7.0, 3.8)
    ax = fig.add_subplot()
    bins = np.linspace(0.0, 1.0, 41)
    for mask, name, colour in ((~d, "good", "tab:green"), (d, "defect", "tab:red")):
        if mask.any():
            ax.hist(np.clip(s[mask], 0.0, 1.0), bins=bins, alpha=0.55, color=colour,
                    label=f"{name} (n={int(mask.sum())})")
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", lw=1.2, label=f"threshold {threshold:.4g}")
    ax.set_yscale("log")
    ax.set_xlabel("defect score = 1 - p(good)")
    ax.set_ylabel("images (log scale)")
    ax.set_title("Defect score distribution", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
