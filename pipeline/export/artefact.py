"""The artefact side of export that needs no torch: metadata embedding, hashing, check images, parity types.

Shared by the fp32 export (torch side) and the INT8/FP16 variants (ONNX Runtime + numpy only), so every
model file the pipeline writes carries its metadata the same way and is hashed the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.decode import ImageDecodeError, decode_file
from pipeline.metadata import ONNX_METADATA_KEY, ModelMetadata, save_metadata, sha256_file, sidecar_path

DEFAULT_OPSET = 17
PARITY_MAX_ABS = 1e-4


class ParityError(RuntimeError):
    """The exported model does not reproduce torch's outputs."""


@dataclass
class ParityReport:
    n_images: int
    max_abs_prob_diff: float
    max_abs_embedding_diff: float
    top1_agreement: float
    provider: str

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def embed_metadata(path: str | os.PathLike, meta: ModelMetadata) -> None:
    """Store the metadata JSON inside the ONNX file (``metadata_props``), then the sidecar with the final sha256."""
    import onnx

    path = Path(path)
    m = onnx.load(str(path))
    del m.metadata_props[:]
    entry = m.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, meta.model_copy(update={"onnx_sha256": None}).to_json()
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(m, str(tmp))
    os.replace(tmp, path)


def finalize_artefact(path: str | os.PathLike, meta: ModelMetadata) -> ModelMetadata:
    """Embed metadata, hash the final bytes, write the sidecar (``model.json``, ``model.int8.json``...).

    Returns the metadata as written."""
    embed_metadata(path, meta)
    meta = meta.model_copy(update={"onnx_sha256": sha256_file(path)})
    save_metadata(meta, sidecar_path(path))
    return meta


def variant_drift_path(model_path: str | os.PathLike) -> Path:
    """Where a precision variant keeps the drift reference fitted on its own embeddings:
    ``model.int8.onnx`` -> ``model.int8.drift.npz``."""
    return Path(model_path).with_suffix(".drift.npz")


def remove_artefact(path: str | os.PathLike) -> None:
    """Delete a model file, its sidecar and its own drift reference, if any (an export that failed its
    checks, or one made from a model since replaced, must not be served)."""
    for p in (Path(path), sidecar_path(path), variant_drift_path(path)):
        p.unlink(missing_ok=True)


def load_check_images(paths: list[Path], limit: int = 64) -> list[np.ndarray]:
    """Decoded real images for parity checks (unreadable ones skipped)."""
    out = []
    for p in paths:
        if len(out) >= limit:
            break
        try:
            out.append(decode_file(p))
        except (ImageDecodeError, OSError):
            continue
    return out


def publish_artefact(candidate: str | os.PathLike, final: str | os.PathLike, meta: ModelMetadata) -> ModelMetadata:
    """Embed ``meta`` into a checked candidate file, hash it, move it to ``final`` and write its sidecar.

    The candidate is built and checked under a hidden name, so a failed check leaves nothing that a
    registry or a daemon could pick up. Returns the metadata as written.
    """
    embed_metadata(candidate, meta)
    meta = meta.model_copy(update={"onnx_sha256": sha256_file(candidate)})
    os.replace(candidate, final)
    save_metadata(meta, sidecar_path(final))
    return meta
