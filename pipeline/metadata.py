"""The model artefact contract: ``model.onnx`` plus ``model.json``.

Everything downstream (runtime, daemon, drift, registry, gate) reads only this. The same
JSON is embedded in the ONNX file's ``metadata_props`` under ``defect_pipeline`` so a
model file that lost its sidecar can still be served and checked.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from pipeline.preprocess import PreprocessSpec

SCHEMA_VERSION = 1
ONNX_METADATA_KEY = "defect_pipeline"
INPUT_NAME = "images"
OUTPUT_PROBS = "probs"
OUTPUT_EMBEDDING = "embedding"


class ModelMetadata(BaseModel):
    """What a served model needs to be used correctly and audited later."""

    schema_version: int = SCHEMA_VERSION
    classes: list[str] = Field(min_length=2)
    good_class: str
    preprocess: PreprocessSpec
    # Defect score = 1 - p(good). Decision "defect" when score >= threshold.
    threshold: float = Field(ge=0.0, le=1.0)
    target_frr: float = Field(0.02, ge=0.0, le=1.0)
    frr_at_threshold: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    backbone: str
    # how the classifier reads the backbone's features: "pooled" (mean features) or "cells" (per-cell
    # head, the most defective cell decides); the ONNX graph holds it, training tools rebuild it from this
    head: Literal["pooled", "cells"] = "pooled"
    embedding_dim: int
    train_manifest_sha256: str
    drift_reference: str | None = None
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    onnx_sha256: str | None = None
    opset: int | None = None
    line: str | None = None
    version: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _good_class_known(self) -> "ModelMetadata":
        if self.good_class not in self.classes:
            raise ValueError(f"good_class {self.good_class!r} not in classes {self.classes}")
        return self

    @property
    def good_index(self) -> int:
        return self.classes.index(self.good_class)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sidecar_path(onnx_path: str | os.PathLike) -> Path:
    """``x/model.onnx`` -> ``x/model.json``; ``x/model.int8.onnx`` -> ``x/model.int8.json``."""
    return Path(onnx_path).with_suffix(".json")


PRECISIONS = ("fp32", "int8", "fp16")


def precision_path(model_path: str | os.PathLike, precision: str) -> Path:
    """Where a precision variant of a model lives: ``x/model.onnx`` -> ``x/model.int8.onnx`` / ``x/model.fp16.onnx``.

    ``fp32`` is the model itself. The variants are written by ``pipeline.export.precision`` beside it.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    p = Path(model_path)
    return p if precision == "fp32" else p.with_name(f"{p.name.split('.')[0]}.{precision}.onnx")


def write_json_atomic(path: str | os.PathLike, text: str) -> None:
    """Write-temp, fsync, rename: readers see the old or the new file, never half of one."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:  # a full disk: the old file stays whole and no half-written temp is left behind
        tmp.unlink(missing_ok=True)
        raise


def save_metadata(meta: ModelMetadata, path: str | os.PathLike) -> None:
    write_json_atomic(path, meta.to_json())


def load_metadata(onnx_path: str | os.PathLike) -> ModelMetadata:
    """Metadata for a model file: the sidecar JSON if present, else the copy embedded in the ONNX."""
    side = sidecar_path(onnx_path)
    if side.exists():
        return ModelMetadata.model_validate_json(side.read_text(encoding="utf-8"))
    embedded = read_embedded_metadata(onnx_path)
    if embedded is None:
        raise FileNotFoundError(f"no metadata for {onnx_path}: neither {side.name} nor embedded metadata found")
    return ModelMetadata.model_validate(embedded)


def read_embedded_metadata(onnx_path: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata JSON stored in the ONNX file's metadata_props, read via ONNX Runtime."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    raw = sess.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
    return json.loads(raw) if raw else None
