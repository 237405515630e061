"""Training-side image tensors and augmentation (torch).

Images are decoded and resized once with the shared spec (``pipeline.preprocess.resize_image``)
and kept as uint8; augmentation runs batched on tensors, then ``torch_normalize`` applies the
same normalisation the runtime applies in numpy. Photometric jitter (gain, contrast, gamma)
matters most: exposure changes are the commonest real shift on a line.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from pipeline.data.decode import ImageDecodeError, decode_file
from pipeline.data.folders import ImageFolder
from pipeline.preprocess import PreprocessSpec, resize_image


class AugmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent default

    hflip: bool = True
    vflip: bool = True
    rotate_deg: float = Field(10.0, ge=0, le=180)
    shift: float = Field(0.06, ge=0, le=0.5)  # fraction of the image size
    scale: float = Field(0.08, ge=0, le=0.5)
    gain: float = Field(0.25, ge=0, le=0.9)  # brightness: x * U(1-g, 1+g)
    contrast: float = Field(0.2, ge=0, le=0.9)
    gamma: float = Field(0.25, ge=0, le=0.9)  # exponent in [1/(1+g), 1+g]
    blur_p: float = Field(0.2, ge=0, le=1)
    noise_std: float = Field(3.0, ge=0, le=50)  # in grey levels


def torch_normalize(x: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """NCHW float in 0..255 -> normalised NCHW, identical to ``pipeline.preprocess.normalize``.

    Integer input (uint8 straight from ``load_images``) is taken as float32 first, as the numpy side
    does; subtracting the mean in uint8 would wrap around silently.
    """
    if not x.is_floating_point():
        x = x.float()
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean) * inv_std.to(x.dtype)


def load_images(ds: ImageFolder, spec: PreprocessSpec,
                progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Decode + resize every sample once -> (uint8 N,H,W,3 tensor, labels, skipped[{path, error}]).

    Unreadable files are skipped and returned by name so callers can report them; nothing shrinks silently.
    """
    images, labels, skipped = [], [], []
    for i, s in enumerate(ds.samples):
        try:
            images.append(resize_image(decode_file(s.path, spec=spec), spec))
            labels.append(s.label)
        except (ImageDecodeError, OSError) as exc:
            skipped.append({"path": str(s.path), "error": str(exc)})
        if progress:
            progress(i + 1, len(ds.samples))
    if not images:
        return (torch.zeros((0, spec.height, spec.width, 3), dtype=torch.uint8),
                torch.zeros(0, dtype=torch.long), skipped)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long), skipped


def to_float_nchw(batch_u8: torch.Tensor) -> torch.Tensor:
    return batch_u8.permute(0, 3, 1, 2).float()


def augment(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator,
            masks: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Random label-preserving transforms on NCHW float 0..255, batched.

    ``masks`` (N, H, W) defect masks, if given, go through the same flips and warps as their images and
    are returned beside them: ``(images, masks)``.
    """
    n = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=gen) * (hi - lo) + lo

    c = x.shape[1]
    if masks is not None:
        x = torch.cat([x, masks.unsqueeze(1).to(x.dtype)], dim=1)
    if cfg.hflip:
        m = torch.rand(n, generator=gen) < 0.5
        x = torch.where(m.view(-1, 1, 1, 1), x.flip(3), x)
    if cfg.vflip:
        m = torch.rand(n, generator=gen) < 0.5
        x = torch.where(m.view(-1, 1, 1, 1), x.flip(2), x)
    if cfg.rotate_deg or cfg.shift or cfg.scale:
        ang = u(-cfg.rotate_deg, cfg.rotate_deg) * math.pi / 180
        sc = u(1 - cfg.scale, 1 + cfg.scale)
        tx, ty = u(-cfg.shift, cfg.shift) * 2, u(-cfg.shift, cfg.shift) * 2
        cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if masks is not None:
        x, masks = x[:, :c], x[:, c]
    if cfg.gamma:
        g = torch.exp(u(-math.log1p(cfg.gamma), math.log1p(cfg.gamma))).view(-1, 1, 1, 1)
        x = 255.0 * (x.clamp(0, 255) / 255.0) ** g
    if cfg.gain:
        x = x * u(1 - cfg.gain, 1 + cfg.gain).view(-1, 1, 1, 1)
    if cfg.contrast:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * u(1 - cfg.contrast, 1 + cfg.contrast).view(-1, 1, 1, 1) + mean
    if cfg.blur_p:
        m = torch.rand(n, generator=gen) < cfg.blur_p
        if m.any():
            sigma = float(u(0.3, 1.2)[0])
            k = torch.arange(-2, 3, dtype=x.dtype)
            k = torch.exp(-(k ** 2) / (2 * sigma ** 2))
            k = k / k.sum()
            c = x.shape[1]
            blurred = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="reflect"), k.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
            blurred = F.conv2d(F.pad(blurred, (0, 0, 2, 2), mode="reflect"), k.view(1, 1, 5, 1).repeat(c, 1, 1, 1),
                               groups=c)
            x = torch.where(m.view(-1, 1, 1, 1), blurred, x)
    if cfg.noise_std:
        x = x + torch.randn(x.shape, generator=gen) * (torch.rand(n, generator=gen) * cfg.noise_std).view(-1, 1, 1, 1)
    x = x.clamp(0, 255)
    return x if masks is None else (x, masks)
