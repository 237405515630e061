"""Vectorised two-sample statistics and their calibration. numpy/scipy only.

Every statistic here works on a *batch of windows* (leading axes ``...``) so the same code
scores one live window in the monitor and tens of thousands of resampled null windows at
calibration time; there is exactly one implementation of each statistic.

Calibration philosophy: no threshold is guessed. Each statistic's null distribution is
sampled by scoring windows resampled (bootstrap, with replacement) from in-domain images
that were *not* used to fit the reference, and the threshold is the upper ``alpha`` tail
quantile of that sample (``tail_threshold``; a generalised Pareto tail fit extrapolates when
``alpha`` is smaller than the sample resolves). The CUSUM threshold is set by simulating
the CUSUM on resampled streams until its in-control alarm rate equals the target
(``calibrate_cusum``).
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Kolmogorov-Smirnov from reference-ECDF values


class EcdfTable:
    """Reference samples of C columns, prepared so one ``searchsorted`` serves all columns.

    Each column is mapped monotonically onto its own slot ``[3j, 3j + 1]`` (values beyond the
    reference range are clipped just outside the slot, which keeps their counts exact), and
    the slots are concatenated into one sorted array.
    """

    def __init__(self, samples: np.ndarray):
        ref = np.asarray(samples, dtype=np.float64)
        if ref.ndim != 2 or ref.shape[0] == 0:
            raise ValueError(f"reference samples must be (n, C) with n >= 1, got shape {ref.shape}")
        self.n, self.n_cols = ref.shape
        self._lo = ref.min(axis=0)
        span = ref.max(axis=0) - self._lo
        self._inv = 1.0 / np.where(span > 0, span, 1.0)
        self._offset = 3.0 * np.arange(self.n_cols)
        self._flat = np.sort(self._map(ref), axis=0).T.ravel()
        self._base = (np.arange(self.n_cols) * self.n).astype(np.float64)

    def _map(self, values: np.ndarray) -> np.ndarray:
        return np.clip((values - self._lo) * self._inv, -0.5, 1.5) + self._offset

    def lookup(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, C) values -> (lo, hi) float32 (N, C): reference fraction ``< v`` and ``<= v``."""
        v = np.asarray(values, dtype=np.float64)
        if v.ndim != 2 or v.shape[1] != self.n_cols:
            raise ValueError(f"expected (N, {self.n_cols}) values, got shape {v.shape}")
        q = self._map(v)
        lo = (np.searchsorted(self._flat, q, side="left") - self._base).astype(np.float32)
        hi = (np.searchsorted(self._flat, q, side="right") - self._base).astype(np.float32)
        scale = np.float32(1.0 / self.n)
        return lo * scale, hi * scale


def ecdf_values(ref_samples: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference ECDF just below and at each value, per column (see ``EcdfTable``).

    ``ref_samples``: (n, C); ``values``: (N, C). Returns ``(lo, hi)`` float32 (N, C): fraction
    of reference samples ``< v`` and ``<= v``. Computing these once per image makes a
    window's KS statistic a sort of ``w`` numbers.
    """
    return EcdfTable(ref_samples).lookup(values)


def ks_statistic(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Two-sample KS distance between each window and the reference, per column.

    ``lo``/``hi``: (..., w, C) reference-ECDF values of the window's members (``ecdf_values``).
    Returns (..., C). Exact, ties included: sup(F_w - F_r) is attained at a window point with
    the right-continuous reference ECDF, sup(F_r - F_w) just below one, and both ECDF values
    are monotone in the sample value, so sorting the ECDF values sorts the sample.
    """
    w = lo.shape[-2]
    i = np.arange(w, dtype=np.float32).reshape((w, 1))
    d_plus = ((i + 1.0) / w - np.sort(hi, axis=-2)).max(axis=-2)
    d_minus = (np.sort(lo, axis=-2) - i / w).max(axis=-2)
    return np.maximum(d_plus, d_minus)


# --------------------------------------------------------------------------------------------
# MMD with an RBF kernel


def median_heuristic_gamma(points: np.ndarray) -> float:
    """``1 / median(squared pairwise distance)``: the usual RBF bandwidth choice for MMD."""
    sq = np.sum(points ** 2, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * points @ points.T
    off = d2[~np.eye(len(points), dtype=bool)]
    med = float(np.median(np.maximum(off, 0.0))) if off.size else 1.0
    return 1.0 / med if med > 0 else 1.0


def rbf_mean(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    """Mean of exp(-gamma |a_i - b_j|^2) over i, j. ``a``: (..., n, d), ``b``: (..., m, d) or (m, d)."""
    a2 = np.sum(a * a, axis=-1)[..., :, None]
    b2 = np.sum(b * b, axis=-1)[..., None, :]
    d2 = a2 + b2 - 2.0 * (a @ np.swapaxes(b, -1, -2))
    np.maximum(d2, 0.0, out=d2)
    return np.exp(-gamma * d2).mean(axis=(-1, -2))


def mmd2_statistic(window: np.ndarray, ref: np.ndarray, gamma: float, ref_mean_kernel: float) -> np.ndarray:
    """Biased MMD^2 between each window (..., w, d) and the reference points (m, d)."""
    return rbf_mean(window, window, gamma) + ref_mean_kernel - 2.0 * rbf_mean(window, ref, gamma)


# --------------------------------------------------------------------------------------------
# predicted-class histogram


def chi2_statistic(pred: np.ndarray, ref_freq: np.ndarray) -> np.ndarray:
    """Pearson chi-square of each window's predicted-class counts against the reference frequencies.

    ``pred``: (..., w) integer class indices; ``ref_freq``: (C,) strictly positive, sums to 1.
    """
    n_cls = len(ref_freq)
    w = pred.shape[-1]
    counts = np.zeros(pred.shape[:-1] + (n_cls,), dtype=np.float64)
    for c in range(n_cls):
        counts[..., c] = np.count_nonzero(pred == c, axis=-1)
    expected = w * ref_freq
    return (((counts - expected) ** 2) / expected).sum(axis=-1)


# --------------------------------------------------------------------------------------------
# thresholds from null samples


def tail_threshold(null: np.ndarray, alpha: float, *, min_exceedances: int = 50,
                   tail_fraction: float = 0.05) -> float:
    """Threshold ``t`` with P(null score > t) ~= ``alpha``, from a sample of null scores.

    When the sample holds at least ``min_exceedances`` scores beyond the quantile it is read
    off directly (the smallest ``t`` leaving at most ``alpha * B`` scores above). Otherwise a
    generalised Pareto distribution is fitted (probability-weighted moments) to the top ``tail_fraction``
    of the sample and extrapolated; the result is never below the empirical quantile at the
    sample's resolution, so extrapolation can only make the threshold more conservative.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    x = np.sort(np.asarray(null, dtype=np.float64))
    x = x[np.isfinite(x)]
    n = len(x)
    if n < 20:
        raise ValueError(f"need at least 20 null scores to set a threshold, got {n}")
    k = int(np.ceil((1.0 - alpha) * n)) - 1
    empirical = float(x[min(max(k, 0), n - 1)])
    if alpha * n >= min_exceedances:
        return empirical
    n_tail = max(int(tail_fraction * n), min(n - 1, 2 * min_exceedances))
    u = float(x[n - n_tail - 1])
    y = x[n - n_tail:] - u
    if float(y.max()) <= 0.0:  # a flat tail (discrete statistic): nothing to extrapolate
        return empirical
    p_tail = n_tail / n
    q = _gpd_isf(y, alpha / p_tail)
    return max(u + q, empirical)


def _gpd_isf(excess: np.ndarray, p: float) -> float:
    """Upper-``p`` quantile of a generalised Pareto fitted to ``excess`` (>= 0).

    Probability-weighted moments (Hosking & Wallis 1987): closed form, no optimiser, robust
    for the shape range that matters here (bounded to light-tailed statistics, shape <= 0.5),
    and unbothered by ties. Falls back to an exponential tail when the moments are degenerate.
    """
    y = np.sort(np.asarray(excess, dtype=np.float64))
    n = len(y)
    a0 = float(y.mean())
    plotting = (np.arange(1, n + 1) - 0.35) / n
    a1 = float(np.mean((1.0 - plotting) * y))
    denom = a0 - 2.0 * a1
    if a0 <= 0.0:
        return 0.0
    if denom <= 0.0:
        return a0 * float(np.log(1.0 / p))
    xi = -(a0 / denom - 2.0)  # Hosking's k is -xi
    sigma = 2.0 * a0 * a1 / denom
    xi = float(np.clip(xi, -1.0, 0.5))
    if abs(xi) < 1e-6:
        return sigma * float(np.log(1.0 / p))
    return sigma / xi * (p ** (-xi) - 1.0)


# --------------------------------------------------------------------------------------------
# CUSUM


def cusum_path(increments: np.ndarray, start: np.ndarray | float = 0.0) -> np.ndarray:
    """Page's CUSUM S_t = max(0, S_{t-1} + x_t) along the last axis, without a Python loop.

    Uses the Lindley identity S_t = C_t - min(-S_0, min_{s<=t} C_s) with C the cumulative sum.
    """
    c = np.cumsum(increments, axis=-1)
    floor = np.minimum.accumulate(c, axis=-1)
    floor = np.minimum(floor, -np.asarray(start, dtype=np.float64)[..., None])
    return c - floor


def count_cusum_alarms(increments: np.ndarray, h: float, start: np.ndarray | None = None
                       ) -> tuple[int, np.ndarray]:
    """Alarms of restart-after-alarm CUSUMs, one per row of ``increments`` (M, T), at threshold ``h``.

    Vectorised over rows; a row that alarms restarts at zero from the next image, which is
    handled by re-running only the rows that alarmed, from where they alarmed (a handful of
    passes when alarms are rare within the block). Returns (alarm count, final states).
    """
    m, t = increments.shape
    state = np.zeros(m) if start is None else np.asarray(start, dtype=np.float64).copy()
    pos = np.zeros(m, dtype=np.int64)
    cols = np.arange(t)
    rows = np.arange(m)
    total = 0
    while rows.size:
        c0 = int(pos[rows].min())  # columns every remaining row has already processed are skipped
        x = increments[rows, c0:]
        if c0 < t and pos[rows].max() > c0:
            x = np.where(cols[None, c0:] >= pos[rows, None], x, 0.0)
        path = cusum_path(x, state[rows])  # before pos the path just holds the state (<= h)
        over = path > h
        hit = over.any(axis=1)
        first = over.argmax(axis=1) + c0
        quiet = rows[~hit]
        state[quiet] = path[~hit, -1]
        alarmed = rows[hit]
        total += int(alarmed.size)
        pos[alarmed] = first[hit] + 1
        state[alarmed] = 0.0
        rows = alarmed[pos[alarmed] < t]
    return total, state


def calibrate_cusum(null_increments: np.ndarray, arl0: float, *, rng: np.random.Generator,
                    n_streams: int = 100, max_draws: int = 1_000_000, alarms_wanted: int = 150,
                    resample_pool: bool = True, smooth: bool = True,
                    bounds: tuple[float, float] = (-np.inf, np.inf)) -> float:
    """Threshold ``h`` at which a restart-after-alarm CUSUM alarms once per ``arl0`` in-domain images.

    ``null_increments``: per-image CUSUM increments (standardised score minus the reference
    value k) of held-out in-domain images. ``n_streams`` equal-length streams are resampled
    from them, each (with ``resample_pool``) from its own redraw of the pool: the two-level
    bootstrap that lets the pool's sampling error, to which the CUSUM is sensitive at long
    run lengths, show up in the null. ``h`` is set by bisection so that the alarm rate over
    all streams (restarting at zero after each alarm, as the monitor does) is ``1 / arl0``.
    Pooling alarms over equal-length streams averages the per-stream *rates*, which is what
    a mixture of possible in-domain distributions needs; averaging first-passage run
    lengths instead would be dominated by the quietest streams and set ``h`` too low.
    With ``smooth`` each draw also gets Gaussian kernel noise (Silverman's bandwidth,
    clipped to ``bounds``, the range the live increments can take): a pool of a few hundred
    images has no values beyond its own maximum, while a long in-domain stream does.
    The simulation is sized for about ``alarms_wanted`` alarms at the target (capped by
    ``max_draws`` images), so the rate is known to a few percent.
    """
    if arl0 <= 1:
        raise ValueError(f"arl0 must exceed 1 image, got {arl0}")
    pool = np.asarray(null_increments, dtype=np.float64)
    if pool.size < 8:
        raise ValueError("need at least 8 null increments to calibrate a CUSUM")
    total = int(min(max(alarms_wanted * arl0, 20_000), max_draws))
    length = max(total // n_streams, 200)
    source = pool[rng.integers(0, pool.size, size=(n_streams, pool.size))] if resample_pool \
        else np.broadcast_to(pool, (n_streams, pool.size))
    draws = np.take_along_axis(source, rng.integers(0, pool.size, size=(n_streams, length)), axis=1)
    if smooth:  # Gaussian-kernel smoothed bootstrap, Silverman's bandwidth; stays within ``bounds``
        bw = 1.06 * float(pool.std()) * pool.size ** -0.2
        draws = np.clip(draws + rng.normal(0.0, bw, size=draws.shape), bounds[0], bounds[1])
    block = int(np.clip(arl0 / 2, 64, 4096))
    target = n_streams * length / arl0  # alarms expected at the right threshold

    def too_many(h: float) -> bool:
        """More alarms than the target at threshold h? Stops counting once the answer is known."""
        state = np.zeros(n_streams)
        count = 0
        for t0 in range(0, length, block):
            c, state = count_cusum_alarms(draws[:, t0:t0 + block], h, state)
            count += c
            if count > target:
                return True
        return False

    lo, hi = 0.0, max(float(pool.max()), 0.5)
    while too_many(hi):
        lo, hi = hi, hi * 1.5
        if hi > 1e6:
            raise ValueError("CUSUM calibration diverged: increments drift upwards (is k too small?)")
    while hi - lo > 5e-3 * hi:
        mid = 0.5 * (lo + hi)
        if too_many(mid):
            lo = mid
        else:
            hi = mid
    return hi
