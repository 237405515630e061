"""The online drift monitor: sliding windows over the served stream, debounced into episodes.

Runs inside the inference daemon on every batch, so it is numpy only and cheap: per image
one (D x m) projection and a few searchsorted calls; per window (every ``stride`` images)
a handful of sorts of ``window`` numbers. Memory is bounded by ``window`` images' features.

Alarms are debounced into *episodes*: an episode starts (``alarm_started``) when the chosen
detector's score exceeds its threshold on ``min_consecutive`` consecutive evaluations and
ends (``alarm_ended``) after ``cooldown`` consecutive evaluations below it. A sustained shift
therefore triggers one re-adaptation, not one per window.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.drift.reference import (
    DEFAULT_DETECTOR,
    DETECTORS,
    WINDOW_DETECTORS,
    Calibration,
    DriftReference,
    ImageFeatures,
)


@dataclass(frozen=True)
class DriftStatus:
    """One evaluation of the monitor (every ``stride`` images once ``window`` images were seen)."""

    n_seen: int                  # images seen by the monitor so far (this window ends here)
    detector: str                # the detector that decides alarms
    score: float
    threshold: float
    alarm: bool                  # score > threshold on this evaluation
    in_episode: bool             # an alarm episode is open after this evaluation
    alarm_started: bool          # this evaluation opened an episode: act on this one
    alarm_ended: bool            # this evaluation closed an episode (cool-down passed)
    episodes: int                # episodes started so far
    scores: dict[str, float] = field(default_factory=dict)      # every detector's score
    thresholds: dict[str, float] = field(default_factory=dict)  # every detector's threshold

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite numbers become None)."""
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v
        return {k: clean(v) for k, v in asdict(self).items()}


class EpisodeTracker:
    """Turns a sequence of per-evaluation alarms into episodes (start after ``min_consecutive``
    alarms in a row, end after ``cooldown`` non-alarms in a row)."""

    def __init__(self, cooldown: int = 4, min_consecutive: int = 1):
        if cooldown < 1 or min_consecutive < 1:
            raise ValueError(f"cooldown and min_consecutive must be >= 1, got {cooldown}, {min_consecutive}")
        self.cooldown = cooldown
        self.min_consecutive = min_consecutive
        self.reset()

    def reset(self) -> None:
        self.in_episode = False
        self.episodes = 0
        self._above = 0
        self._below = 0

    def step(self, alarm: bool) -> tuple[bool, bool]:
        """Feed one evaluation; returns (episode started, episode ended)."""
        if alarm:
            self._above += 1
            self._below = 0
        else:
            self._below += 1
            self._above = 0
        if not self.in_episode and self._above >= self.min_consecutive:
            self.in_episode = True
            self.episodes += 1
            return True, False
        if self.in_episode and self._below >= self.cooldown:
            self.in_episode = False
            return False, True
        return False, False


class DriftMonitor:
    """Sliding-window drift detection over a stream of (embedding, image statistics, probs).

    ``window``: images per window (default: the reference's calibration window; another size
    recalibrates from the reference's pool, about a second). ``stride``: evaluate every this
    many images. ``false_alarms_per_10k``: the streaming false-alarm budget (default: the
    reference's). ``detector``: which detector decides alarms; all are scored and reported.
    ``cooldown``/``min_consecutive``: episode debouncing, in evaluations.
    Not thread-safe: one monitor per stream, fed from one thread.
    """

    def __init__(self, reference: DriftReference, window: int | None = None, stride: int = 8,
                 detector: str = DEFAULT_DETECTOR, *, false_alarms_per_10k: float | None = None,
                 cooldown: int = 4, min_consecutive: int = 1):
        if detector not in DETECTORS:
            raise ValueError(f"unknown detector {detector!r}; choose from {', '.join(DETECTORS)}")
        self.reference = reference
        self.detector = detector
        self.calibration: Calibration = reference.calibrate(window=window or reference.window, stride=stride,
                                                            false_alarms_per_10k=false_alarms_per_10k)
        self.window = self.calibration.window
        self.stride = self.calibration.stride
        self.thresholds = dict(self.calibration.thresholds)
        self.episodes = EpisodeTracker(cooldown, min_consecutive)
        k, s, m = reference.n_components, reference.n_image_stats, len(reference.variances)
        w = self.window
        self._buf = ImageFeatures(
            emb_lo=np.zeros((w, k), np.float32), emb_hi=np.zeros((w, k), np.float32),
            img_lo=np.zeros((w, s), np.float32), img_hi=np.zeros((w, s), np.float32),
            novelty=np.zeros(w), pred=np.zeros(w, np.int64), white=np.zeros((w, m), np.float32))
        self.reset()

    def reset(self) -> None:
        """Forget the stream (e.g. after the model was swapped); thresholds are kept."""
        self.n_seen = 0
        self._cusum = 0.0
        self._cusum_peak = 0.0
        self._cusum_alarm = False
        self.episodes.reset()

    @property
    def in_episode(self) -> bool:
        return self.episodes.in_episode

    def update(self, embeddings: Any, image_stats: Any, probs: Any) -> list[DriftStatus]:
        """Add a batch of images; returns one status per window evaluation that the batch completed."""
        feats = self.reference.features(embeddings, image_stats, probs)
        increments = self.reference.cusum_increments(feats.novelty)
        h = self.thresholds["cusum"]
        out: list[DriftStatus] = []
        n = len(feats)
        i = 0
        while i < n:
            take = min(self.stride - self.n_seen % self.stride, n - i)
            pos = (self.n_seen + np.arange(take)) % self.window
            for name in ("emb_lo", "emb_hi", "img_lo", "img_hi", "novelty", "pred", "white"):
                getattr(self._buf, name)[pos] = getattr(feats, name)[i:i + take]
            for x in increments[i:i + take]:  # CUSUM restarts at zero after each alarm
                self._cusum = max(0.0, self._cusum + float(x))
                self._cusum_peak = max(self._cusum_peak, self._cusum)
                if self._cusum > h:
                    self._cusum_alarm = True
                    self._cusum = 0.0
            self.n_seen += take
            i += take
            if self.n_seen % self.stride == 0 and self.n_seen >= self.window:
                out.append(self._evaluate())
        return out

    def _evaluate(self) -> DriftStatus:
        raw = self.reference.window_scores(self._buf, WINDOW_DETECTORS)
        scores = {d: float(v) for d, v in raw.items()}
        scores["combined"] = float(self.calibration.combined_score(scores))
        scores["cusum"] = self._cusum_peak
        cusum_alarm = self._cusum_alarm
        self._cusum_peak = self._cusum
        self._cusum_alarm = False
        score, thr = scores[self.detector], self.thresholds[self.detector]
        alarm = cusum_alarm if self.detector == "cusum" else score > thr
        started, ended = self.episodes.step(alarm)
        return DriftStatus(n_seen=self.n_seen, detector=self.detector, score=score, threshold=thr, alarm=alarm,
                           in_episode=self.episodes.in_episode, alarm_started=started, alarm_ended=ended,
                           episodes=self.episodes.episodes, scores=scores, thresholds=dict(self.thresholds))
