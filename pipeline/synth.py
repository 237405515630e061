"""A synthetic line dataset: brushed-metal parts on a conveyor, with four kinds of defect.

Users without data, the demo and the fast tests all need images that look like a real
inspection line: a part under uneven light, fine machining grain, sensor noise, and
defects that are visible but not trivial. Everything is rendered with numpy + OpenCV in
linear radiance and only then passed through a camera model, so ``exposure`` changes the
image the way a lighting or shutter change does on a real line (gain, tone curve, noise),
which is the domain shift the drift monitor and re-adaptation are meant to handle.

One generator draws the scene (part, texture, light, nuisances, sensor noise) and a second,
independent one draws the defect. Rendering the same generator state as ``good`` and as a
defect kind therefore gives the same part with and without the defect, which is what lets
the tests measure that each defect is really there and only where it should be.
"""

from __future__ import annotations

import math
import os
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

GOOD = "good"
DEFECT_KINDS: tuple[str, ...] = ("scratch", "spot", "crack", "edge_chip")
KINDS: tuple[str, ...] = (GOOD, *DEFECT_KINDS)

MIN_SIZE = 48
MAX_SIZE = 4096
MIN_EXPOSURE = 0.05
MAX_EXPOSURE = 20.0

_AA_SHIFT = 4  # sub-pixel bits for OpenCV drawing
_AA_SCALE = 1 << _AA_SHIFT


@dataclass(frozen=True)
class RenderedSample:
    """One rendered image and where its defect is (for tests and demo ground truth).

    ``image`` is HxWx3 uint8 RGB; ``defect_mask`` is HxW float32 in [0, 1], all zero for ``good``.
    """

    kind: str
    image: np.ndarray
    defect_mask: np.ndarray


@dataclass(frozen=True)
class _Part:
    """A rotated rounded rectangle: the inspected part, in image coordinates."""

    cx: float
    cy: float
    hx: float
    hy: float
    angle: float  # radians
    radius: float

    def to_image(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Part-frame (u along the long axis, v across) -> image (x, y)."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        return self.cx + u * c - v * s, self.cy + u * s + v * c

    def sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed distance to the part outline in pixels, negative inside."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = x - self.cx, y - self.cy
        u, v = dx * c + dy * s, -dx * s + dy * c
        qx = np.abs(u) - (self.hx - self.radius)
        qy = np.abs(v) - (self.hy - self.radius)
        outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
        inside = np.minimum(np.maximum(qx, qy), 0.0)
        return (outside + inside - self.radius).astype(np.float32)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic class {kind!r}; known classes: {', '.join(KINDS)}")


def _check_render_args(size: int, exposure: float) -> None:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool):
        raise TypeError(f"size must be an int, got {type(size).__name__}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}] px, got {size}")
    if not (isinstance(exposure, (int, float, np.floating)) and math.isfinite(exposure)):
        raise ValueError(f"exposure must be a finite number, got {exposure!r}")
    if not MIN_EXPOSURE <= exposure <= MAX_EXPOSURE:
        raise ValueError(f"exposure must be in [{MIN_EXPOSURE}, {MAX_EXPOSURE}], got {exposure}")


# ---------------------------------------------------------------- drawing helpers
def _uni(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A Python float, so float32 arrays stay float32 under NumPy 2 promotion rules."""
    return float(rng.uniform(lo, hi))


def _gauss(rng: np.random.Generator, mean: float, sd: float) -> float:
    return float(rng.normal(mean, sd))


def _sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0



def _pts(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Float image points -> int32 fixed-point array for cv2 drawing with _AA_SHIFT."""
    return np.round(np.stack([x, y], axis=-1) * _AA_SCALE).astype(np.int32).reshape(-1, 1, 2)


def _draw_path(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, thickness: int,
               weights: np.ndarray | None = None) -> np.ndarray:
    """Anti-aliased polyline on a float mask in [0, 1]; ``weights`` (per segment) fades it."""
    canvas = np.zeros(shape, np.uint8)
    pts = _pts(x, y).reshape(-1, 2)
    for i in range(len(pts) - 1):
        w = 1.0 if weights is None else float(weights[i])
        value = int(round(255 * min(max(w, 0.0), 1.0)))
        if value == 0:
            continue
        cv2.line(canvas, tuple(int(c) for c in pts[i]), tuple(int(c) for c in pts[i + 1]),
                 value, thickness, cv2.LINE_AA, _AA_SHIFT)
    return canvas.astype(np.float32) / 255.0


def _blob(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float,
          angle: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Elliptical normalised radius q (1 at the ellipse) and the unit offset direction (ex, ey)."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = x - cx, y - cy
    a, b = (dx * c + dy * s) / rx, (-dx * s + dy * c) / ry
    q = np.sqrt(a * a + b * b)
    r = np.hypot(dx, dy) + 1e-6
    return q, dx / r, dy / r


def _directional_grain(noise: np.ndarray, angle: float, length: int) -> np.ndarray:
    """Brushing grain: white noise smeared along ``angle`` by a line kernel, unit variance."""
    k = max(3, length | 1)
    kernel = np.zeros((k, k), np.float32)
    c = k // 2
    dx, dy = math.cos(angle) * c, math.sin(angle) * c
    cv2.line(kernel, (int(round(c - dx)), int(round(c - dy))), (int(round(c + dx)), int(round(c + dy))),
             1.0, 1, cv2.LINE_AA)
    kernel /= kernel.sum()
    g = cv2.filter2D(noise, -1, kernel, borderType=cv2.BORDER_REFLECT)
    return g / (float(g.std()) + 1e-6)


def _smooth_noise(noise: np.ndarray, sigma: float) -> np.ndarray:
    g = cv2.GaussianBlur(noise, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    return g / (float(g.std()) + 1e-6)


# ---------------------------------------------------------------- defects

def _interior_point(rng: np.random.Generator, part: _Part, frac: float) -> tuple[float, float]:
    u = _uni(rng, -frac, frac) * part.hx
    v = _uni(rng, -frac, frac) * part.hy
    x, y = part.to_image(np.array(u), np.array(v))
    return float(x), float(y)


def _scratch(rng: np.random.Generator, shape: tuple[int, int], part: _Part,
             scale: float) -> tuple[np.ndarray, float]:
    """A thin, slightly curved line fading at both ends; bright (specular) or dark."""
    span = 2.0 * min(part.hx, part.hy)
    length = _uni(rng, 0.25, 0.75) * span
    cx, cy = _interior_point(rng, part, 0.45)
    theta = _uni(rng, 0, math.pi)
    bend = _uni(rng, -0.15, 0.15) * length
    t = np.linspace(0.0, 1.0, 24)
    ex, ey = math.cos(theta), math.sin(theta)
    along = (t - 0.5) * length
    across = 4.0 * bend * t * (1.0 - t)  # quadratic bow, maximal mid-way
    x = cx + along * ex - across * ey
    y = cy + along * ey + across * ex
    mid = 0.5 * (t[:-1] + t[1:])
    fade = np.clip(np.minimum(mid, 1.0 - mid) / _uni(rng, 0.08, 0.3), 0.0, 1.0)
    fade *= _uni(rng, 0.6, 1.0) + _uni(rng, 0.0, 0.4) * np.sin(mid * _uni(rng, 3, 9))
    thickness = 1 if rng.random() < 0.7 or scale < 1.2 else 2
    mask = _draw_path(shape, x, y, thickness, fade)
    contrast = _uni(rng, 0.18, 0.6) if rng.random() < 0.6 else -_uni(rng, 0.18, 0.45)
    return mask, contrast


def _spot(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, part: _Part, scale: float,
          light: float) -> np.ndarray:
    """Pits (dark, with a lit rim on the side facing away from the light) or bright deposits.

    Returns a signed albedo modulation (negative darkens).
    """
    mod = np.zeros(xx.shape, np.float32)
    n = 1 if rng.random() < 0.75 else int(rng.integers(2, 4))
    cx0, cy0 = _interior_point(rng, part, 0.7)
    pit = rng.random() < 0.7
    for i in range(n):
        cx = cx0 + (_gauss(rng, 0, 6 * scale) if i else 0.0)
        cy = cy0 + (_gauss(rng, 0, 6 * scale) if i else 0.0)
        rx = _uni(rng, 1.6, 6.0) * scale * (1.0 if i == 0 else 0.6)
        ry = rx * _uni(rng, 0.55, 1.0)
        q, ex, ey = _blob(xx, yy, cx, cy, rx, ry, _uni(rng, 0, math.pi))
        core = np.exp(-(q ** 4)).astype(np.float32)
        c = _uni(rng, 0.3, 0.75)
        if pit:
            facing = np.maximum(0.0, -(ex * math.cos(light) + ey * math.sin(light)))
            rim = np.exp(-(((q - 1.15) / 0.3) ** 2)) * facing
            mod += -c * core + 0.6 * c * rim.astype(np.float32)
        else:
            mod += 0.8 * c * core
    return mod


def _crack(rng: np.random.Generator, shape: tuple[int, int], part: _Part, scale: float) -> np.ndarray:
    """A dark, jagged, branching path; sometimes starting at the part's edge."""
    span = 2.0 * min(part.hx, part.hy)
    length = _uni(rng, 0.22, 0.6) * span
    step = _uni(rng, 2.0, 3.5) * scale
    if rng.random() < 0.4:  # run in from an edge, as fatigue cracks do
        side = int(rng.integers(4))
        along = _uni(rng, -0.6, 0.6)
        u0, v0, inward = [
            (along * part.hx, -part.hy + 1, math.pi / 2),
            (along * part.hx, part.hy - 1, -math.pi / 2),
            (-part.hx + 1, along * part.hy, 0.0),
            (part.hx - 1, along * part.hy, math.pi),
        ][side]
        x0, y0 = part.to_image(np.array(u0), np.array(v0))
        start = (float(x0), float(y0))
        heading = inward + part.angle + _gauss(rng, 0, 0.35)
    else:
        start = _interior_point(rng, part, 0.5)
        heading = _uni(rng, 0, 2 * math.pi)

    def walk(x: float, y: float, h0: float, n: int, jag: float) -> tuple[np.ndarray, np.ndarray]:
        xs, ys, drift = [x], [y], h0
        for _ in range(n):
            # Zig-zag: each segment turns sharply around a slowly wandering main direction.
            drift += _gauss(rng, 0, 0.15)
            h = drift + _gauss(rng, 0, jag)
            s = step * _uni(rng, 0.6, 1.4)
            x, y = x + s * math.cos(h), y + s * math.sin(h)
            xs.append(x)
            ys.append(y)
        return np.array(xs), np.array(ys)

    n_main = max(4, int(length / step))
    mx, my = walk(*start, heading, n_main, _uni(rng, 0.35, 0.75))
    width = 2 if scale >= 1.5 or rng.random() < 0.15 else 1
    mask = _draw_path(shape, mx, my, width)
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(1, max(2, n_main - 1)))
        h = heading + _sign(rng) * _uni(rng, 0.4, 1.1)
        bx, by = walk(float(mx[k]), float(my[k]), h, max(2, int(n_main * _uni(rng, 0.2, 0.5))), 0.5)
        fade = np.linspace(1.0, 0.35, len(bx) - 1)
        mask = np.maximum(mask, _draw_path(shape, bx, by, 1, fade * _uni(rng, 0.6, 1.0)))
    return cv2.GaussianBlur(mask, (0, 0), 0.45)


def _edge_chip(rng: np.random.Generator, shape: tuple[int, int], part: _Part, scale: float) -> np.ndarray:
    """A missing, irregular notch on the part's outline (side or corner): the belt shows through."""
    span = 2.0 * min(part.hx, part.hy)
    radius = _uni(rng, 0.05, 0.11) * span
    if rng.random() < 0.3:  # corner chip
        su, sv = _sign(rng), _sign(rng)
        d = part.radius * (1 - 1 / math.sqrt(2))
        u0, v0 = su * (part.hx - d), sv * (part.hy - d)
        normal = math.atan2(sv, su)
        radius *= 1.2
    else:
        side = int(rng.integers(4))
        along = _uni(rng, -0.75, 0.75)
        u0, v0, normal = [
            (along * (part.hx - part.radius), -part.hy, -math.pi / 2),
            (along * (part.hx - part.radius), part.hy, math.pi / 2),
            (-part.hx, along * (part.hy - part.radius), math.pi),
            (part.hx, along * (part.hy - part.radius), 0.0),
        ][side]
    n = int(rng.integers(7, 12))
    # Evenly spread, jittered vertex angles: random ones can leave a gap whose chord cuts the
    # inward half off and leaves no chip at all.
    angles = (np.arange(n) + rng.uniform(-0.35, 0.35, n)) * (2 * math.pi / n) + _uni(rng, 0, 2 * math.pi)
    radii = radius * rng.uniform(0.65, 1.2, n)
    stretch = _uni(rng, 1.0, 1.8)  # chips run along the edge more than into the part
    tu, tv = -math.sin(normal), math.cos(normal)
    nu, nv = math.cos(normal), math.sin(normal)
    a = np.cos(angles) * radii * stretch
    b = np.sin(angles) * radii
    depth_shift = radius * _uni(rng, 0.0, 0.2)  # centre slightly outside: shallow chips
    u = u0 + a * tu + (b + depth_shift) * nu
    v = v0 + a * tv + (b + depth_shift) * nv
    x, y = part.to_image(u, v)
    canvas = np.zeros(shape, np.uint8)
    cv2.fillPoly(canvas, [_pts(x, y)], 255, cv2.LINE_AA, _AA_SHIFT)
    return canvas.astype(np.float32) / 255.0


# ---------------------------------------------------------------- the renderer

def render_sample(kind: str, rng: np.random.Generator, size: int = 160, exposure: float = 1.0) -> RenderedSample:
    """Render one line image of ``kind`` and its defect mask; see the module docstring."""
    _check_kind(kind)
    _check_render_args(size, exposure)
    seeds = rng.integers(0, 2**63 - 1, size=2)
    srng = np.random.default_rng(int(seeds[0]))  # the scene: identical for every kind
    drng = np.random.default_rng(int(seeds[1]))  # the defect only

    # Frame: area ~ size^2, aspect within +/-15 %.
    aspect = _uni(srng, 0.85, 1.15)
    h = max(MIN_SIZE // 2, int(round(size / math.sqrt(aspect))))
    w = max(MIN_SIZE // 2, int(round(size * math.sqrt(aspect))))
    shape = (h, w)
    scale = size / 160.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx += 0.5
    yy += 0.5

    # The part, with position, size and angle jitter.
    part = _Part(
        cx=w * (0.5 + _uni(srng, -0.05, 0.05)), cy=h * (0.5 + _uni(srng, -0.05, 0.05)),
        hx=w * _uni(srng, 0.33, 0.4), hy=h * _uni(srng, 0.33, 0.4),
        angle=math.radians(_uni(srng, -4.0, 4.0)), radius=min(w, h) * _uni(srng, 0.02, 0.1),
    )
    sdf = part.sdf(xx, yy)
    part_mask = np.clip(0.5 - sdf, 0.0, 1.0)

    # Light: a direction (for shading cues), a broad gradient, a hot spot and lens vignetting.
    light = _uni(srng, 0, 2 * math.pi)
    gx, gy = (float(g) for g in srng.uniform(-0.3, 0.3, 2))
    hot_x, hot_y = w * _uni(srng, 0.2, 0.8), h * _uni(srng, 0.2, 0.8)
    hot_s, hot_a = min(h, w) * _uni(srng, 0.25, 0.6), _uni(srng, 0.05, 0.3)
    vignette = _uni(srng, 0.15, 0.35)
    r2 = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / ((w / 2) ** 2 + (h / 2) ** 2)
    illum = ((1 + gx * (xx / w - 0.5) + gy * (yy / h - 0.5))
             * (1 + hot_a * np.exp(-((xx - hot_x) ** 2 + (yy - hot_y) ** 2) / (2 * hot_s ** 2)))
             * (1 - vignette * r2)).astype(np.float32)

    # Part surface: brushed grain along a machining direction, fine noise, slow albedo variation.
    base = _uni(srng, 0.3, 0.46)
    grain_angle = part.angle + (0.0 if srng.random() < 0.7 else math.pi / 2) + _gauss(srng, 0, 0.05)
    grain = _directional_grain(srng.standard_normal(shape).astype(np.float32), grain_angle,
                               int(round(_uni(srng, 9, 19) * scale)))
    slow = _smooth_noise(srng.standard_normal(shape).astype(np.float32), 18 * scale)
    fine = srng.standard_normal(shape).astype(np.float32)
    surface = 1 + _uni(srng, 0.03, 0.07) * grain + _uni(srng, 0.015, 0.04) * slow + 0.012 * fine

    # Edge chamfer catches the light on the side facing it.
    gy_sdf, gx_sdf = np.gradient(sdf)
    facing = np.clip(gx_sdf * math.cos(light) + gy_sdf * math.sin(light), -1, 1)
    chamfer = np.exp(-(((sdf + 1.8 * scale) / (1.1 * scale)) ** 2)) * (0.55 + 0.45 * facing)
    surface += _uni(srng, 0.15, 0.4) * chamfer

    # Nuisances every class has: faint smudges and specks of dust.
    nuisance = np.zeros(shape, np.float32)
    for _ in range(int(srng.integers(0, 3))):
        cx, cy = _interior_point(srng, part, 0.8)
        s = _uni(srng, 8, 25) * scale
        nuisance += _sign(srng) * _uni(srng, 0.02, 0.06) * np.exp(
            -((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    for _ in range(int(srng.poisson(1.5))):
        cx, cy = _interior_point(srng, part, 0.9)
        q, _, _ = _blob(xx, yy, cx, cy, _uni(srng, 0.5, 1.0) * scale, _uni(srng, 0.5, 1.0) * scale, 0.0)
        nuisance += _sign(srng) * _uni(srng, 0.04, 0.14) * np.exp(-(q ** 2))
    surface += nuisance

    # Conveyor belt behind the part: dark, coarse, with the part's soft shadow.
    belt = _uni(srng, 0.06, 0.14) * (1 + 0.12 * _smooth_noise(srng.standard_normal(shape).astype(np.float32), 1.2))
    shadow_dx, shadow_dy = -math.cos(light) * 3 * scale, -math.sin(light) * 3 * scale

    # Optics and sensor: blur, tint, and noise drawn now so that every kind consumes the same stream.
    blur_sigma = _uni(srng, 0.4, 0.8) * scale
    tint = np.array([1 + _uni(srng, -0.04, 0.05), 1.0, 1 + _uni(srng, -0.05, 0.03)], np.float32)
    sensor_noise = srng.standard_normal((h, w, 3)).astype(np.float32)

    # The defect, from its own generator.
    defect = np.zeros(shape, np.float32)
    if kind == "scratch":
        mask, contrast = _scratch(drng, shape, part, scale)
        interior = np.clip(-sdf - 1.0, 0.0, 1.0)
        defect = mask * interior
        surface = surface * (1 + contrast * defect)
    elif kind == "spot":
        mod = _spot(drng, xx, yy, part, scale, light) * np.clip(-sdf - 1.0, 0.0, 1.0)
        defect = np.clip(np.abs(mod) / (float(np.abs(mod).max()) + 1e-6), 0.0, 1.0)
        surface = surface * (1 + mod)
    elif kind == "crack":
        mask = _crack(drng, shape, part, scale) * np.clip(-sdf, 0.0, 1.0)
        defect = mask
        surface = surface * (1 - _uni(drng, 0.5, 0.85) * mask)
    elif kind == "edge_chip":
        chip = _edge_chip(drng, shape, part, scale)
        removed = np.minimum(chip, part_mask)
        # The fresh fracture face: a rough, darker rim just inside the new edge.
        rim = np.clip(cv2.GaussianBlur(chip, (0, 0), 1.2 * scale) * 2.0 - chip, 0.0, 1.0) * part_mask
        surface = surface * (1 - 0.35 * rim * (0.6 + 0.4 * drng.random(shape).astype(np.float32)))
        part_mask = part_mask * (1 - chip)
        defect = np.maximum(removed, 0.5 * rim)

    shadow_src = np.roll(part_mask, (int(round(shadow_dy)), int(round(shadow_dx))), axis=(0, 1))
    shadow = 1 - 0.45 * cv2.GaussianBlur(shadow_src, (0, 0), 2.0 * scale)
    albedo = part_mask * base * surface + (1 - part_mask) * belt * shadow
    radiance = cv2.GaussianBlur(np.maximum(albedo * illum, 0.0), (0, 0), blur_sigma)

    # Camera: exposure is gain on the radiance plus a slightly flatter or steeper tone curve;
    # photon noise grows with signal, read noise is fixed, so dark exposures are noisier.
    signal = exposure * radiance[:, :, None] * tint
    noisy = signal + sensor_noise * np.sqrt(4e-4 * signal + 2.5e-5)
    gamma = (1 / 1.8) * exposure ** -0.2
    out = np.clip(noisy, 0.0, 1.0) ** gamma
    image = np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return RenderedSample(kind=kind, image=image, defect_mask=defect.astype(np.float32))


def render_image(kind: str, rng: np.random.Generator, size: int = 160, exposure: float = 1.0) -> np.ndarray:
    """Render one HxWx3 uint8 RGB line image of ``kind`` (streaming use: the demo's hot folder)."""
    return render_sample(kind, rng, size, exposure).image


# ---------------------------------------------------------------- writing a dataset

def save_png(path: Path, image: np.ndarray) -> None:
    """Write an RGB image as PNG atomically, so a folder watcher never sees half a file."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected HxWx3 uint8 RGB, got {image.shape} {image.dtype}")
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.tobytes())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def image_rng(seed: int, kind: str, index: int) -> np.random.Generator:
    """The generator for image ``index`` of ``kind``: independent of ``n`` and of other classes."""
    return np.random.default_rng([seed, zlib.crc32(kind.encode()), index])


def generate_dataset(out_dir: Path, n: int = 40, exposure: float = 1.0, seed: int = 0, size: int = 160,
                     good_multiplier: int = 3, classes: Sequence[str] = KINDS,
                     masks_dir: Path | None = None) -> dict[str, int]:
    """Write ``out_dir/<class>/<class>_<seed>_<i>.png``: ``n`` per defect class, ``n*good_multiplier`` good.

    Imbalanced like a real line. Deterministic for a seed; use different seeds for train and test.
    ``masks_dir``: also write each defect image's pixel mask (255 = defect) to the same relative path
    there, the layout ``defect train --masks`` reads. Returns the number of images written per class.
    """
    for name, value in (("n", n), ("seed", seed), ("good_multiplier", good_multiplier)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if good_multiplier < 1:
        raise ValueError(f"good_multiplier must be >= 1, got {good_multiplier}")
    classes = tuple(classes)
    if not classes:
        raise ValueError("classes must not be empty")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes contain duplicates: {classes}")
    for kind in classes:
        _check_kind(kind)
    _check_render_args(size, exposure)

    out_dir = Path(out_dir)
    counts: dict[str, int] = {}
    for kind in classes:
        count = n * good_multiplier if kind == GOOD else n
        for i in range(count):
            sample = render_sample(kind, image_rng(seed, kind, i), size, exposure)
            save_png(out_dir / kind / f"{kind}_{seed}_{i}.png", sample.image)
            if masks_dir is not None and kind != GOOD:
                mask = np.where(sample.defect_mask > 0.1, 255, 0).astype(np.uint8)
                save_png(Path(masks_dir) / kind / f"{kind}_{seed}_{i}.png", cv2.cvtColor(mask, cv2.COLOR_GRAY2RGB))
        counts[kind] = count
    return counts
