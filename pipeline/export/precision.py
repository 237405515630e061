"""INT8 and FP16 models beside a run's fp32 ``model.onnx``, each with its own parity report.

``export_int8`` quantises with real line images (the run's training split, or a folder), then runs
fp32 and INT8 side by side on labelled images (every image of the run's data folder that it was not
trained on: the validation split plus, for a few-shot run, the images left out; or a labelled folder) and
publishes ``model.int8.onnx`` + ``model.int8.json`` only when balanced accuracy drops by at most
``max_drop`` (1 point by default); otherwise the candidate is deleted and :class:`PrecisionError`
raised. ``export_fp16`` does the same for ``model.fp16.onnx`` where a CUDA provider initialises and
records why the check was skipped elsewhere. ONNX Runtime + numpy only: no torch.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.export.artefact import publish_artefact, remove_artefact, variant_drift_path
from pipeline.export.calibration import (CalibrationDataError, balanced_pick, calibration_batch, image_files,
                                         manifest_split, unseen_split)
from pipeline.export.compare import PrecisionReport, compare_models
from pipeline.export.fp16 import convert_fp16, gpu_provider_status
from pipeline.export.quantize import QuantConfig, quantize_int8
from pipeline.metadata import ModelMetadata, precision_path
from pipeline.runtime import OnnxModel, RuntimeOptions

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
MAX_BALANCED_ACCURACY_DROP = 0.01
REGISTRY_RECORD = "registry.json"


class PrecisionError(RuntimeError):
    """A reduced-precision model failed its check against fp32 and was not published."""


@dataclass
class VariantExport:
    """A published reduced-precision model: its file, its metadata (as written) and its parity report."""

    path: Path
    metadata: ModelMetadata
    report: dict[str, Any]


def _check_options() -> RuntimeOptions:
    return RuntimeOptions(providers=["CPUExecutionProvider"], graph_optimization="all")


def _reference(run: Path) -> OnnxModel:
    if (run / REGISTRY_RECORD).exists():
        raise ValueError(f"{run} is a registered model version: its files are immutable. Export INT8/FP16 in the "
                         "run folder it came from, then register that folder again")
    path = run / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no {MODEL_FILE}; expected a training run folder")
    return OnnxModel(path, options=_check_options())


def _check_set(run: Path, meta: ModelMetadata, data_root: str | os.PathLike | None,
               check_dir: str | os.PathLike | None):
    """Labelled images for the accuracy check: a labelled folder, else every image of the run's data
    folder it was not trained on (validation split + the images a few-shot run left out)."""
    if check_dir is not None:
        from pipeline.data.folders import scan_image_folder

        return scan_image_folder(check_dir), f"labelled folder {check_dir}"
    return (unseen_split(run, meta.classes, data_root),
            "run's data folder, images not used for training (validation split + images left out of the shots)")


def _calibration_paths(run: Path, meta: ModelMetadata, calib_dir: str | os.PathLike | None,
                       data_root: str | os.PathLike | None, cfg: QuantConfig) -> tuple[list[Path], str]:
    if calib_dir is not None:
        return image_files(calib_dir), f"folder {calib_dir}"
    train = manifest_split(run, "train", meta.classes, data_root)
    return balanced_pick(train, cfg.max_images, cfg.seed), "training split (manifest.json), balanced over classes"


def bs1_latency_ms(model: OnnxModel, repeats: int = 20, warmup: int = 3) -> float:
    """Median batch-1 latency of ``model.run`` on a zero image (warm-up excluded)."""
    spec = model.metadata.preprocess
    x = np.zeros((1, 3, spec.height, spec.width), np.float32)
    for _ in range(warmup):
        model.run(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.run(x)
        times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times)


def fit_variant_drift_reference(run: Path, model: OnnxModel, meta: ModelMetadata, precision: str,
                                data_root: str | os.PathLike | None = None) -> tuple[str | None, str]:
    """A drift reference fitted on ``model``'s own embeddings of the run's training + validation images.

    Reduced precision moves embeddings a little (INT8 Lite0: cosine ~0.9x to fp32) and drift detectors are
    calibrated to small shifts: scored against the fp32 reference, an INT8 model looks drifted. Returns
    (file name for the sidecar, note); keeps the fp32 reference, with the reason in the note, when the run's
    images are not available, and None when the fp32 model has no reference either.
    """
    from pipeline.data.decode import ImageDecodeError, decode_file
    from pipeline.drift import fit_reference, image_statistics
    from pipeline.preprocess import preprocess

    if not meta.drift_reference:
        return None, "the fp32 model has no drift reference"
    try:
        samples = [*manifest_split(run, "train", meta.classes, data_root).samples,
                   *manifest_split(run, "val", meta.classes, data_root).samples]
    except CalibrationDataError as exc:
        return meta.drift_reference, f"kept the fp32 reference: {exc}"
    stats, embs, probs = [], [], []
    spec = meta.preprocess
    for start in range(0, len(samples), 16):
        images = []
        for s in samples[start:start + 16]:
            try:
                images.append(decode_file(s.path, spec=spec))
            except (ImageDecodeError, OSError):
                continue
        if images:
            p, e = model.run(preprocess(images, spec))
            stats += [image_statistics(im) for im in images]
            embs.append(e)
            probs.append(p)
    seed = int(meta.extra.get("train_config", {}).get("seed", 0))
    try:
        ref = fit_reference(np.concatenate(embs), np.asarray(stats), np.concatenate(probs), seed=seed)
    except (ValueError, IndexError) as exc:
        return meta.drift_reference, f"kept the fp32 reference: {exc}"
    path = variant_drift_path(precision_path(run / MODEL_FILE, precision))
    ref.save(path)
    return path.name, f"fitted on this model's embeddings of {len(stats)} training + validation images"


def _variant_metadata(meta: ModelMetadata, precision: str, report: dict[str, Any],
                      extra: dict[str, Any]) -> ModelMetadata:
    """The fp32 model's metadata (classes, preprocessing, threshold; ``metrics`` stay the fp32 validation
    metrics) plus what this file is: its precision, the fp32 file it was made from, its parity report."""
    return meta.model_copy(update={
        "onnx_sha256": None,
        "extra": {**meta.extra, "precision": precision, "fp32_onnx_sha256": meta.onnx_sha256, **extra,
                  "parity": report},
    })


def export_int8(run_dir: str | os.PathLike, *, calib_dir: str | os.PathLike | None = None,
                data_root: str | os.PathLike | None = None, check_dir: str | os.PathLike | None = None,
                config: QuantConfig | None = None, max_drop: float = MAX_BALANCED_ACCURACY_DROP) -> VariantExport:
    """Quantise ``run_dir/model.onnx`` to ``run_dir/model.int8.onnx``; publish it only if it passes the check.

    ``calib_dir``: any folder of line images (default: the run's training images). ``data_root``: where
    the manifest's files live now, if the data moved. ``check_dir``: a labelled folder to check on instead
    of the run's unseen images (:func:`~pipeline.export.calibration.unseen_split`). Raises
    :class:`PrecisionError` (nothing published) when balanced accuracy drops by more than ``max_drop``.
    """
    run = Path(run_dir)
    cfg = config or QuantConfig()
    reference = _reference(run)
    meta = reference.metadata
    check_set, check_label = _check_set(run, meta, data_root, check_dir)
    calib_paths, calib_source = _calibration_paths(run, meta, calib_dir, data_root, cfg)
    calibration = calibration_batch(calib_paths, meta.preprocess, cfg.max_images, cfg.seed)
    final = precision_path(reference.path, "int8")
    candidate = final.with_name(f".{final.stem}.candidate.onnx")
    try:
        t0 = time.perf_counter()
        quantize_int8(reference.path, candidate, calibration, cfg)
        quant_s = time.perf_counter() - t0
        model = OnnxModel(candidate, metadata=meta.model_copy(update={"onnx_sha256": None}), options=_check_options())
        report = compare_models(reference, model, check_set, "int8", check_label, max_drop)
        if not report.passed:
            raise PrecisionError(_refusal("INT8", report) + _withdraw(final))
        latency = {"fp32": round(bs1_latency_ms(reference), 3), "int8": round(bs1_latency_ms(model), 3),
                   "host": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores usable",
                   "note": "batch 1, median of 20, default threads; bench/run_all.py measures properly"}
        drift_ref, drift_note = fit_variant_drift_reference(run, model, meta, "int8", data_root)
        extra = {"quantization": cfg.model_dump(), "quantize_s": round(quant_s, 1), "latency_bs1_ms": latency,
                 "calibration": {"source": calib_source, "n_images": len(calibration)},
                 "drift_reference_note": drift_note}
        out = {"status": "passed", **report.as_dict()}
        variant_meta = _variant_metadata(meta, "int8", out, extra)
        written = publish_artefact(candidate, final, variant_meta.model_copy(update={"drift_reference": drift_ref}))
    finally:
        candidate.unlink(missing_ok=True)
    log.info("published %s: balanced accuracy %+.2f points vs fp32, top-1 agreement %.1f %%",
             final, 100 * report.balanced_accuracy_change, 100 * report.top1_agreement)
    return VariantExport(final, written, out)


def export_fp16(run_dir: str | os.PathLike, *, data_root: str | os.PathLike | None = None,
                check_dir: str | os.PathLike | None = None,
                max_drop: float = MAX_BALANCED_ACCURACY_DROP) -> VariantExport:
    """Convert ``run_dir/model.onnx`` to ``run_dir/model.fp16.onnx`` (float32 IO).

    Where a CUDA/TensorRT provider initialises, the FP16 model is checked against fp32 like INT8 and
    refused with :class:`PrecisionError` when it loses more than ``max_drop``; on a CPU-only host the
    check is skipped and the sidecar says why (``extra.parity.status == "skipped"``).
    """
    run = Path(run_dir)
    reference = _reference(run)
    meta = reference.metadata
    final = precision_path(reference.path, "fp16")
    candidate = final.with_name(f".{final.stem}.candidate.onnx")
    try:
        convert_fp16(reference.path, candidate)
        provider, note = gpu_provider_status(candidate)
        if provider is None:
            out: dict[str, Any] = {"status": "skipped", "precision": "fp16", "reason": note}
            log.warning("FP16 check skipped: %s", note)
        else:
            check_set, check_label = _check_set(run, meta, data_root, check_dir)
            model = OnnxModel(candidate, metadata=meta.model_copy(update={"onnx_sha256": None}),
                              options=RuntimeOptions(providers=[provider, "CPUExecutionProvider"]))
            report = compare_models(reference, model, check_set, "fp16", check_label, max_drop)
            if not report.passed:
                raise PrecisionError(_refusal("FP16", report) + _withdraw(final))
            out = {"status": "passed", **report.as_dict()}
        written = publish_artefact(candidate, final, _variant_metadata(meta, "fp16", out, {}))
    finally:
        candidate.unlink(missing_ok=True)
    return VariantExport(final, written, out)


def _withdraw(published: Path) -> str:
    """Remove a variant published by an earlier export: it was not made from, or checked with, this request."""
    if not published.exists():
        return ""
    remove_artefact(published)
    return f"; the {published.name} of an earlier export was removed too"


def _refusal(name: str, report: PrecisionReport) -> str:
    return (f"{name} model not published: balanced accuracy {report.balanced_accuracy:.3f} vs fp32 "
            f"{report.balanced_accuracy_fp32:.3f} ({100 * report.balanced_accuracy_change:+.2f} points; the limit is "
            f"-{100 * report.max_balanced_accuracy_drop:.2f}) on {report.n_images} images of the {report.images}; "
            f"top-1 agreement {100 * report.top1_agreement:.1f} %. Try more or more varied calibration images "
            "(--calib), --calib-method percentile/entropy, or serve the fp32 model")


__all__ = ["CalibrationDataError", "MAX_BALANCED_ACCURACY_DROP", "PrecisionError", "QuantConfig", "VariantExport",
           "bs1_latency_ms", "export_fp16", "export_int8"]
