"""The drift reference: what in-domain data looks like to each detector, plus calibrated thresholds.

Fitted once at export time from in-domain images (their pooled embeddings, image statistics
and class probabilities) and shipped next to the model as one ``.npz`` file (arrays, plus the
scalars as a JSON string; no pickle anywhere).

The in-domain images are split in two. The *fit* part defines the reference: embedding mean,
a shrinkage covariance (Ledoit-Wolf intensity, kept as its top principal components plus an
isotropic remainder), per-component reference samples, image-statistic samples and the
predicted-class frequencies. The *calibration pool* (held out, or passed explicitly as
images the model was not trained on) is only ever used to sample the detectors' null
distributions: windows are resampled from it (with replacement) and scored exactly as live
windows are, so each threshold is an upper quantile of what in-domain windows actually score
against this reference, including the reference's own estimation noise.

The pool is itself only a sample of the in-domain distribution. For statistics that compare
a window with the independent fit set (KS, T^2, MMD, chi-square) that sampling error is
already inside the null: pool windows deviate from the fit set the way fresh windows do,
plus the pool's own deviation, which errs conservative. The effect grows with dimension:
for ``mean_shift`` (T^2 in m = 64 whitened dimensions) the pool adds about ``w * m / P`` to
the null's mean and widens it (the pool covariance's own noise), so calibrated to 1% it
alarms at ~0.15% on fresh data from a 400-image pool. This is kept on purpose: removing it
(rescaling the pool's offset) made ``mean_shift`` exact on truly fresh data but doubled the
false alarms measured the way an evaluation on real data must, by resampling a finite
held-out set, and a false alarm costs a re-adaptation while a more conservative T^2 costs
a few images of delay on weak shifts only.

The standardised novelty, though, is centred *on the pool*, so its null would miss the
pool's deviation from the truth. There each null window gets a centre offset drawn from
N(0, 1/P) (the sampling distribution of the pool mean in standardised units), and each
simulated CUSUM stream runs on its own redraw of the pool with Gaussian-kernel smoothing (a
smoothed two-level bootstrap: a pool has nothing beyond its own maximum, a long stream
does). With a plain bootstrap the CUSUM ran at up to 2x its false-alarm budget on fresh
data; with this its in-control run length on fresh data was 0.4x-6x the target over eight
400-image pools (median 1.4x). At 10k-image run lengths a CUSUM on single-image scores
depends on tails a few hundred images cannot pin down; the windowed detectors average over
``window`` images and are much less exposed.

Detectors (all scores: larger = more drift):

- ``ks_embedding``: max over the top-k principal components of the two-sample KS distance
  between the window's projections and the reference's. Taking the max of equally
  distributed statistics is the min-p (Bonferroni-ordered) combination; calibrating the
  max itself makes the correction exact for correlated components.
- ``mean_shift``: Hotelling's T^2 of the window mean, ``w * |mean of whitened projections|^2``
  over all kept components: the textbook test for a shifted mean, which a per-image
  distance in 1280-d misses (the shift drowns in the residual dimensions' noise).
- ``mahalanobis``: the window mean of per-image novelty: log squared Mahalanobis distance
  under the shrunk covariance (top components + isotropic residual, so variance growth and
  shifts outside the principal subspace count), standardised on the calibration pool and
  winsorised at +-``novelty_clip`` so one odd image cannot raise an alarm on its own.
- ``image_stats``: max over image statistics of the KS distance (same correction).
- ``mmd``: biased RBF MMD^2 on whitened top-k projections, bandwidth by the median heuristic.
- ``predictions``: Pearson chi-square of the predicted-class histogram against the reference
  frequencies. A change of defect rate shows up here too, so it is a diagnostic and not part
  of ``combined``.
- ``combined`` (default): max over ``ks_embedding``, ``mean_shift``, ``mahalanobis``,
  ``image_stats`` of each score normalised to 0 at its null median and 1 at its own
  threshold; calibrated as a statistic of its own on the same null windows, so the
  correction for taking a max over correlated detectors is exact.
- ``cusum``: Page's CUSUM on the same standardised, winsorised novelty, streaming, no window.

Per-window false-alarm rate ``alpha`` and the streaming budget are tied by the stride: a
monitor scoring a window every ``stride`` images makes ``10_000 / stride`` tests per 10k
images, so ``alpha = false_alarms_per_10k * stride / 10_000`` bounds the expected number of
alarmed windows, and hence of alarm episodes, by the budget (union bound; overlapping windows
alarm in clusters, so the realised episode rate is lower). Per-window rates far below what
the null sample resolves come from a generalised Pareto tail fit (``tail_threshold``). The
CUSUM threshold is set for an in-control alarm rate of ``false_alarms_per_10k`` per 10k
images (restart after each alarm).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.drift.detectors import (
    calibrate_cusum,
    EcdfTable,
    chi2_statistic,
    ks_statistic,
    median_heuristic_gamma,
    mmd2_statistic,
    rbf_mean,
    tail_threshold,
)
from pipeline.drift.stats import IMAGE_STAT_NAMES

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FORMAT_KIND = "defect-pipeline drift reference"
WINDOW_DETECTORS: tuple[str, ...] = ("ks_embedding", "mean_shift", "mahalanobis", "image_stats", "mmd",
                                     "predictions")
COMBINED_MEMBERS: tuple[str, ...] = ("ks_embedding", "mean_shift", "mahalanobis", "image_stats")
DETECTORS: tuple[str, ...] = WINDOW_DETECTORS + ("combined", "cusum")
DEFAULT_DETECTOR = "combined"
"""Chosen by measurement with ``bench/drift_synthetic.py`` (1280-d synthetic embeddings, 600
in-domain images, budget 1 per 10k, window 32, stride 8): ``combined`` stayed within budget
(0.45 episodes per 10k over 200k fresh in-domain images) and detected every domain shift,
median delay 16-40 images (mean shifts of 1 sd in major or minor components, variance x1.5,
a new direction, brightness); each single detector was blind to at least two of them
(``cusum`` is fastest, 8 images, on variance growth and new directions but misses mean
shifts inside the principal subspace; ``ks_embedding``/``mean_shift`` miss brightness, and
``ks_embedding`` variance growth). It ignores a changed defect rate, which is not a domain
shift. On ImageNet Lite0 embeddings of magnetic-tile (reference from exposure sessions 1-2,
in-domain streams resampled from held-out 1-2 images) it alarmed after 16 images of sessions
5-6 and 24 of sessions 3-4, at 1.0-1.2 false episodes per 10k."""

MMD_NULL_WINDOWS = 5000
MIN_FIT_SAMPLES = 16
MIN_POOL_SAMPLES = 16
_EPS = 1e-12


class DriftReferenceError(ValueError):
    """A drift reference file that cannot be used (missing, corrupt, wrong version, mismatched model)."""


@dataclass(frozen=True)
class ImageFeatures:
    """What the detectors need per image, computed once when the image arrives.

    Arrays share their leading axes: (N,) for a batch of images, (B, w) for B windows.
    """

    emb_lo: np.ndarray   # (..., k) reference ECDF just below each principal-component projection
    emb_hi: np.ndarray   # (..., k) reference ECDF at each projection
    img_lo: np.ndarray   # (..., S) same for the image statistics
    img_hi: np.ndarray
    novelty: np.ndarray  # (...,) standardised, winsorised log squared Mahalanobis distance
    pred: np.ndarray     # (...,) predicted class index
    white: np.ndarray    # (..., m) whitened projections on all kept components

    def __len__(self) -> int:
        return int(self.novelty.shape[0])

    def take(self, idx: np.ndarray | slice) -> "ImageFeatures":
        """Rows ``idx`` of every array; a (B, w) index array gives B windows of w images."""
        return ImageFeatures(self.emb_lo[idx], self.emb_hi[idx], self.img_lo[idx], self.img_hi[idx],
                             self.novelty[idx], self.pred[idx], self.white[idx])


@dataclass(frozen=True)
class Calibration:
    """Thresholds for one (window, stride, false-alarm budget); see the module docs for how."""

    window: int
    stride: int
    false_alarms_per_10k: float
    window_alpha: float
    thresholds: dict[str, float]
    centers: dict[str, float]   # null medians, the zero point of the ``combined`` normalisation
    n_null_windows: int

    def combined_score(self, scores: dict[str, Any]) -> Any:
        """Max over COMBINED_MEMBERS of (score - null median) / (threshold - null median)."""
        parts = []
        for d in COMBINED_MEMBERS:
            span = max(self.thresholds[d] - self.centers[d], _EPS)
            parts.append((np.asarray(scores[d], dtype=np.float64) - self.centers[d]) / span)
        return np.max(np.stack(parts), axis=0)


def _as_matrix(x: Any, name: str, cols: int | None = None, dtype: Any = np.float64) -> np.ndarray:
    a = np.asarray(x, dtype=dtype)
    if a.ndim == 1 and cols is not None and a.shape[0] == cols:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (images x values), got shape {a.shape}")
    if cols is not None and a.shape[1] != cols:
        raise ValueError(f"{name} has {a.shape[1]} columns, the drift reference expects {cols}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def check_inputs(embeddings: Any, image_stats: Any, probs: Any, *, dim: int | None = None,
                 n_stats: int | None = None, n_classes: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and convert one batch: (N, D) float32, (N, S) float64, (N, C) float64."""
    e = _as_matrix(embeddings, "embeddings", dim, np.float32)
    s = _as_matrix(image_stats, "image_stats", n_stats)
    p = _as_matrix(probs, "probs", n_classes)
    if not (len(e) == len(s) == len(p)):
        raise ValueError(f"batch sizes differ: embeddings {len(e)}, image_stats {len(s)}, probs {len(p)}")
    if p.shape[1] < 2:
        raise ValueError("probs needs one column per class (at least 2)")
    return e, s, p


def _project(x: np.ndarray, components: np.ndarray, rows: int = 8) -> np.ndarray:
    """``x @ components.T`` in blocks of ``rows`` rows.

    One (32 x 1280) @ (1280 x 64) product is big enough for OpenBLAS to go multi-threaded,
    and on a busy host (ONNX Runtime's own threads, other services) that turns a 0.1 ms
    product into several milliseconds of thread hand-offs. Eight-row blocks stay on the
    calling thread.
    """
    if len(x) <= rows:
        return x @ components.T
    out = np.empty((len(x), components.shape[0]), dtype=np.result_type(x, components))
    for i in range(0, len(x), rows):
        np.matmul(x[i:i + rows], components.T, out=out[i:i + rows])
    return out


def _shrunk_pca(x: np.ndarray, n_keep: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Top principal directions of centred data ``x`` (n, D) with Ledoit-Wolf shrunk variances.

    The Ledoit-Wolf estimate (1 - a) S + a mu I (S the sample covariance, mu = tr S / D) is
    well conditioned even with far fewer samples than dimensions; its eigenvectors are S's
    and its eigenvalues shrink towards mu. We keep the top ``n_keep`` exactly and replace the
    rest by their average (an isotropic remainder), which makes the Mahalanobis distance
    O(n_keep * D) per image. The intensity ``a`` is computed from the n x n or D x D Gram
    matrix, whichever is smaller. Returns (components (m, D), variances (m,), residual
    variance, shrinkage).
    """
    n, d = x.shape
    sq_norms = np.einsum("ij,ij->i", x, x)
    if n <= d:
        gram = x @ x.T
        evals, evecs = np.linalg.eigh(gram)
        order = np.argsort(evals)[::-1]
        evals, evecs = np.maximum(evals[order], 0.0), evecs[:, order]
        m = int(min(n_keep, d, np.count_nonzero(evals > evals[0] * 1e-10) if evals[0] > 0 else 0))
        comps = (x.T @ evecs[:, :m]) / np.sqrt(evals[:m])
        comps = comps.T
    else:
        gram = x.T @ x
        evals, evecs = np.linalg.eigh(gram)
        order = np.argsort(evals)[::-1]
        evals, evecs = np.maximum(evals[order], 0.0), evecs[:, order]
        m = int(min(n_keep, d))
        comps = evecs[:, :m].T
    sum_g2 = float(np.sum(gram * gram))
    cov_evals = evals / n
    trace = float(sq_norms.sum()) / n
    mu = trace / d
    delta2 = sum_g2 / n ** 2 - d * mu ** 2
    beta2 = (float(np.sum(sq_norms ** 2)) - sum_g2 / n) / n ** 2
    shrink = float(min(max(beta2, 0.0), delta2) / delta2) if delta2 > 0 else 1.0
    kept = cov_evals[:m]
    variances = (1.0 - shrink) * kept + shrink * mu
    if m < d:
        rest = max(trace - float(kept.sum()), 0.0) / (d - m)
        residual = (1.0 - shrink) * rest + shrink * mu
    else:
        residual = 1.0
    floor = max(mu, _EPS) * 1e-6  # all-identical inputs: keep the distance finite
    return (comps.astype(np.float32), np.maximum(variances, floor), float(max(residual, floor)), shrink)


@dataclass(eq=False)
class DriftReference:
    """Reference statistics of in-domain data and the default calibration. See the module docs."""

    mean: np.ndarray              # (D,) float32
    components: np.ndarray        # (m, D) float32, orthonormal rows, descending variance
    variances: np.ndarray         # (m,) shrunk variances along the components
    residual_variance: float      # shrunk variance per dimension outside the components
    shrinkage: float              # Ledoit-Wolf intensity
    n_components: int             # k: components used by ks_embedding and mmd
    ref_projections: np.ndarray   # (n_fit, k) fit-set projections on the top k components
    ref_image_stats: np.ndarray   # (n_fit, S)
    class_freq: np.ndarray        # (C,) smoothed predicted-class frequencies of the fit set
    mmd_points: np.ndarray        # (r, k) whitened fit-set projections (subsample)
    mmd_gamma: float
    mmd_ref_kernel: float         # mean kernel value within mmd_points
    pool_projections: np.ndarray  # (P, m) calibration pool projections on all kept components
    pool_novelty: np.ndarray      # (P,) raw novelty (log squared Mahalanobis distance)
    pool_image_stats: np.ndarray  # (P, S)
    pool_pred: np.ndarray         # (P,) int
    novelty_mean: float           # novelty standardisation (from the pool)
    novelty_std: float
    novelty_clip: float           # winsorisation of standardised novelty
    cusum_k: float                # CUSUM reference value, in standard deviations of novelty
    cusum_h: float                # CUSUM threshold for false_alarms_per_10k
    window: int
    stride: int
    false_alarms_per_10k: float
    window_alpha: float
    nulls: dict[str, np.ndarray]  # null window scores at ``window``, one array per window detector
    image_stat_names: tuple[str, ...] = IMAGE_STAT_NAMES
    classes: tuple[str, ...] | None = None
    seed: int = 0
    n_fit: int = 0
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._ref_proj_table = EcdfTable(self.ref_projections) if len(self.ref_projections) else None
        self._ref_stats_table = EcdfTable(self.ref_image_stats)
        self._white_scale = (1.0 / np.sqrt(self.variances)).astype(np.float32)

    # ---------------------------------------------------------------- shapes

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.class_freq.shape[0])

    @property
    def n_image_stats(self) -> int:
        return int(self.ref_image_stats.shape[1])

    @property
    def n_pool(self) -> int:
        return int(self.pool_novelty.shape[0])

    # ---------------------------------------------------------------- per image

    def novelty(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) embeddings -> (log squared Mahalanobis distance (N,), projections (N, m))."""
        x = np.asarray(embeddings, dtype=np.float32) - self.mean
        z = _project(x, self.components)
        z64 = z.astype(np.float64)
        zz = z64 * z64
        d2 = (zz / self.variances).sum(axis=1)
        if self.components.shape[0] < self.dim:
            x64 = x.astype(np.float64)
            r2 = np.maximum(np.einsum("ij,ij->i", x64, x64) - zz.sum(axis=1), 0.0)
            d2 += r2 / self.residual_variance
        return np.log(d2 + _EPS), z

    def _features_from(self, proj: np.ndarray, novelty: np.ndarray, stats: np.ndarray,
                       pred: np.ndarray) -> ImageFeatures:
        emb_lo, emb_hi = self._ref_proj_table.lookup(proj[:, : self.n_components])
        img_lo, img_hi = self._ref_stats_table.lookup(stats)
        white = np.asarray(proj, dtype=np.float32) * self._white_scale
        return ImageFeatures(emb_lo, emb_hi, img_lo, img_hi, self.standardise_novelty(novelty),
                             np.asarray(pred, np.int64), white)

    def standardise_novelty(self, novelty: np.ndarray) -> np.ndarray:
        """Raw log squared distances -> pool-standardised scores winsorised at +-novelty_clip."""
        z = (np.asarray(novelty, np.float64) - self.novelty_mean) / self.novelty_std
        return np.clip(z, -self.novelty_clip, self.novelty_clip)

    def features(self, embeddings: Any, image_stats: Any, probs: Any) -> ImageFeatures:
        """Per-image detector inputs for a batch; validates shapes against this reference."""
        e, s, p = check_inputs(embeddings, image_stats, probs, dim=self.dim,
                               n_stats=self.n_image_stats, n_classes=self.n_classes)
        novelty, proj = self.novelty(e)
        return self._features_from(proj, novelty, s, p.argmax(axis=1))

    def pool_features(self) -> ImageFeatures:
        """Features of the calibration pool (cached), the population null windows are drawn from."""
        if "pool" not in self._cache:
            self._cache["pool"] = self._features_from(self.pool_projections, self.pool_novelty,
                                                      self.pool_image_stats, self.pool_pred)
        return self._cache["pool"]

    # ---------------------------------------------------------------- per window

    def window_scores(self, f: ImageFeatures, detectors: tuple[str, ...] = WINDOW_DETECTORS
                      ) -> dict[str, np.ndarray]:
        """Scores of windows ``f`` (arrays shaped (..., w, ...)) for each named window detector."""
        out: dict[str, np.ndarray] = {}
        for d in detectors:
            if d == "ks_embedding":
                out[d] = ks_statistic(f.emb_lo, f.emb_hi).max(axis=-1).astype(np.float64)
            elif d == "image_stats":
                out[d] = ks_statistic(f.img_lo, f.img_hi).max(axis=-1).astype(np.float64)
            elif d == "mean_shift":
                out[d] = f.white.shape[-2] * np.square(f.white.mean(axis=-2, dtype=np.float64)).sum(axis=-1)
            elif d == "mahalanobis":
                out[d] = f.novelty.mean(axis=-1)
            elif d == "mmd":
                top = f.white[..., : self.n_components]
                out[d] = mmd2_statistic(top, self.mmd_points, self.mmd_gamma, self.mmd_ref_kernel).astype(np.float64)
            elif d == "predictions":
                out[d] = chi2_statistic(f.pred, self.class_freq)
            else:
                raise ValueError(f"unknown window detector {d!r}; choose from {WINDOW_DETECTORS}")
        return out

    def null_scores(self, window: int, n_windows: int, rng: np.random.Generator,
                    detectors: tuple[str, ...] = WINDOW_DETECTORS) -> dict[str, np.ndarray]:
        """Scores of ``n_windows`` windows of ``window`` images resampled with replacement from the pool.

        Sampling with replacement reproduces the window-to-window variance of fresh iid images
        (without replacement from a small pool would understate it). ``mahalanobis`` gets the
        pool-centre offset described in the module docs. ``mmd``, by far the costliest and
        not part of ``combined``, is sampled on at most MMD_NULL_WINDOWS windows (its far tail
        then comes from the generalised Pareto fit). Chunked to bound memory.
        """
        if window < 2:
            raise ValueError(f"window must be at least 2 images, got {window}")
        rest = tuple(d for d in detectors if d != "mmd")
        out = self._null_pass(window, n_windows, rng, rest) if rest else {}
        if "mmd" in detectors:
            out.update(self._null_pass(window, min(n_windows, MMD_NULL_WINDOWS), rng, ("mmd",)))
        return {d: out[d] for d in detectors}

    def _null_pass(self, window: int, n_windows: int, rng: np.random.Generator,
                   detectors: tuple[str, ...]) -> dict[str, np.ndarray]:
        pool = self.pool_features()
        n_pool = len(pool)
        width = max(self.n_components, self.n_image_stats, len(self.mmd_points), len(self.variances), window)
        chunk = max(1, 2_000_000 // (window * width))
        out = {d: np.empty(n_windows, dtype=np.float64) for d in detectors}
        for start in range(0, n_windows, chunk):
            b = min(chunk, n_windows - start)
            idx = rng.integers(0, n_pool, size=(b, window))
            scores = self.window_scores(pool.take(idx), detectors)
            if "mahalanobis" in scores:
                scores["mahalanobis"] = scores["mahalanobis"] + rng.normal(0.0, 1.0 / np.sqrt(n_pool), size=b)
            for d in detectors:
                out[d][start:start + b] = scores[d]
        return out

    # ---------------------------------------------------------------- calibration

    def calibrate(self, *, window: int | None = None, stride: int | None = None,
                  false_alarms_per_10k: float | None = None, false_alarm_rate: float | None = None,
                  n_null_windows: int | None = None, seed: int | None = None) -> Calibration:
        """Thresholds for every detector at a window size, stride and false-alarm budget.

        ``false_alarm_rate`` (per window) takes precedence; otherwise the per-window rate is
        ``false_alarms_per_10k * stride / 10_000`` (default: the budget fitted with). The stored
        null scores are reused when ``window`` matches the fitted one; any other window is
        resampled from the stored calibration pool (about a second). Results are cached.
        """
        window = int(window or self.window)
        stride = int(stride or self.stride)
        if window < 2 or stride < 1:
            raise ValueError(f"need window >= 2 and stride >= 1, got window={window}, stride={stride}")
        if false_alarm_rate is not None:
            alpha = float(false_alarm_rate)
            budget = alpha * 10_000.0 / stride
        else:
            budget = float(false_alarms_per_10k if false_alarms_per_10k is not None else self.false_alarms_per_10k)
            alpha = budget * stride / 10_000.0
        if not 0.0 < alpha <= 0.5:
            raise ValueError(f"per-window false-alarm rate must be in (0, 0.5], got {alpha:g} "
                             f"(budget {budget:g} per 10k images at stride {stride})")
        seed = self.seed if seed is None else seed
        key = (window, stride, round(alpha, 15), n_null_windows, seed)
        if key in self._cache:
            return self._cache[key]
        stored = len(self.nulls["ks_embedding"]) if self.nulls else 20_000
        if window == self.window and self.nulls and n_null_windows in (None, stored):
            nulls = self.nulls
        else:
            nulls = self.null_scores(window, n_null_windows or stored, np.random.default_rng([seed, window]))
        thresholds = {d: tail_threshold(nulls[d], alpha) for d in WINDOW_DETECTORS}
        centers = {d: float(np.median(nulls[d])) for d in WINDOW_DETECTORS}
        cal = Calibration(window, stride, budget, alpha, thresholds, centers, len(nulls[WINDOW_DETECTORS[0]]))
        thresholds["combined"] = tail_threshold(cal.combined_score(nulls), alpha)
        centers["combined"] = float(np.median(cal.combined_score(nulls)))
        if np.isclose(budget, self.false_alarms_per_10k, rtol=1e-9, atol=0.0):
            thresholds["cusum"] = self.cusum_h
        else:
            thresholds["cusum"] = self.cusum_threshold(budget, seed=seed)
        centers["cusum"] = 0.0
        self._cache[key] = cal
        return cal

    def cusum_increments(self, novelty: np.ndarray) -> np.ndarray:
        """Per-image CUSUM increments from *standardised* novelty (``ImageFeatures.novelty``): minus k."""
        return np.asarray(novelty, np.float64) - self.cusum_k

    def cusum_threshold(self, false_alarms_per_10k: float, *, seed: int = 0) -> float:
        """CUSUM threshold for an in-control average run length of 10_000 / budget images."""
        if false_alarms_per_10k <= 0:
            raise ValueError(f"false_alarms_per_10k must be positive, got {false_alarms_per_10k}")
        pool = self.cusum_increments(self.standardise_novelty(self.pool_novelty))
        bounds = (-self.novelty_clip - self.cusum_k, self.novelty_clip - self.cusum_k)
        return calibrate_cusum(pool, 10_000.0 / false_alarms_per_10k, bounds=bounds,
                               rng=np.random.default_rng([seed, 7]))

    # ---------------------------------------------------------------- persistence

    def _meta(self) -> dict[str, Any]:
        default = self.calibrate()
        return {
            "kind": FORMAT_KIND, "format_version": FORMAT_VERSION, "created": self.created,
            "dim": self.dim, "n_components": self.n_components, "n_mahalanobis_components": len(self.variances),
            "residual_variance": self.residual_variance, "shrinkage": self.shrinkage,
            "mmd_gamma": self.mmd_gamma, "mmd_ref_kernel": self.mmd_ref_kernel,
            "novelty_mean": self.novelty_mean, "novelty_std": self.novelty_std, "novelty_clip": self.novelty_clip,
            "cusum_k": self.cusum_k, "cusum_h": self.cusum_h,
            "window": self.window, "stride": self.stride, "false_alarms_per_10k": self.false_alarms_per_10k,
            "window_alpha": self.window_alpha, "image_stat_names": list(self.image_stat_names),
            "classes": list(self.classes) if self.classes is not None else None,
            "seed": self.seed, "n_fit": self.n_fit, "n_pool": self.n_pool,
            "null_detectors": sorted(self.nulls),
            # informational: recomputed from the stored nulls on load
            "thresholds": default.thresholds,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write one ``.npz`` (arrays + a JSON ``meta`` string), atomically (temp file + rename)."""
        p = Path(path)
        arrays: dict[str, np.ndarray] = {
            "meta": np.array(json.dumps(self._meta(), sort_keys=True)),
            "mean": self.mean, "components": self.components, "variances": self.variances,
            "ref_projections": self.ref_projections, "ref_image_stats": self.ref_image_stats,
            "class_freq": self.class_freq, "mmd_points": self.mmd_points,
            "pool_projections": self.pool_projections, "pool_novelty": self.pool_novelty,
            "pool_image_stats": self.pool_image_stats, "pool_pred": self.pool_pred,
        }
        for d, a in self.nulls.items():
            arrays[f"null_{d}"] = a.astype(np.float32)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        return p

    def summary(self) -> dict[str, Any]:
        """Scalars worth logging or showing: sizes, shrinkage, default thresholds."""
        cal = self.calibrate()
        return {"dim": self.dim, "n_fit": self.n_fit, "n_pool": self.n_pool, "n_components": self.n_components,
                "shrinkage": round(self.shrinkage, 4), "window": self.window, "stride": self.stride,
                "false_alarms_per_10k": self.false_alarms_per_10k, "window_alpha": self.window_alpha,
                "thresholds": cal.thresholds}


def load_reference(path: str | os.PathLike) -> DriftReference:
    """Read a reference written by ``DriftReference.save`` (``allow_pickle=False``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"drift reference not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as exc:
        raise DriftReferenceError(f"{p}: not a readable .npz drift reference ({exc})") from None
    if "meta" not in data:
        raise DriftReferenceError(f"{p}: no 'meta' entry; not a drift reference")
    try:
        meta = json.loads(str(data["meta"]))
    except json.JSONDecodeError as exc:
        raise DriftReferenceError(f"{p}: corrupt meta JSON ({exc})") from None
    if meta.get("kind") != FORMAT_KIND:
        raise DriftReferenceError(f"{p}: not a drift reference (kind={meta.get('kind')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DriftReferenceError(f"{p}: drift reference format {meta.get('format_version')}, "
                                  f"this version reads {FORMAT_VERSION}; re-export the model")
    try:
        return DriftReference(
            mean=data["mean"], components=data["components"], variances=data["variances"],
            residual_variance=float(meta["residual_variance"]), shrinkage=float(meta["shrinkage"]),
            n_components=int(meta["n_components"]), ref_projections=data["ref_projections"],
            ref_image_stats=data["ref_image_stats"], class_freq=data["class_freq"], mmd_points=data["mmd_points"],
            mmd_gamma=float(meta["mmd_gamma"]), mmd_ref_kernel=float(meta["mmd_ref_kernel"]),
            pool_projections=data["pool_projections"], pool_novelty=data["pool_novelty"],
            pool_image_stats=data["pool_image_stats"], pool_pred=data["pool_pred"].astype(np.int64),
            novelty_mean=float(meta["novelty_mean"]), novelty_std=float(meta["novelty_std"]),
            novelty_clip=float(meta["novelty_clip"]),
            cusum_k=float(meta["cusum_k"]), cusum_h=float(meta["cusum_h"]),
            window=int(meta["window"]), stride=int(meta["stride"]),
            false_alarms_per_10k=float(meta["false_alarms_per_10k"]), window_alpha=float(meta["window_alpha"]),
            nulls={d: data[f"null_{d}"].astype(np.float64) for d in meta["null_detectors"]},
            image_stat_names=tuple(meta["image_stat_names"]),
            classes=tuple(meta["classes"]) if meta.get("classes") is not None else None,
            seed=int(meta["seed"]), n_fit=int(meta["n_fit"]), created=str(meta["created"]),
        )
    except KeyError as exc:
        raise DriftReferenceError(f"{p}: drift reference is missing {exc}") from None


def fit_reference(embeddings: Any, image_stats: Any, probs: Any, *, window: int = 32, stride: int = 8,
                  false_alarm_rate: float | None = None, false_alarms_per_10k: float = 1.0,
                  calibration: tuple[Any, Any, Any] | None = None, holdout_fraction: float = 0.5,
                  n_components: int = 16, n_mahalanobis_components: int = 64, n_null_windows: int = 20_000,
                  mmd_reference_size: int = 128, cusum_k: float = 0.5, novelty_clip: float = 3.0,
                  max_fit_samples: int = 4096,
                  classes: list[str] | tuple[str, ...] | None = None,
                  image_stat_names: tuple[str, ...] = IMAGE_STAT_NAMES, seed: int = 0) -> DriftReference:
    """Fit a drift reference from in-domain images and calibrate its thresholds.

    ``embeddings`` (N, D), ``image_stats`` (N, S) from ``image_statistics``, ``probs`` (N, C).
    ``calibration``: an optional (embeddings, image_stats, probs) triple of in-domain images
    *not used to train the model* (e.g. the validation split); when given, all of the first
    triple fits the reference and this one is the calibration pool. Otherwise a random
    ``holdout_fraction`` of the first triple is held out as the pool. Embeddings of training
    images sit closer to the model's own representation than fresh images do, so a pool of
    unseen images gives thresholds that hold in production.

    ``false_alarm_rate`` fixes the per-window rate directly; else it is derived from the
    streaming budget ``false_alarms_per_10k`` and ``stride`` (module docs). Costs about one to
    three seconds for 1280-d embeddings (null sampling dominates; ``n_null_windows`` trades
    time for threshold precision).
    """
    e, s, p = check_inputs(embeddings, image_stats, probs)
    if s.shape[1] != len(image_stat_names):
        raise ValueError(f"image_stats has {s.shape[1]} columns but {len(image_stat_names)} names were given")
    if classes is not None and len(classes) != p.shape[1]:
        raise ValueError(f"probs has {p.shape[1]} columns but {len(classes)} classes were given")
    rng = np.random.default_rng(seed)
    if calibration is not None:
        ce, cs, cp = check_inputs(*calibration, dim=e.shape[1], n_stats=s.shape[1], n_classes=p.shape[1])
        fe, fs, fp = e, s, p
    else:
        if not 0.0 < holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        perm = rng.permutation(len(e))
        n_pool = int(round(len(e) * holdout_fraction))
        pool_idx, fit_idx = perm[:n_pool], perm[n_pool:]
        fe, fs, fp = e[fit_idx], s[fit_idx], p[fit_idx]
        ce, cs, cp = e[pool_idx], s[pool_idx], p[pool_idx]
    if len(fe) < MIN_FIT_SAMPLES or len(ce) < MIN_POOL_SAMPLES:
        raise ValueError(f"a drift reference needs at least {MIN_FIT_SAMPLES} images to fit and "
                         f"{MIN_POOL_SAMPLES} to calibrate; got {len(fe)} and {len(ce)} "
                         f"({len(e)} in-domain images given)")
    if window < 2 or stride < 1:
        raise ValueError(f"need window >= 2 and stride >= 1, got window={window}, stride={stride}")

    mean64 = fe.astype(np.float64).mean(axis=0)
    pca_rows = fe if len(fe) <= max_fit_samples else fe[rng.choice(len(fe), max_fit_samples, replace=False)]
    comps, variances, residual, shrink = _shrunk_pca(pca_rows.astype(np.float64) - mean64, n_mahalanobis_components)
    k = int(min(n_components, len(variances)))
    if k < 1:
        raise ValueError("in-domain embeddings have no variance; cannot fit a drift reference")
    n_cls = p.shape[1]
    counts = np.bincount(fp.argmax(axis=1), minlength=n_cls).astype(np.float64)
    class_freq = (counts + 0.5) / (counts.sum() + 0.5 * n_cls)

    ref = DriftReference(
        mean=mean64.astype(np.float32), components=comps, variances=variances, residual_variance=residual,
        shrinkage=shrink, n_components=k, ref_projections=np.zeros((0, k), np.float32),
        ref_image_stats=fs.copy(), class_freq=class_freq, mmd_points=np.zeros((0, k), np.float32),
        mmd_gamma=1.0, mmd_ref_kernel=1.0, pool_projections=np.zeros((0, len(variances)), np.float32),
        pool_novelty=np.zeros(0), pool_image_stats=cs.copy(), pool_pred=cp.argmax(axis=1).astype(np.int64),
        novelty_mean=0.0, novelty_std=1.0, novelty_clip=float(novelty_clip), cusum_k=float(cusum_k), cusum_h=0.0,
        window=int(window), stride=int(stride), false_alarms_per_10k=1.0, window_alpha=0.0, nulls={},
        image_stat_names=tuple(image_stat_names), classes=tuple(classes) if classes is not None else None,
        seed=int(seed), n_fit=len(fe),
    )
    _, ref_proj = ref.novelty(fe)
    pool_nov, pool_proj = ref.novelty(ce)
    ref_proj = ref_proj[:, :k]
    ref.ref_projections = ref_proj.astype(np.float32)
    ref.pool_projections = pool_proj.astype(np.float32)
    ref.pool_novelty = pool_nov
    white = ref_proj * (1.0 / np.sqrt(variances[:k])).astype(np.float32)
    pick = rng.choice(len(white), min(mmd_reference_size, len(white)), replace=False)
    ref.mmd_points = np.ascontiguousarray(white[pick], dtype=np.float32)
    ref.mmd_gamma = median_heuristic_gamma(ref.mmd_points.astype(np.float64))
    ref.mmd_ref_kernel = float(rbf_mean(ref.mmd_points, ref.mmd_points, ref.mmd_gamma))
    ref.novelty_mean = float(pool_nov.mean())
    ref.novelty_std = float(max(pool_nov.std(ddof=1), 1e-6))
    ref.__post_init__()  # sorted reference samples for the ECDFs

    if false_alarm_rate is not None:
        ref.window_alpha = float(false_alarm_rate)
        ref.false_alarms_per_10k = ref.window_alpha * 10_000.0 / stride
    else:
        ref.false_alarms_per_10k = float(false_alarms_per_10k)
        ref.window_alpha = ref.false_alarms_per_10k * stride / 10_000.0
    if not 0.0 < ref.window_alpha <= 0.5:
        raise ValueError(f"per-window false-alarm rate must be in (0, 0.5], got {ref.window_alpha:g}")
    ref.nulls = ref.null_scores(window, n_null_windows, rng)
    ref.cusum_h = ref.cusum_threshold(ref.false_alarms_per_10k, seed=seed)
    ref._cache.clear()
    cal = ref.calibrate()
    log.info("drift reference: %d fit + %d pool images, D=%d, k=%d, shrinkage %.3f, thresholds %s",
             ref.n_fit, ref.n_pool, ref.dim, k, shrink, {d: round(t, 4) for d, t in cal.thresholds.items()})
    return ref
