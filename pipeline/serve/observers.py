"""The hook drift monitoring plugs into: after each committed batch, every observer gets a BatchResult.

Observers run on their own thread behind a small bounded queue, so a slow or failing observer can
never stall scoring or crash the daemon: exceptions are logged and counted
(``defect_observer_errors_total``); when the queue is full the batch is skipped for observers and
counted (``defect_observer_dropped_total``). Results in SQLite are never affected.
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from pipeline.runtime import Prediction

if TYPE_CHECKING:
    from pipeline.serve.config import ServeSettings
    from pipeline.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageStats:
    """Cheap statistics of the full decoded image (before resizing), for drift detectors."""

    height: int
    width: int
    mean: tuple[float, float, float]  # per RGB channel, 0..255
    std: tuple[float, float, float]


@dataclass(frozen=True)
class ImageResult:
    """One image of a batch. ``prediction`` / ``embedding`` are None when it could not be scored."""

    source: str
    sha256: str | None
    stats: ImageStats | None
    image: np.ndarray | None  # the model-size RGB uint8 image that was scored (H x W x 3)
    embedding: np.ndarray | None  # (D,) float32
    prediction: Prediction | None
    error_kind: str | None = None
    row_id: int | None = None

    @property
    def ok(self) -> bool:
        return self.prediction is not None

    @property
    def probabilities(self) -> dict[str, float] | None:
        return self.prediction.probabilities if self.prediction else None


@dataclass(frozen=True)
class BatchResult:
    """What one model batch produced, with the model that produced it."""

    model_version: str
    model_sha256: str
    classes: tuple[str, ...]
    items: tuple[ImageResult, ...]
    inference_ms: float
    line: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def scored(self) -> tuple[ImageResult, ...]:
        """Only the images that got a prediction."""
        return tuple(i for i in self.items if i.ok)

    def embeddings(self) -> np.ndarray:
        """(N, D) embeddings of the scored images (N may be 0)."""
        rows = [i.embedding for i in self.scored if i.embedding is not None]
        return np.stack(rows) if rows else np.zeros((0, 0), np.float32)

    def probabilities(self) -> np.ndarray:
        """(N, C) class probabilities of the scored images, columns in ``classes`` order."""
        rows = [[i.prediction.probabilities[c] for c in self.classes] for i in self.scored if i.prediction]
        return np.asarray(rows, np.float32).reshape(len(rows), len(self.classes))


@runtime_checkable
class BatchObserver(Protocol):
    """Anything callable with a BatchResult. Must be quick or hand work to its own thread."""

    def __call__(self, batch: BatchResult) -> None: ...


def load_observer(spec: str, settings: "ServeSettings") -> BatchObserver:
    """``'package.module:factory'`` -> ``factory(settings)``, which must return a callable observer."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"observer {spec!r}: expected 'package.module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"observer {spec!r} cannot be loaded: {exc}") from exc
    observer = factory(settings)
    if not callable(observer):
        raise TypeError(f"observer factory {spec!r} returned {type(observer).__name__}, not a callable")
    return observer


class ObserverDispatcher:
    """Feeds BatchResults to observers on one background thread; never raises into the daemon."""

    def __init__(self, observers: Sequence[Callable[[BatchResult], None]], metrics: "ServeMetrics",
                 max_pending: int = 8):
        self.observers = list(observers)
        self.metrics = metrics
        self._q: queue.Queue[BatchResult | None] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.observers:
            self._thread = threading.Thread(target=self._loop, name="observers", daemon=True)
            self._thread.start()

    def publish(self, batch: BatchResult) -> None:
        if self._thread is None:
            return
        try:
            self._q.put_nowait(batch)
        except queue.Full:
            self.metrics.observer_dropped.inc()

    def _loop(self) -> None:
        while True:
            batch = self._q.get()
            if batch is None:
                return
            for obs in self.observers:
                try:
                    obs(batch)
                except Exception:
                    self.metrics.observer_errors.inc()
                    log.exception("observer %r failed on a batch of %d; continuing",
                                  getattr(obs, "__name__", obs), len(batch.items))

    def stop(self, timeout: float = 10.0) -> None:
        """Let queued batches reach the observers, then stop."""
        if self._thread is None:
            return
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            log.warning("observers did not catch up within %.0fs; stopping without them", timeout)
            return
        self._thread.join(timeout)
