"""EfficientNet-Lite as a plain ``nn.Module`` matching lukemelas-style state dicts.

Lite variants drop squeeze-excite and swish (ReLU6 instead) so they quantise well; the
TensorFlow originals use "SAME" padding, which is asymmetric on stride 2. The released
weights only reproduce ImageNet predictions with that padding and BatchNorm eps 1e-3,
so both are kept exactly. The block layout is read from the state dict itself, which
makes the one class serve Lite0..Lite4 without per-variant tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's 0.99 decay expressed in torch's convention
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)


def same_pads(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int, int, int]:
    """TensorFlow "SAME" padding as (top, left, bottom, right): the extra pixel goes bottom/right."""
    pads = []
    for i, k, s in zip(size, kernel, stride):
        total = max((math.ceil(i / s) - 1) * s + k - i, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return top, left, bottom, right


class _OnnxSameConv(torch.autograd.Function):
    """Exports as one ONNX ``Conv`` with asymmetric ``pads``: no separate Pad node.

    A Pad in front of every strided/depthwise conv breaks ONNX Runtime's blocked (NCHWc) layout on
    x86 (a reorder before and after each) and its Pad fusion does not take torch's exported pads;
    ONNX Conv carries asymmetric pads natively, so say it directly. Only used while exporting.
    """

    @staticmethod
    def forward(ctx, x, weight, stride, pads, groups):  # noqa: ARG004 - value for the tracer
        top, left, bottom, right = pads
        return F.conv2d(F.pad(x, [left, right, top, bottom]), weight, None, stride, 0, 1, groups)

    @staticmethod
    def symbolic(g, x, weight, stride, pads, groups):
        kernel = weight.type().sizes()[-2:]
        return g.op("Conv", x, weight, kernel_shape_i=list(kernel), strides_i=list(stride), pads_i=list(pads),
                    group_i=groups, dilations_i=[1, 1])


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (pads more on the bottom/right when odd)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, left, bottom, right = same_pads(tuple(int(v) for v in x.shape[-2:]), self.kernel_size, self.stride)
        if torch.onnx.is_in_onnx_export() and self.bias is None and self.dilation == (1, 1):
            # The served input size is fixed by the preprocessing spec, so pads are constants.
            return _OnnxSameConv.apply(x, self.weight, self.stride, (top, left, bottom, right), self.groups)
        if top == bottom and left == right:
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
        x = F.pad(x, [left, right, top, bottom])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block: optional 1x1 expand, depthwise kxk, 1x1 project (no SE)."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """Feature extractor (``forward_features``) plus a linear classifier ``_fc``."""

    def __init__(self, blocks: list[tuple[int, int, int, int, int]], stem: int, head: int, num_classes: int):
        super().__init__()
        self._conv_stem = Conv2dSame(3, stem, 3, stride=2, bias=False)
        self._bn0 = _bn(stem)
        self._blocks = nn.ModuleList(MBConv(*b) for b in blocks)
        self._conv_head = Conv2dSame(blocks[-1][1], head, 1, bias=False)
        self._bn1 = _bn(head)
        self._fc = nn.Linear(head, num_classes)
        self.num_features = head

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map before pooling, shape (N, num_features, H/32, W/32)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding, shape (N, num_features)."""
        return self.forward_map(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.forward_features(x))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "EfficientNetLite":
        """Build the architecture the state dict describes and load it strictly.

        Raises ValueError when the state dict is not an EfficientNet-Lite one (another architecture's
        weights given with ``--weights``, say), instead of a bare KeyError from deep inside.
        """
        required = ("_conv_stem.weight", "_conv_head.weight", "_fc.weight", "_blocks.0._depthwise_conv.weight")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"not an EfficientNet-Lite state dict: missing {', '.join(missing)}")
        try:
            return cls._from_state_dict(state)
        except (KeyError, IndexError, RuntimeError) as exc:
            raise ValueError(f"state dict does not match an EfficientNet-Lite layout: {exc}") from None

    @classmethod
    def _from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "EfficientNetLite":
        n_blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("_blocks."))
        blocks, stage, prev_out = [], -1, None
        in_ch = state["_conv_stem.weight"].shape[0]
        for i in range(n_blocks):
            p = f"_blocks.{i}."
            dw = state[p + "_depthwise_conv.weight"]
            mid, kernel = dw.shape[0], dw.shape[-1]
            out_ch = state[p + "_project_conv.weight"].shape[0]
            if out_ch != prev_out:
                stage += 1
                stride = STAGE_STRIDES[stage]
            else:
                stride = 1
            blocks.append((in_ch, out_ch, mid // in_ch, kernel, stride))
            in_ch, prev_out = out_ch, out_ch
        model = cls(blocks, state["_conv_stem.weight"].shape[0], state["_conv_head.weight"].shape[0],
                    state["_fc.weight"].shape[0])
        model.load_state_dict(state, strict=True)
        return model
