"""Decode any image file OpenCV can read into 3-channel uint8 RGB, or say why not.

Line cameras deliver 8/12/16-bit mono, BGR, BGRA, sometimes float TIFFs; the model wants
one thing. Everything is normalised here so neither training nor the daemon has to care.
A pixel limit guards against decompression bombs before OpenCV allocates the full image.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# OpenCV reads this limit once at import; set it before cv2 loads so huge headers are refused
# by the decoder itself instead of allocating gigabytes. Our own check below uses the caller's limit.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 28))
import cv2  # noqa: E402

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm",
     ".jp2", ".exr", ".hdr", ".pfm", ".sr", ".ras", ".gif"}
)
DEFAULT_MAX_PIXELS = 50_000_000


class ImageDecodeError(ValueError):
    """An input that is not a usable image; ``kind`` is a short machine-readable reason."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return (img >> 8).astype(np.uint8)
    if img.dtype == np.int8:
        return (img.astype(np.int16) + 128).astype(np.uint8)
    if img.dtype == np.int16:
        return ((img.astype(np.int32) + 32768) >> 8).astype(np.uint8)
    f = img.astype(np.float64)
    finite = np.isfinite(f)
    if not finite.any():
        raise ImageDecodeError("invalid_pixels", "image has no finite pixel values")
    f = np.where(finite, f, 0.0)
    lo, hi = float(f.min()), float(f.max())
    if 0.0 <= lo and hi <= 1.0:
        f = f * 255.0
    elif hi > 255.0 or lo < 0.0:
        f = (f - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.clip(f + 0.5, 0, 255).astype(np.uint8)


def to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """Any OpenCV-decoded array (BGR order, any depth/channels) -> HxWx3 uint8 RGB."""
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ImageDecodeError("bad_shape", f"unsupported image shape {img.shape}")
    img = _to_uint8(img)
    c = img.shape[2]
    if c == 1:
        return np.ascontiguousarray(np.repeat(img, 3, axis=2))
    if c == 2:  # grey + alpha
        return np.ascontiguousarray(np.repeat(img[:, :, :1], 3, axis=2))
    if c == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if c == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return np.ascontiguousarray(img[:, :, 2::-1][:, :, :3])


def decode_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> HxWx3 uint8 RGB. Raises ImageDecodeError with a reason."""
    if not data:
        raise ImageDecodeError("empty", "empty file")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # OpenCV raises for oversize headers and some corrupt streams
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else "decoder error"
        kind = "too_large" if "pixels" in msg.lower() or "size" in msg.lower() else "undecodable"
        raise ImageDecodeError(kind, f"cannot decode image: {msg}") from None
    if img is None:
        raise ImageDecodeError("undecodable", "not an image OpenCV can decode (corrupt, truncated or unknown format)")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise ImageDecodeError("too_large", f"image has {img.shape[0] * img.shape[1]} pixels, limit is {max_pixels}")
    return to_rgb_uint8(img)


def decode_file(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_bytes: int = 256 * 1024 * 1024) -> np.ndarray:
    """Read and decode a file (symlinks followed). Raises ImageDecodeError or OSError."""
    p = Path(path)
    size = p.stat().st_size
    if size > max_bytes:
        raise ImageDecodeError("too_large", f"file is {size} bytes, limit is {max_bytes}")
    return decode_bytes(p.read_bytes(), max_pixels=max_pixels)
