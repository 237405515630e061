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

    # a field this version does not know (a model from a newer trainer) is refused rather than ignored:
    # serving it with a step skipped would be silent train/serve skew
    model_config = ConfigDict(frozen=True, extra="forbid")

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
    # Per-image exposure normalisation of the resized uint8 image (before letterbox padding and the fixed
    # mean/std): lighting changes between sessions of one line are large, and with a few shots per class a
    # model otherwise learns brightness instead of defects. "gain": scale so the image's mean grey is
    # ``exposure_mean`` (an exposure change is a gain); "standardize": also set its standard deviation to
    # ``exposure_std``; "clahe": contrast-limited adaptive histogram equalisation of the luma
    # (``clahe_clip``, 8x8 tiles). "none" (the default) leaves older models unchanged.
    exposure: Literal["none", "gain", "standardize", "clahe"] = "none"
    exposure_mean: float = Field(127.0, gt=0, lt=255)
    exposure_std: float = Field(48.0, gt=0, le=128)
    clahe_clip: float = Field(2.0, gt=0, le=40)

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


_MAX_EXPOSURE_GAIN = 8.0  # a near-black or flat image is not stretched into amplified noise


def _capped(gain: float) -> float:
    return min(max(gain, 1 / _MAX_EXPOSURE_GAIN), _MAX_EXPOSURE_GAIN)


def normalize_exposure(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The spec's per-image exposure normalisation of an HxWx3 uint8 image (uint8 out; identity for "none").

    One numpy/OpenCV implementation that training (on the cached resized images) and serving share.
    """
    if spec.exposure == "none":
        return image
    if spec.exposure == "clahe":
        ycrcb = cv2.cvtColor(image, cv2.COLOR_RGB2YCrCb)
        clahe = cv2.createCLAHE(clipLimit=spec.clahe_clip, tileGridSize=(8, 8))
        ycrcb[..., 0] = clahe.apply(np.ascontiguousarray(ycrcb[..., 0]))
        return cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB)
    x = image.astype(np.float32)
    mean = float(x.mean())
    # mean -> exposure_mean as a (capped) gain, so black stays black; standardize also scales the
    # deviations from the mean (capped likewise) to exposure_std
    level = _capped(spec.exposure_mean / mean if mean > 0 else 1.0) * mean
    if spec.exposure == "standardize":
        std = float(x.std())
        gain = _capped(spec.exposure_std / std if std > 0 else 1.0)
    else:
        gain = level / mean if mean > 0 else 1.0
    offset = level - gain * mean
    return np.clip(np.rint(x * np.float32(gain) + np.float32(offset)), 0, 255).astype(np.uint8)


def resize_image(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resize an HxWx3 uint8 RGB image to the spec's size (stretch or letterbox), exposure-normalised
    if the spec asks for it (on the image content, before any letterbox padding).

    An HxW grey image is resized as one channel and then made RGB: for area and linear interpolation
    OpenCV resizes each channel alike, so the result is the same as resizing its three-channel copy
    (tested), for a third of the work. Its cubic kernels round differently by channel count, so for
    cubic the grey image is made RGB first.
    """
    grey = image.ndim == 2
    if image.dtype != np.uint8 or not (grey or (image.ndim == 3 and image.shape[2] == 3)) or 0 in image.shape:
        raise ValueError(f"expected HxWx3 uint8 RGB (or HxW grey), got shape {image.shape} dtype {image.dtype}")
    if grey and spec.interpolation == "cubic":
        image, grey = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB), False
    h, w = image.shape[:2]
    interp = _INTERP[spec.interpolation]
    if spec.resize == "stretch":
        if (h, w) != (spec.height, spec.width):
            image = cv2.resize(image, (spec.width, spec.height), interpolation=interp)
        return normalize_exposure(cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if grey else image, spec)
    scale = min(spec.height / h, spec.width / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = cv2.resize(image, (nw, nh), interpolation=interp) if (nh, nw) != (h, w) else image
    resized = normalize_exposure(cv2.cvtColor(resized, cv2.COLOR_GRAY2RGB) if grey else resized, spec)
    out = np.full((spec.height, spec.width, 3), spec.pad_value, dtype=np.uint8)
    top, left = (spec.height - nh) // 2, (spec.width - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


def normalize(batch: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """NHWC uint8 (or float in 0..255) -> NCHW float32, normalised per channel."""
    if batch.ndim != 4 or batch.shape[3] != 3:
        raise ValueError(f"expected an NHWC batch with 3 channels, got shape {batch.shape}")
    mean = np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
    inv_std = 1.0 / np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
    # Transpose while still uint8 (a quarter of the bytes), then convert and scale in place: the same float32
    # operations as before (bit-identical), about 8x faster than converting first (the daemon's batcher runs this).
    x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2)).astype(np.float32)
    x -= mean
    x *= inv_std
    return x


def preprocess(images: list[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Decoded RGB uint8 images -> model input batch (N, 3, H, W) float32."""
    if not images:
        return np.zeros((0, 3, spec.height, spec.width), np.float32)
    return normalize(np.stack([resize_image(im, spec) for im in images]), spec)
