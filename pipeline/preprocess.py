"""The one preprocessing definition shared by training, export checks and serving.

The spec travels inside every model's metadata. Geometry (resize/letterbox) is done by
OpenCV on uint8 images on both sides, so there is exactly one resize implementation;
the normalisation to float NCHW exists in numpy (runtime) and torch (training, see
``pipeline.data.torch_normalize``) and tests prove the two agree.
"""

from __future__ import annotations

import math
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

_INTERP = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


class PreprocessSpec(BaseModel):
    """How an RGB uint8 image becomes the model's float32 input."""

    model_config = ConfigDict(frozen=True)

    height: int = Field(224, ge=16, le=2048)
    width: int = Field(224, ge=16, le=2048)
    resize: Literal["stretch", "letterbox"] = "stretch"
    interpolation: Literal["area", "linear", "cubic"] = "area"
    pad_value: int = Field(0, ge=0, le=255)
    # EfficientNet-Lite's TF weights expect (x - 127) / 128 on RGB.
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    # Decode large JPEGs directly at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when the image stays
    # at least the model input size: a 5 MP line-camera frame then decodes ~10x faster. It changes the
    # pixels the resize sees, so it is part of the spec (same on both sides); False for older models.
    jpeg_scaled_decode: bool = False

    @field_validator("mean")
    @classmethod
    def _finite_mean(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(math.isfinite(m) for m in v):
            raise ValueError(f"mean must be finite, got {v}")
        return v

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        """A zero std would turn every input into inf/nan without any error downstream."""
        if not all(math.isfinite(s) and s > 0 for s in v):
            raise ValueError(f"std must be finite and > 0, got {v}")
        return v


def decode_scale(width: int, height: int, spec: PreprocessSpec) -> int:
    """The JPEG decode scale denominator (1, 2, 4 or 8) for an image of this size under ``spec``.

    The largest one that keeps the decoded image (libjpeg rounds up: ``ceil(w / r)``) at least as
    large as what ``resize_image`` makes of it, so the resize still only shrinks.
    """
    if not spec.jpeg_scaled_decode or width <= 0 or height <= 0:
        return 1
    if spec.resize == "stretch":
        need_w, need_h = spec.width, spec.height
    else:
        scale = min(spec.height / height, spec.width / width)
        need_w, need_h = round(width * scale), round(height * scale)
    for r in (8, 4, 2):
        if -(-width // r) >= need_w and -(-height // r) >= need_h:
            return r
    return 1


def resize_image(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resize an HxWx3 uint8 RGB image to the spec's size (stretch or letterbox)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"expected HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    h, w = image.shape[:2]
    interp = _INTERP[spec.interpolation]
    if spec.resize == "stretch":
        if (h, w) == (spec.height, spec.width):
            return image
        return cv2.resize(image, (spec.width, spec.height), interpolation=interp)
    scale = min(spec.height / h, spec.width / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = cv2.resize(image, (nw, nh), interpolation=interp) if (nh, nw) != (h, w) else image
    out = np.full((spec.height, spec.width, 3), spec.pad_value, dtype=np.uint8)
    top, left = (spec.height - nh) // 2, (spec.width - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


def normalize(batch: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """NHWC uint8 (or float in 0..255) -> NCHW float32, normalised per channel."""
    if batch.ndim != 4 or batch.shape[3] != 3:
        raise ValueError(f"expected an NHWC batch with 3 channels, got shape {batch.shape}")
    mean = np.asarray(spec.mean, dtype=np.float32)
    inv_std = 1.0 / np.asarray(spec.std, dtype=np.float32)
    x = (batch.astype(np.float32) - mean) * inv_std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def preprocess(images: list[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Decoded RGB uint8 images -> model input batch (N, 3, H, W) float32."""
    if not images:
        return np.zeros((0, 3, spec.height, spec.width), np.float32)
    return normalize(np.stack([resize_image(im, spec) for im in images]), spec)
