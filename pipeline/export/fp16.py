"""An FP16 model for CUDA/TensorRT hosts, with float32 inputs and outputs so the artefact contract holds.

On a CPU ONNX Runtime has few float16 kernels and nothing to gain, so the FP16 check against fp32 runs
only where the CUDA provider really initialises; elsewhere it is skipped with the reason recorded.
ONNX Runtime + onnx only (no torch).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def convert_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write a float16 copy of ``src`` (weights and activations) whose ``images``/``probs``/``embedding``
    stay float32: Cast nodes at the edges, so callers and preprocessing need not change."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    onnx.save(half, str(tmp))
    os.replace(tmp, dst)
    return dst


def gpu_provider_status(model_path: str | os.PathLike | None = None) -> tuple[str | None, str]:
    """(provider, note): the GPU provider that really initialises here, or (None, why not).

    ``model_path``: try it on this model (a provider can be offered, yet fail for lack of driver or
    libraries, or fall back silently; only the session's own provider list tells the truth).
    """
    import onnxruntime as ort

    offered = [p for p in GPU_PROVIDERS if p in ort.get_available_providers()]
    if not offered:
        return None, ("no CUDA/TensorRT provider in this ONNX Runtime build (CPU-only host, providers: "
                      f"{', '.join(ort.get_available_providers())}); the FP16 check runs on a host with "
                      "onnxruntime-gpu and a working CUDA driver")
    if model_path is None:
        return offered[-1], "offered by this build (not tried on a model)"
    errors = []
    for provider in reversed(offered):  # CUDA first: TensorRT needs it anyway and builds engines slowly
        try:
            sess = ort.InferenceSession(str(model_path), providers=[provider, "CPUExecutionProvider"])
        except Exception as exc:  # no driver, missing libcudnn...
            errors.append(f"{provider}: {exc}")
            continue
        if sess.get_providers()[0] == provider:
            return provider, "initialised"
        errors.append(f"{provider}: fell back to {sess.get_providers()[0]}")
    return None, "GPU provider offered but not usable here: " + "; ".join(errors)
