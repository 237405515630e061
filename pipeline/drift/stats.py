"""Cheap per-image statistics that move when the imaging conditions move.

A new lamp changes brightness, contrast and colour cast; a camera that slipped out of focus
changes sharpness; a new supplier's surface changes the grey-level histogram. These are
computed on a downscaled copy (longest side ``STATS_SIZE``) so they cost well under a
millisecond per image whatever the camera resolution, and they do not depend on the model,
so they keep working when the embedding is what drifted.
"""

from __future__ import annotations

import cv2
import numpy as np

STATS_SIZE = 128
"""The statistics are computed on a copy halved until its longest side is below ``2 * STATS_SIZE``."""

IMAGE_STAT_NAMES: tuple[str, ...] = (
    "grey_mean",         # overall brightness (0..1)
    "grey_std",          # global contrast
    "sharpness",         # log10 variance of the 3x3 Laplacian of the downscaled grey copy
    "grey_q05",          # grey-level histogram quantiles (0..1)
    "grey_q25",
    "grey_q50",
    "grey_q75",
    "grey_q95",
    "red_minus_green",   # colour cast: mean R - mean G
    "blue_minus_green",  # colour cast: mean B - mean G
    "saturation",        # mean (max - min) over channels, a cheap chroma measure
)
_QUANTILES = (0.05, 0.25, 0.50, 0.75, 0.95)


def _downscale(image: np.ndarray) -> np.ndarray:
    """Halve with exact 2x area averaging (OpenCV's fast path) until the longest side < 2*STATS_SIZE.

    Huge frames are first decimated by plain striding, which costs nothing; the last halvings
    still average, so sensor noise is not aliased into the sharpness statistic.
    """
    h, w = image.shape[:2]
    step = min(h, w) // (2 * STATS_SIZE)
    if step > 1:
        image = np.ascontiguousarray(image[::step, ::step])
        h, w = image.shape[:2]
    while max(h, w) >= 2 * STATS_SIZE and min(h, w) >= 4:
        h2, w2 = h // 2, w // 2
        image = cv2.resize(image[:2 * h2, :2 * w2], (w2, h2), interpolation=cv2.INTER_AREA)
        h, w = h2, w2
    return image


def _hist_quantiles(grey8: np.ndarray) -> np.ndarray:
    """Grey-level quantiles (0..1) from the 256-bin histogram, interpolated linearly inside a bin.

    Interpolation keeps the values continuous, so two-sample tests see few ties.
    """
    hist = cv2.calcHist([grey8], [0], None, [256], [0, 256]).ravel().astype(np.float64)
    cdf = np.cumsum(hist)
    targets = np.asarray(_QUANTILES) * cdf[-1]
    level = np.searchsorted(cdf, targets, side="left")
    level = np.minimum(level, 255)
    before = np.where(level > 0, cdf[np.maximum(level - 1, 0)], 0.0)
    frac = np.clip((targets - before) / np.maximum(hist[level], 1.0), 0.0, 1.0)
    return (level + frac) / 256.0


def image_statistics(image: np.ndarray) -> np.ndarray:
    """HxWx3 (or HxW) uint8 RGB image -> float64 vector of ``len(IMAGE_STAT_NAMES)`` statistics.

    About 0.1-0.2 ms for a 300x300 image. Raises ValueError for anything that is not a
    non-empty uint8 image.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"image_statistics expects uint8 pixels, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)) or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"image_statistics expects an HxWx3 or HxW image, got shape {img.shape}")
    small = np.ascontiguousarray(_downscale(img))
    if small.ndim == 2:
        grey8 = small
        rg = bg = sat = 0.0
    else:
        grey8 = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        r, g, b = cv2.split(small)
        mr, mg, mb = cv2.mean(r)[0], cv2.mean(g)[0], cv2.mean(b)[0]
        rg, bg = (mr - mg) / 255.0, (mb - mg) / 255.0
        sat = cv2.mean(cv2.subtract(cv2.max(cv2.max(r, g), b), cv2.min(cv2.min(r, g), b)))[0] / 255.0
    grey = grey8.astype(np.float32) * np.float32(1.0 / 255.0)
    if min(grey.shape) >= 3:
        lap = cv2.Laplacian(grey, cv2.CV_32F, ksize=1)[1:-1, 1:-1]
        sharp = float(np.log10(float(lap.var()) + 1e-8))
    else:
        sharp = -8.0
    mean, std = cv2.meanStdDev(grey)
    out = np.empty(len(IMAGE_STAT_NAMES), dtype=np.float64)
    out[0] = float(mean[0, 0])
    out[1] = float(std[0, 0])
    out[2] = sharp
    out[3:8] = _hist_quantiles(grey8)
    out[8], out[9], out[10] = rg, bg, sat
    return out


def image_statistics_batch(images: list[np.ndarray]) -> np.ndarray:
    """A list of images -> (N, len(IMAGE_STAT_NAMES)) float64 matrix."""
    if not images:
        return np.zeros((0, len(IMAGE_STAT_NAMES)), dtype=np.float64)
    return np.stack([image_statistics(im) for im in images])
