import sys

import numpy as np
import pytest

from pipeline.metadata import load_metadata, read_embedded_metadata
from pipeline.runtime import ModelIntegrityError, OnnxModel, RuntimeOptions, candidate_providers


def test_predict_dark_good_bright_defect(tiny_model):
    m = OnnxModel(tiny_model)
    dark = np.full((40, 50, 3), 10, np.uint8)
    bright = np.full((20, 30, 3), 250, np.uint8)
    p = m.predict([dark, bright])
    assert [x.decision for x in p] == ["good", "defect"]
    assert p[0].label == "good" and p[1].label == "defect"
    assert abs(sum(p[0].probabilities.values()) - 1) < 1e-5
    assert m.provider == "CPUExecutionProvider"


def test_empty_batch(tiny_model):
    m = OnnxModel(tiny_model)
    probs, emb = m.run(m.preprocess([]))
    assert probs.shape == (0, 2) and emb.shape == (0, 3)


def test_tampered_model_refused(tiny_model):
    data = bytearray(tiny_model.read_bytes())
    data[-1] ^= 0xFF
    tiny_model.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError):
        OnnxModel(tiny_model)


def test_metadata_embedded_and_sidecar_agree(tiny_model):
    side = load_metadata(tiny_model)
    emb = read_embedded_metadata(tiny_model)
    assert emb["classes"] == side.classes and emb["threshold"] == side.threshold
    tiny_model.with_suffix(".json").unlink()
    assert load_metadata(tiny_model).classes == side.classes


def test_provider_fallback_when_gpu_provider_cannot_start(tiny_model, monkeypatch):
    """A provider offered by the build but failing to initialise is skipped, CPU serves."""
    import onnxruntime as ort

    real = ort.InferenceSession
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])

    def fake_session(model, so, providers):
        if providers[0] == "CUDAExecutionProvider":
            raise RuntimeError("libcudart.so: cannot open shared object file")
        return real(model, so, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", fake_session)
    assert candidate_providers()[0] == "CUDAExecutionProvider"
    m = OnnxModel(tiny_model, options=RuntimeOptions())
    assert m.provider == "CPUExecutionProvider"


def test_runtime_does_not_import_torch():
    import subprocess

    code = ("import sys, pipeline.runtime, pipeline.data.decode, pipeline.data.folders, pipeline.cli;"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
