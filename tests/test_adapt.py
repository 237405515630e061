"""Label-free BatchNorm alignment (``pipeline.adapt.align_batchnorm``) on a small random conv net.

The defining property: after alignment, every BatchNorm's *output* mean and spread on the new images equal
what they were on the training images (measured on the final network, so every layer sees inputs aligned
upstream). The first implementation aligned all layers on the unaligned network and iterated; it diverged
(a same-domain sample made a magnetic-tile model predict one class), which these tests catch.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from pipeline.adapt import align_batchnorm  # noqa: E402
from pipeline.data.augment import to_float_nchw, torch_normalize  # noqa: E402
from pipeline.preprocess import PreprocessSpec  # noqa: E402
from pipeline.train import bn_input_stats, recording_bn_inputs  # noqa: E402

SPEC = PreprocessSpec(height=24, width=24)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: thread hand-offs would cost more than the arithmetic (and stall on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class TinyNet(nn.Module):
    """Six conv + BN + ReLU layers with ImageNet-like (mismatched) frozen statistics."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        ch = 3
        for out in (8, 12, 12, 16, 16, 16):
            conv = nn.Conv2d(ch, out, 3, padding=1, bias=False)
            bn = nn.BatchNorm2d(out, eps=1e-3)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / (9 * ch)) ** 0.5)
                bn.running_mean.copy_(torch.randn(out, generator=g) * 0.3)
                bn.running_var.copy_(torch.rand(out, generator=g) + 0.5)
                bn.weight.copy_(torch.rand(out, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(out, generator=g) * 0.1)
            layers += [conv, bn, nn.ReLU()]
            ch = out
        self.body = nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


def _images(n: int, seed: int, gain: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    base = rng.normal(110, 35, size=(n, 24, 24, 3)) + np.linspace(0, 30, 24)[None, None, :, None]
    return torch.from_numpy(np.clip(base * gain + offset, 0, 255).astype(np.uint8))


def _bn_output_moments(model: TinyNet, images: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel mean and std of every BatchNorm's normalised output (before its affine)."""
    stats = bn_input_stats(model, images, SPEC, torch.device("cpu"))
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            mean, var = stats[name]
            sd = np.sqrt(m.running_var.numpy().astype(np.float64) + m.eps)
            out[name] = ((mean - m.running_mean.numpy()) / sd, np.sqrt(var) / sd)
    return out


def test_source_images_leave_the_model_unchanged() -> None:
    model, x = TinyNet(), _images(64, 0)
    source = bn_input_stats(model, x, SPEC, torch.device("cpu"))
    ref = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in model.named_modules()
           if isinstance(m, nn.BatchNorm2d)}
    assert align_batchnorm(model, source, x, SPEC, torch.device("cpu"), batch=64) == 6
    for n, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            torch.testing.assert_close(m.running_mean, ref[n][0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(m.running_var, ref[n][1], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("gain, offset", [(1.0, 0.0), (1.6, 10.0), (0.6, -5.0)])
def test_aligned_layers_see_the_training_distribution(gain: float, offset: float) -> None:
    """Fresh images (same domain, or a brighter / darker one) -> every layer's normalised output matches
    the training images' to within sampling noise, at every depth."""
    model = TinyNet()
    train = _images(128, 1)
    source = bn_input_stats(model, train, SPEC, torch.device("cpu"))
    target = _bn_output_moments(model, train)
    new = _images(128, 2, gain, offset)
    unaligned = _bn_output_moments(model, new)
    align_batchnorm(model, source, new, SPEC, torch.device("cpu"))
    aligned = _bn_output_moments(model, new)
    for name, (mean, sd) in target.items():
        err_mean = np.abs(aligned[name][0] - mean).max()
        err_sd = np.abs(aligned[name][1] / sd - 1).max()
        assert err_mean < 0.1 and err_sd < 0.1, (name, err_mean, err_sd)
        if gain != 1.0 and name == "body.1":
            assert np.abs(unaligned[name][0] - mean).max() > 5 * err_mean  # there was something to fix


def test_recorded_statistics_do_not_depend_on_the_batching() -> None:
    """Training records the source statistics during its final embedding pass (batches of 32), not in a
    pass of their own: the result must be the statistics of all images, whatever the batch size."""
    model, x = TinyNet(), _images(50, 3)
    whole = bn_input_stats(model, x, SPEC, torch.device("cpu"), batch=64)
    with torch.no_grad(), recording_bn_inputs(model) as recorded:
        for i in range(0, len(x), 7):
            model.features(torch_normalize(to_float_nchw(x[i:i + 7]), SPEC))
    assert recorded.keys() == whole.keys() and len(whole) == 6
    for name, (mean, var) in whole.items():
        np.testing.assert_allclose(recorded[name][0], mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(recorded[name][1], var, rtol=1e-5, atol=1e-7)
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_recording_leaves_no_hooks_behind_when_the_pass_fails() -> None:
    model = TinyNet()
    with pytest.raises(RuntimeError), recording_bn_inputs(model) as recorded:
        model.features(torch.zeros(1, 5, 24, 24))  # wrong channel count
    assert recorded == {} and not any(m._forward_pre_hooks for m in model.modules())
