"""Evaluation: metrics, the operating threshold at a target false-reject rate, plots, the HTML report.

Defect score = 1 - p(good); a part is rejected when ``score >= threshold``; the false-reject rate (FRR)
is the share of good parts rejected. The threshold is fixed on validation data so FRR <= target.

Importing this package is light (numpy + pipeline.metadata): matplotlib is loaded inside the plot
functions and onnxruntime only with a model. Never imports torch.
"""

from pipeline.evaluate.metrics import (
    ORACLE_NOTE,
    allowed_false_rejects,
    binary_curve,
    choose_threshold,
    classification_metrics,
    defect_scores,
    false_reject_rate,
    threshold_warning,
)
from pipeline.evaluate.plots import plot_confusion_matrix, plot_recall_vs_frr, plot_score_histogram
from pipeline.evaluate.report import save_metrics, write_report
from pipeline.evaluate.run import EvalOutputs, class_mapping, evaluate_model, evaluate_to_dir

__all__ = [
    "ORACLE_NOTE",
    "EvalOutputs",
    "allowed_false_rejects",
    "binary_curve",
    "choose_threshold",
    "class_mapping",
    "classification_metrics",
    "defect_scores",
    "evaluate_model",
    "evaluate_to_dir",
    "false_reject_rate",
    "plot_confusion_matrix",
    "plot_recall_vs_frr",
    "plot_score_histogram",
    "save_metrics",
    "threshold_warning",
    "write_report",
]
