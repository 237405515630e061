"""A tiny but real defect-pipeline ONNX artefact, built without torch, for fast tests.

Graph: images -> GlobalAveragePool -> Flatten = embedding (3 channel means) -> Gemm -> Softmax = probs.
Brighter images score as "defect", so tests can steer decisions by pixel values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.metadata import ONNX_METADATA_KEY, ModelMetadata, save_metadata, sha256_file
from pipeline.preprocess import PreprocessSpec


def make_tiny_model(out_dir: Path, name: str = "model", bias: float = 0.0, threshold: float = 0.5,
                    classes: tuple[str, ...] = ("good", "defect")) -> Path:
    """Write ``out_dir/<name>.onnx`` and its sidecar JSON; returns the ONNX path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n_cls = len(classes)
    w = np.zeros((3, n_cls), np.float32)
    w[:, 0] = -4.0  # good: dark
    w[:, 1:] = 4.0  # defects: bright
    b = np.zeros(n_cls, np.float32)
    b[0] = bias
    nodes = [
        helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1),
        helper.make_node("Gemm", ["embedding", "W", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", n_cls]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = ModelMetadata(
        classes=list(classes), good_class=classes[0],
        preprocess=PreprocessSpec(height=32, width=32),
        threshold=threshold, backbone="tiny-test", embedding_dim=3,
        train_manifest_sha256="0" * 64, opset=17,
    )
    helper.set_model_props(model, {ONNX_METADATA_KEY: meta.to_json()})
    path = out_dir / f"{name}.onnx"
    onnx.save(model, path)
    meta = meta.model_copy(update={"onnx_sha256": sha256_file(path)})
    save_metadata(meta, path.with_suffix(".json"))
    return path
