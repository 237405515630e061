"""Static INT8 post-training quantisation with ONNX Runtime's tools (QDQ format, per-channel weights).

ONNX Runtime + numpy only (no torch), so a model can be quantised on the inference host it will run on.
Calibration images go through the shared numpy preprocessing (``pipeline.preprocess``): the ranges are
measured on exactly what the served model will see.

Defaults, measured on EfficientNet-Lite0 / magnetic-tile on a 2-core AVX-512 VNNI host (BENCHMARKS.md
section ``int8-recipe``, from ``python bench/run_all.py --only recipe``): QDQ; activations uint8
(asymmetric: ReLU6 outputs are non-negative); weights int8 per channel (per-tensor loses ~5 points)
without ``reduce_range`` (VNNI accumulates without the saturation it guards against; with it the
model loses more); MinMax calibration (Percentile / Entropy were within noise of it, and slower);
the classifier head (everything downstream of the ``embedding`` output: Gemm + Softmax) in float32.
ONNX Runtime fuses the QDQ graph into QLinearConv / QLinearAdd with graph optimisation 'all'.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.metadata import INPUT_NAME, OUTPUT_EMBEDDING

log = logging.getLogger(__name__)


class QuantConfig(BaseModel):
    """How a model is quantised; every field is recorded in the INT8 sidecar."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent default

    calibrate_method: Literal["minmax", "percentile", "entropy"] = "minmax"
    percentile: float = Field(99.999, gt=90.0, le=100.0, description="for calibrate_method=percentile")
    per_channel: bool = True
    reduce_range: bool = False
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    keep_head_fp32: bool = True
    exclude_nodes: list[str] = Field(default_factory=list, description="node names kept in float32 as well")
    max_images: int = Field(128, ge=1, description="calibration images used at most")
    batch_size: int = Field(8, ge=1, description="images per calibration inference")
    seed: int = 0


class ArrayCalibrationReader:
    """Feeds preprocessed calibration images to ONNX Runtime's calibrator in batches.

    ``set_range`` lets the calibrator take one batch at a time (``CalibStridedMinMax``): histogram
    calibrators otherwise keep every activation of every image in memory (~40 MB per Lite0 image).
    """

    def __init__(self, images: np.ndarray, batch_size: int):
        self._batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        self._next, self._end = 0, len(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        self._next += 1
        return {INPUT_NAME: self._batches[self._next - 1]}

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self._batches))

    def rewind(self) -> None:
        self._next, self._end = 0, len(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def head_node_names(model_path: str | os.PathLike) -> list[str]:
    """The classifier head's nodes, named so they can be excluded: everything downstream of the feature map
    the ``embedding`` output pools (the pooling itself, and a pooled head's or a per-cell head's layers),
    or of the ``embedding`` output where it is not such a pooling."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producer = next((n for n in graph.node if OUTPUT_EMBEDDING in n.output), None)
    pooled_from = producer is not None and producer.op_type in ("ReduceMean", "GlobalAveragePool")
    reached = {producer.input[0] if pooled_from else OUTPUT_EMBEDDING}
    names: list[str] = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        if reached.intersection(node.input):
            names.append(node.name)
            reached.update(node.output)
    return names


def _name_nodes(path: Path) -> None:
    """Give unnamed nodes a unique name: exclusion lists and quantisation overrides address nodes by name."""
    import onnx

    model = onnx.load(str(path))
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = next(f"{node.op_type}_{i}_{k}" for k in range(len(taken) + 1)
                             if f"{node.op_type}_{i}_{k}" not in taken)
            taken.add(node.name)
    onnx.save(model, str(path))


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, calibration: np.ndarray,
                  config: QuantConfig | None = None) -> Path:
    """Write a static INT8 (QDQ) version of the fp32 model ``src`` to ``dst``, calibrated on ``calibration``.

    ``calibration``: preprocessed images, (N, 3, H, W) float32. Intermediate files live in a temporary
    folder, so nothing but ``dst`` appears beside the model (a registry copies every ``*.onnx`` it finds).
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    cfg = config or QuantConfig()
    if calibration.ndim != 4 or len(calibration) == 0:
        raise ValueError(f"calibration must be a non-empty (N, 3, H, W) batch, got shape {calibration.shape}")
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    # One batch per collection step; ranges/histograms are merged across steps. (Not
    # CalibMaxIntermediateOutputs: its MinMax calibrator drops the batches it clears without merging them.)
    extra: dict = {"CalibStridedMinMax": 1, "CalibTensorRangeSymmetric": False}
    if cfg.calibrate_method == "percentile":
        extra["CalibPercentile"] = cfg.percentile

    class _Reader(ArrayCalibrationReader, CalibrationDataReader):
        pass

    dst = Path(dst)
    with tempfile.TemporaryDirectory(prefix="defect-quant-") as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        _name_nodes(pre)
        exclude = (head_node_names(pre) if cfg.keep_head_fp32 else []) + list(cfg.exclude_nodes)
        out = Path(tmp) / "int8.onnx"
        # ONNX Runtime's histogram calibrators print progress on stdout, where `--json` callers read one object
        with contextlib.redirect_stdout(sys.stderr):
            quantize_static(
                str(pre), str(out), _Reader(calibration.astype(np.float32, copy=False), cfg.batch_size),
                quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
                activation_type=_quant_type(cfg.activation_type), weight_type=_quant_type(cfg.weight_type),
                calibrate_method=methods[cfg.calibrate_method], nodes_to_exclude=exclude, extra_options=extra,
            )
        _publish(out, dst)
    log.info("quantised %s -> %s (%s, head fp32: %s)", src, dst, cfg.calibrate_method, cfg.keep_head_fp32)
    return dst


def _publish(src: Path, dst: Path) -> None:
    """Copy then rename: ``dst`` is never seen half-written (the temp folder may be on another disk)."""
    import shutil

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
