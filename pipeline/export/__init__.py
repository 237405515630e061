"""Export: from a trained model to the files that are served.

* ``torch_export``: fp32 ONNX from torch + the parity check against torch (needs torch);
* ``artefact``: metadata embedding, hashing, sidecars (no torch);
* ``calibration``: real line images for calibration and checks, from a run folder's manifest (no torch);
* ``quantize``: static INT8 post-training quantisation with ONNX Runtime (no torch);
* ``fp16``: an FP16 model for CUDA/TensorRT hosts (no torch);
* ``precision``: builds ``model.int8.onnx`` / ``model.fp16.onnx`` beside a run's fp32 model, with their own
  parity report against fp32, and refuses to publish one that loses accuracy (no torch).

The torch-side names below are imported on first use, so ``import pipeline.export.quantize`` on an
inference host (ONNX Runtime + numpy) never loads torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.export.artefact import (DEFAULT_OPSET, PARITY_MAX_ABS, ParityError, ParityReport, embed_metadata,
                                      finalize_artefact, load_check_images, remove_artefact)

_TORCH_SIDE = {"export_onnx", "torch_reference", "parity_check"}

__all__ = ["DEFAULT_OPSET", "PARITY_MAX_ABS", "ParityError", "ParityReport", "embed_metadata", "export_onnx",
           "finalize_artefact", "load_check_images", "parity_check", "remove_artefact", "torch_reference"]


def __getattr__(name: str) -> Any:
    if name in _TORCH_SIDE:
        return getattr(importlib.import_module("pipeline.export.torch_export"), name)
    raise AttributeError(f"module 'pipeline.export' has no attribute {name!r}")
