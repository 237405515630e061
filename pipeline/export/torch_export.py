"""From a trained torch model to the served fp32 artefact: ONNX + metadata, proven equal on real images.

Every export ends with a parity check that runs the *runtime* path (numpy preprocessing from
the stored spec + ONNX Runtime) against torch on real validation images. An export that
disagrees is deleted and raises: nobody gets to serve a model that is not the one we evaluated.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline.data.augment import torch_normalize
from pipeline.export.artefact import DEFAULT_OPSET, PARITY_MAX_ABS, ParityError, ParityReport
from pipeline.metadata import INPUT_NAME, OUTPUT_EMBEDDING, OUTPUT_PROBS
from pipeline.preprocess import PreprocessSpec, resize_image
from pipeline.runtime import OnnxModel, RuntimeOptions
from pipeline.train import DefectClassifier, ExportModule

log = logging.getLogger(__name__)


def export_onnx(model: DefectClassifier, spec: PreprocessSpec, path: str | os.PathLike,
                opset: int = DEFAULT_OPSET) -> Path:
    """Write ``path`` (float32 NCHW ``images`` with a dynamic batch -> ``probs``, ``embedding``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportModule(model).eval()
    dummy = torch.zeros(2, 3, spec.height, spec.width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (dummy,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_PROBS, OUTPUT_EMBEDDING],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_PROBS: {0: "batch"}, OUTPUT_EMBEDDING: {0: "batch"}},
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )
    return path


@torch.no_grad()
def torch_reference(model: DefectClassifier, images: list[np.ndarray], spec: PreprocessSpec
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The training-side path: OpenCV resize, torch normalisation, torch model."""
    x = torch.from_numpy(np.stack([resize_image(im, spec) for im in images])).permute(0, 3, 1, 2).float()
    probs, emb = ExportModule(model).eval()(torch_normalize(x, spec))
    return probs.numpy(), emb.numpy()


def parity_check(model: DefectClassifier, onnx_path: str | os.PathLike, images: list[np.ndarray],
                 max_abs: float = PARITY_MAX_ABS, options: RuntimeOptions | None = None) -> ParityReport:
    """Torch vs the runtime path on the same decoded images; raises ``ParityError`` on any disagreement."""
    if not images:
        raise ParityError("parity check needs at least one real image; none could be read")
    served = OnnxModel(onnx_path, options=options or RuntimeOptions(providers=["CPUExecutionProvider"]))
    ref_p, ref_e = torch_reference(model, images, served.metadata.preprocess)
    got_p, got_e = served.run(served.preprocess(images))
    report = ParityReport(
        n_images=len(images),
        max_abs_prob_diff=float(np.abs(ref_p - got_p).max()),
        max_abs_embedding_diff=float(np.abs(ref_e - got_e).max()),
        top1_agreement=float((ref_p.argmax(1) == got_p.argmax(1)).mean()),
        provider=served.provider,
    )
    if report.top1_agreement < 1.0 or report.max_abs_prob_diff > max_abs:
        raise ParityError(f"ONNX export disagrees with torch: {json.dumps(report.as_dict())}")
    return report
