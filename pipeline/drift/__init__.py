"""Drift monitoring: notice when the image domain shifts (new lamp, camera moved, new supplier).

numpy/scipy/OpenCV only, never torch: it runs inside the inference daemon.

- ``image_statistics``: cheap per-image statistics (brightness, contrast, sharpness, histogram, colour).
- ``fit_reference`` / ``DriftReference`` / ``load_reference``: in-domain reference statistics with
  thresholds calibrated on held-out in-domain data (one ``.npz`` file next to the model).
- ``DriftMonitor``: sliding-window detectors over the served stream, alarms debounced into episodes.
- ``check_folder``: one-shot check of a folder of images against a model's reference.
"""

from pipeline.drift.check import (
    NoDriftReferenceError,
    check_folder,
    compute_features,
    format_check,
    list_images,
    load_model_reference,
    reference_path,
    sample_test,
)
from pipeline.drift.monitor import DriftMonitor, DriftStatus, EpisodeTracker
from pipeline.drift.reference import (
    COMBINED_MEMBERS,
    DEFAULT_DETECTOR,
    DETECTORS,
    WINDOW_DETECTORS,
    Calibration,
    DriftReference,
    DriftReferenceError,
    ImageFeatures,
    fit_reference,
    load_reference,
)
from pipeline.drift.stats import IMAGE_STAT_NAMES, image_statistics, image_statistics_batch

__all__ = [
    "COMBINED_MEMBERS", "DEFAULT_DETECTOR", "DETECTORS", "IMAGE_STAT_NAMES", "WINDOW_DETECTORS",
    "Calibration", "DriftMonitor", "DriftReference", "DriftReferenceError", "DriftStatus", "EpisodeTracker",
    "ImageFeatures", "NoDriftReferenceError", "check_folder", "compute_features", "fit_reference", "format_check",
    "image_statistics", "image_statistics_batch", "list_images", "load_model_reference", "load_reference",
    "reference_path", "sample_test",
]
