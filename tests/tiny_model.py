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
    return _save_with_metadata(model, meta, out_dir, name)


def make_tiny_conv_model(out_dir: Path, name: str = "model", size: int = 32, threshold: float = 0.5,
                         classes: tuple[str, ...] = ("good", "defect")) -> Path:
    """A Lite-like ONNX artefact (Conv + ReLU6 + depthwise Conv + 1x1 Conv + pooling + Gemm head), no torch.

    Big enough to quantise meaningfully: "bright" and "dark" filters feed the head, so bright images
    are defects and dark ones good, and an INT8 model calibrated only on mid-grey images saturates the
    bright filters and calls every defect good (the refusal path of INT8 export).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n_cls = len(classes)
    w1 = rng.normal(0, 0.02, (8, 3, 3, 3)).astype(np.float32)
    w1[:4] += 3.0 / 27  # bright filters: ~3 x the normalised mean
    w1[4:] -= 3.0 / 27  # dark filters
    w2 = rng.normal(0, 0.02, (8, 1, 3, 3)).astype(np.float32)
    w2[:, :, 1, 1] += 1.0  # depthwise: mostly identity
    w3 = np.zeros((4, 8, 1, 1), np.float32)
    w3[0, :4], w3[1, 4:] = 0.25, 0.25  # embedding 0: brightness evidence, 1: darkness evidence
    w3[2:] = rng.normal(0, 0.1, (2, 8, 1, 1))
    w4 = np.zeros((4, n_cls), np.float32)
    w4[0, 0], w4[1, 0] = -4.0, 4.0
    w4[0, 1:], w4[1, 1:] = 4.0, -4.0
    b4 = np.zeros(n_cls, np.float32)
    b4[1:] = -1.0  # a defect needs clear brightness evidence
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (w1, "W1"), (np.zeros(8, np.float32), "B1"), (w2, "W2"), (np.zeros(8, np.float32), "B2"),
        (w3, "W3"), (np.zeros(4, np.float32), "B3"), (w4, "W4"), (b4, "B4"),
        (np.array(0.0, np.float32), "lo"), (np.array(6.0, np.float32), "hi"))]
    nodes = [
        helper.make_node("Conv", ["images", "W1", "B1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="relu6_1"),
        helper.make_node("Conv", ["a1", "W2", "B2"], ["c2"], group=8, pads=[1, 1, 1, 1], name="dwconv"),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["a2"], name="relu6_2"),
        helper.make_node("Conv", ["a2", "W3", "B3"], ["c3"], name="project"),
        helper.make_node("GlobalAveragePool", ["c3"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["embedding", "W4", "B4"], ["logits"], name="head"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_conv",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", n_cls]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = ModelMetadata(
        classes=list(classes), good_class=classes[0], preprocess=PreprocessSpec(height=size, width=size),
        threshold=threshold, backbone="tiny-conv-test", embedding_dim=4, train_manifest_sha256="0" * 64, opset=17,
    )
    return _save_with_metadata(model, meta, out_dir, name)


def _save_with_metadata(model, meta: ModelMetadata, out_dir: Path, name: str) -> Path:
    """Write ``out_dir/name.onnx`` with the metadata inside and beside it (sidecar with the file's sha256)."""
    helper.set_model_props(model, {ONNX_METADATA_KEY: meta.to_json()})
    path = out_dir / f"{name}.onnx"
    onnx.save(model, path)
    save_metadata(meta.model_copy(update={"onnx_sha256": sha256_file(path)}), path.with_suffix(".json"))
    return path
