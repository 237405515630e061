"""Drift monitoring inside the inference daemon, and the Prefect event that starts re-adaptation.

``DriftObserver`` is a ``BatchObserver``: after each committed batch it feeds the scored images
(embedding, image statistics, class probabilities; error rows skipped) to a
``pipeline.drift.DriftMonitor`` built from the drift reference of the model that scored them. A
hot-swap gives a new reference and a fresh monitor (stream and episode state reset). A model
without a reference is served unmonitored, with one warning.

Every status change (alarm episode started / ended) and, at most once per ``score_log_interval_s``,
the latest scores go to the ``drift_events`` table of the results database; the scores, thresholds
and episode state are Prometheus gauges (``defect_drift_*``).

When an episode starts, ONE ``defect.drift.detected`` event is sent for the line, resource
``defect.line.<line>`` (the contract of ``flows.deployments.drift_event``, whose automation runs
re-adaptation). Debounced twice: the monitor's episodes (a sustained shift is one episode), and a
minimum interval between events (persisted in ``drift_events``, so it survives restarts) so that a
flapping stream cannot start many re-adaptations. Sending happens on its own thread through an
injectable ``emitter``; the default imports Prefect lazily and needs ``PREFECT_API_URL``. Nothing
here can block scoring or crash the daemon: failures are logged and counted.

Image statistics must be computed exactly as the reference's were (``image_statistics`` of the
full decoded image, not of the model-size copy: sharpness differs), so the daemon computes them in
its decode workers, from the same decode as the model input (``pipeline.serve.jobs.preprocess_job``),
and passes them in ``BatchResult.extra``.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.serve.observers import BatchResult
from pipeline.serve.store import DriftEventRow, utc_iso

if TYPE_CHECKING:
    from pipeline.drift import DriftMonitor, DriftReference, DriftStatus
    from pipeline.serve.config import ServeSettings
    from pipeline.serve.metrics import ServeMetrics
    from pipeline.serve.store import ResultStore

log = logging.getLogger(__name__)

DRIFT_EVENT = "defect.drift.detected"
LINE_RESOURCE_PREFIX = "defect.line."
MODEL_KEY = "model"
"""``BatchResult.extra`` key: the daemon's ``LoadedModel`` that scored the batch (for its reference)."""
IMAGE_STATS_KEY = "drift_image_stats"
"""``BatchResult.extra`` key: per item, ``image_statistics`` of the full decoded image, or None."""

EventEmitter = Callable[[dict[str, Any]], "str | None"]
"""Sends one event given as ``{"event", "resource", "payload", "occurred", "id"}``; returns its id."""
ReferenceLoader = Callable[[BatchResult], "DriftReference"]


class EventNotSent(RuntimeError):
    """The emitter could not hand the event over. ``retry``: worth trying again later (API unreachable)
    rather than a configuration problem (no API URL) that a retry cannot fix."""

    def __init__(self, message: str, retry: bool = False):
        super().__init__(message)
        self.retry = retry


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def build_drift_event(line: str, status: "DriftStatus", *, model_version: str, model_sha256: str,
                      registry: str | None = None, recent_dir: str | None = None,
                      occurred: datetime | None = None, event_id: str | None = None) -> dict[str, Any]:
    """The ``defect.drift.detected`` event for an alarm (kwargs for ``prefect.events.emit_event``).

    Resource labels carry both the automation's contract (``line``, ``registry``, ``recent_dir``;
    see ``flows.deployments``) and namespaced copies for filtering in the UI; all are strings.
    """
    if not line:
        raise ValueError("a drift event needs a line name")
    resource = {"prefect.resource.id": LINE_RESOURCE_PREFIX + line, "prefect.resource.name": line,
                "line": line, "defect.line": line, "defect.registry": registry or "",
                "defect.model_version": model_version}
    if registry:
        resource["registry"] = registry
    if recent_dir:
        resource["recent_dir"] = recent_dir
    d = status.as_dict()
    score, thr = _finite(status.score), _finite(status.threshold)
    summary = (f"{status.detector} score {status.score:.3g} > threshold {status.threshold:.3g} after "
               f"{status.n_seen} images of model {model_version}")
    payload = {"line": line, "registry": registry, "recent_dir": recent_dir, "score": score, "threshold": thr,
               "detector": status.detector, "model_version": model_version, "model_sha256": model_sha256,
               "n_seen": status.n_seen, "episode": status.episodes, "scores": d["scores"],
               "thresholds": d["thresholds"], "summary": summary}
    return {"event": DRIFT_EVENT, "resource": resource, "payload": payload,
            "occurred": occurred or datetime.now(timezone.utc), "id": event_id or str(uuid.uuid4())}


def prefect_emitter(flush_timeout_s: float = 30.0) -> EventEmitter:
    """An emitter sending through ``prefect.events.emit_event`` to ``PREFECT_API_URL``.

    Prefect is imported on the first event, not before (it is heavy, and optional on an inference
    host). Without an API URL Prefect would start a throw-away local server instead, so that is
    refused with a clear error. ``emit_event`` itself never reports a delivery failure (its
    websocket worker only logs one), so the API's health endpoint is checked first: an unreachable
    server is a retryable failure instead of a silently lost event. Then waits until Prefect's
    events worker has handed the event over.
    """
    def emit(event: dict[str, Any]) -> str | None:
        from prefect.client.orchestration import get_client
        from prefect.events import emit_event
        from prefect.events.worker import EventsWorker
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
        if not url:
            raise EventNotSent("PREFECT_API_URL is not set: set it to the Prefect server the drift "
                               "automation runs on")
        with get_client(sync_client=True) as client:
            problem = client.api_healthcheck()
        if problem is not None:
            raise EventNotSent(f"Prefect API {url} unreachable: {type(problem).__name__}: {problem}", retry=True)
        kwargs = dict(event)
        kwargs["id"] = uuid.UUID(str(kwargs["id"])) if kwargs.get("id") else None
        sent = emit_event(**kwargs)
        if sent is None:
            raise EventNotSent("Prefect did not emit the event (see its log above)")
        EventsWorker.drain_all(timeout=flush_timeout_s)
        return str(sent.id)

    return emit


class EventSender:
    """Sends events on a background thread, so a slow or unreachable Prefect never blocks monitoring.

    A failed send is retried after each of ``retry_delays_s`` (an API that is down for a restart
    should not cost the line its re-adaptation); configuration errors (``EventNotSent(retry=False)``,
    Prefect not installed) are not retried.
    """

    def __init__(self, emitter: EventEmitter, metrics: "ServeMetrics | None" = None, max_pending: int = 16,
                 retry_delays_s: tuple[float, ...] = (10.0, 60.0, 300.0)):
        self.emitter = emitter
        self.metrics = metrics
        self.retry_delays_s = tuple(retry_delays_s)
        self._stop = threading.Event()
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._import_warned = False
        self.sent = 0
        self.failed = 0
        self.last: dict[str, Any] | None = None  # outcome of the latest attempt, for /health

    def submit(self, event: dict[str, Any]) -> bool:
        """Queue an event; never blocks. False when the queue is full (counted as dropped)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="drift-events", daemon=True)
                self._thread.start()
        try:
            self._q.put_nowait(event)
        except queue.Full:
            self._count("dropped")
            log.error("drift event %s dropped: %d events are already waiting to be sent", event.get("id"),
                      self._q.maxsize)
            return False
        return True

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.drift_prefect_events.labels(outcome).inc()

    def _loop(self) -> None:
        while True:
            event = self._q.get()
            if event is None:
                return
            self._send(event)

    def _send(self, event: dict[str, Any]) -> None:
        attempt = 0
        while True:
            try:
                sent_id = self.emitter(event)
            except Exception as exc:  # ImportError included: never let the thread die
                retry = not isinstance(exc, ImportError) and getattr(exc, "retry", True)
                if retry and attempt < len(self.retry_delays_s):
                    delay = self.retry_delays_s[attempt]
                    attempt += 1
                    log.warning("drift event %s not sent (%s: %s); retry %d in %.0fs", event.get("id"),
                                type(exc).__name__, exc, attempt, delay)
                    if not self._stop.wait(delay):  # shutting down: give up instead
                        continue
                self._failed(event, exc)
                return
            self.sent += 1
            self._count("sent")
            self.last = {"at": utc_iso(), "outcome": "sent", "id": sent_id or event.get("id")}
            log.info("sent %s for %s (event %s)", event.get("event"),
                     event.get("resource", {}).get("prefect.resource.id"), sent_id or event.get("id"),
                     extra={"event": "drift_event_sent"})
            return

    def _failed(self, event: dict[str, Any], exc: Exception) -> None:
        self.failed += 1
        self._count("failed")
        if isinstance(exc, ImportError):
            self.last = {"at": utc_iso(), "outcome": "failed", "error": f"prefect is not installed ({exc})"}
            if not self._import_warned:
                self._import_warned = True
                log.error("cannot send drift events: prefect is not installed (%s); install it or run "
                          "without --emit-events", exc)
            return
        self.last = {"at": utc_iso(), "outcome": "failed", "error": f"{type(exc).__name__}: {exc}"}
        log.error("drift event %s for %s not sent: %s: %s", event.get("id"),
                  event.get("resource", {}).get("prefect.resource.id"), type(exc).__name__, exc,
                  extra={"event": "drift_event_failed"})

    def close(self, timeout: float = 10.0) -> None:
        """Try what is queued once more (no retry waits; up to ``timeout``), then stop."""
        self._stop.set()
        if self._thread is None:
            return
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            log.warning("drift events still unsent after %.0fs; giving up on them", timeout)
            return
        self._thread.join(timeout)


def reference_from_batch(batch: BatchResult) -> "DriftReference":
    """The drift reference of the model that scored ``batch`` (the daemon puts it in ``extra``)."""
    from pipeline.drift import load_model_reference

    model = batch.extra.get(MODEL_KEY)
    if model is None:
        raise LookupError(f"batch carries no model under extra[{MODEL_KEY!r}]")
    return load_model_reference(getattr(model, "model", model))  # LoadedModel or OnnxModel


def _parse_ts(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


class DriftObserver:
    """Per-batch drift monitoring of the model being served; see the module docs.

    ``emitter``: None = no events (alarms are still logged, stored and exported).
    ``monitor_options``: extra ``DriftMonitor`` arguments (window, stride, cooldown, ...).
    Called from one thread (the observer thread); ``state()`` may be called from any.
    """

    def __init__(self, *, line: str | None = None, registry: str | None = None, recent_dir: str | None = None,
                 metrics: "ServeMetrics | None" = None, store: "ResultStore | None" = None,
                 reference_loader: ReferenceLoader = reference_from_batch, emitter: EventEmitter | None = None,
                 min_event_interval_s: float = 1800.0, detector: str | None = None,
                 score_log_interval_s: float = 60.0, monitor_options: dict[str, Any] | None = None,
                 clock: Callable[[], float] = time.time):
        self.line = line
        self.registry = registry
        self.recent_dir = recent_dir
        self.metrics = metrics
        self.store = store
        self.reference_loader = reference_loader
        self.sender = EventSender(emitter, metrics) if emitter is not None else None
        self.min_event_interval_s = float(min_event_interval_s)
        self.detector = detector
        self.score_log_interval_s = float(score_log_interval_s)
        self.monitor_options = dict(monitor_options or {})
        self._clock = clock
        self._key: tuple[str, str] | None = None  # (version, sha256) the monitor belongs to
        self._monitor: DriftMonitor | None = None
        self._model_line: str | None = None
        self._disabled: dict[tuple[str, str], str] = {}  # model -> why it is not monitored (warned once)
        self._errors_logged: set[tuple[str, str]] = set()
        self._last_score_row = -math.inf
        self._no_line_warned = False
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {"active": False, "reason": "no batch seen yet"}
        self.last_event: dict[str, Any] | None = None
        self._last_emit = _parse_ts(self._stored_last_emit())
        self.timings_ms: list[float] = []  # per-batch monitor time, last 256 batches (for /health)

    @classmethod
    def for_daemon(cls, settings: "ServeSettings", metrics: "ServeMetrics", store: "ResultStore",
                   emitter: EventEmitter | None = None) -> "DriftObserver":
        """The observer a daemon with these settings runs (``emitter`` overrides the Prefect one)."""
        send = (emitter or prefect_emitter()) if settings.emit_prefect_events else None
        registry = str(Path(settings.model).resolve()) if settings.registry_mode else None
        recent = str(Path(settings.recent_dir).resolve()) if settings.recent_dir else None
        return cls(line=settings.line, registry=registry, recent_dir=recent, metrics=metrics, store=store,
                   emitter=send, min_event_interval_s=settings.drift_event_min_interval_s,
                   score_log_interval_s=settings.drift_log_interval_s)

    def _stored_last_emit(self) -> str | None:
        if self.store is None:
            return None
        try:
            return self.store.last_drift_emit_ts()
        except Exception as exc:
            log.warning("cannot read the last drift event time: %s", exc)
            return None

    # -- model switching -------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """A monitor is running for the latest model seen."""
        return self._monitor is not None

    @property
    def wants_image_stats(self) -> bool:
        """False only when the latest model is known to have no usable reference (skip the extra decode)."""
        return self._key is None or self._monitor is not None

    def prepare(self, model: Any) -> None:
        """Load the reference of a ``LoadedModel`` now (at start-up), so problems show before the first image."""
        batch = BatchResult(model_version=model.version, model_sha256=model.sha256,
                            classes=tuple(model.metadata.classes), items=(), inference_ms=0.0,
                            extra={MODEL_KEY: model})
        self._ensure_monitor(batch)

    def _ensure_monitor(self, batch: BatchResult) -> bool:
        key = (batch.model_version, batch.model_sha256)
        if key == self._key:
            return self._monitor is not None
        from pipeline.drift import DEFAULT_DETECTOR, DriftMonitor

        self._key, self._monitor, self._last_score_row = key, None, -math.inf
        model = batch.extra.get(MODEL_KEY)
        md = getattr(model, "metadata", None)
        self._model_line = getattr(md, "line", None)
        self._clear_gauges()
        if key in self._disabled:
            self._set_state(active=False, reason=self._disabled[key])
            return False
        try:
            ref = self.reference_loader(batch)
            monitor = DriftMonitor(ref, detector=self.detector or DEFAULT_DETECTOR, **self.monitor_options)
        except Exception as exc:
            reason = f"no usable drift reference: {exc}"
            self._disabled[key] = reason
            log.warning("model %s: drift monitoring off (%s)", key[0], reason,
                        extra={"event": "drift_disabled", "version": key[0]})
            self._set_state(active=False, reason=reason)
            return False
        self._monitor = monitor
        if self.metrics is not None:
            for d, t in monitor.thresholds.items():
                self.metrics.drift_threshold.labels(d).set(t)
            self.metrics.drift_alarm.labels(monitor.detector).set(0)
        log.info("drift monitoring model %s: detector %s, window %d, stride %d, %.3g false alarms per 10k images",
                 key[0], monitor.detector, monitor.window, monitor.stride,
                 monitor.calibration.false_alarms_per_10k, extra={"event": "drift_monitoring", "version": key[0]})
        self._set_state(active=True, reason=None, detector=monitor.detector, window=monitor.window,
                        stride=monitor.stride, false_alarms_per_10k=monitor.calibration.false_alarms_per_10k,
                        n_seen=0, score=None, threshold=_finite(monitor.thresholds[monitor.detector]),
                        alarm=False, in_episode=False, episodes=0)
        return True

    def _clear_gauges(self) -> None:
        if self.metrics is not None:
            for g in (self.metrics.drift_score, self.metrics.drift_threshold, self.metrics.drift_alarm):
                g.clear()

    def _set_state(self, **kw: Any) -> None:
        with self._lock:
            if "active" in kw:  # a new model: start from a clean slate
                self._state = {}
            self._state.update(kw)
            self._state["model_version"] = self._key[0] if self._key else None

    # -- per batch ------------------------------------------------------------------------------------------
    def __call__(self, batch: BatchResult) -> None:
        if not self._ensure_monitor(batch):
            return
        monitor = self._monitor
        assert monitor is not None
        t0 = time.perf_counter()
        stats = batch.extra.get(IMAGE_STATS_KEY)
        if stats is None or len(stats) != len(batch.items):
            if batch.scored and self._key not in self._errors_logged:
                self._errors_logged.add(self._key)  # type: ignore[arg-type]
                log.error("batches carry no full-image statistics (extra[%r]); drift monitoring cannot run",
                          IMAGE_STATS_KEY)
            return
        emb, st, pr = [], [], []
        for item, s in zip(batch.items, stats):
            probs = item.probabilities
            if probs is None or item.embedding is None or s is None:
                continue  # error rows (and images whose statistics failed) are not part of the stream
            emb.append(item.embedding)
            st.append(s)
            pr.append([probs.get(c, math.nan) for c in batch.classes])
        if not emb:
            return
        e, s_, p = np.asarray(emb, np.float32), np.asarray(st, np.float64), np.asarray(pr, np.float64)
        ok = np.isfinite(e).all(axis=1) & np.isfinite(s_).all(axis=1) & np.isfinite(p).all(axis=1)
        if not ok.all():
            e, s_, p = e[ok], s_[ok], p[ok]
        if not len(e):
            return
        try:
            statuses = monitor.update(e, s_, p)
        except Exception as exc:  # shapes that do not match the reference, say: log once per model
            if self._key not in self._errors_logged:
                self._errors_logged.add(self._key)  # type: ignore[arg-type]
                log.error("drift monitor of model %s cannot use this batch: %s", batch.model_version, exc)
            return
        if self.metrics is not None:
            self.metrics.drift_images.inc(len(e))
        for status in statuses:
            self._on_status(status, batch)
        self.timings_ms = [*self.timings_ms[-255:], (time.perf_counter() - t0) * 1000.0]
        self._set_state(n_seen=monitor.n_seen)

    def _on_status(self, s: "DriftStatus", batch: BatchResult) -> None:
        now = self._clock()
        if self.metrics is not None:
            for d, v in s.scores.items():
                self.metrics.drift_score.labels(d).set(v)
            self.metrics.drift_alarm.labels(s.detector).set(1 if s.in_episode else 0)
            if s.alarm_started:
                self.metrics.drift_episodes.labels(s.detector).inc()
        self._set_state(n_seen=s.n_seen, score=_finite(s.score), threshold=_finite(s.threshold), alarm=s.alarm,
                        in_episode=s.in_episode, episodes=s.episodes)
        kind, outcome, event_id = None, None, None
        if s.alarm_started:
            kind = "alarm_started"
            outcome, event_id = self._maybe_emit(s, batch, now)
            log.warning("DRIFT on line %s, model %s: %s score %.3g > threshold %.3g after %d images "
                        "(episode %d; event: %s)", self._line(batch) or "?", batch.model_version, s.detector,
                        s.score, s.threshold, s.n_seen, s.episodes, outcome,
                        extra={"event": "drift_alarm", "version": batch.model_version, "score": _finite(s.score)})
        elif s.alarm_ended:
            kind = "alarm_ended"
            log.info("drift episode %d ended on model %s (%s score %.3g <= %.3g)", s.episodes, batch.model_version,
                     s.detector, s.score, s.threshold, extra={"event": "drift_alarm_ended"})
        elif now - self._last_score_row >= self.score_log_interval_s:
            kind = "score"
        if kind is None:
            return
        self._last_score_row = now
        if self.store is None:
            return
        row = DriftEventRow(ts=utc_iso(datetime.fromtimestamp(now, timezone.utc)), kind=kind, detector=s.detector,
                            score=_finite(s.score), threshold=_finite(s.threshold), alarm=s.alarm,
                            in_episode=s.in_episode, episode=s.episodes, n_seen=s.n_seen,
                            model_version=batch.model_version, model_sha256=batch.model_sha256,
                            prefect_event=outcome, event_id=event_id,
                            scores={d: _finite(v) for d, v in s.scores.items()})
        try:
            self.store.insert_drift_event(row)
        except Exception as exc:  # the results DB is the daemon's business; a lost drift row is not fatal
            log.error("cannot store drift %s row: %s", kind, exc)

    def _line(self, batch: BatchResult) -> str | None:
        return self.line or batch.line or self._model_line

    def _maybe_emit(self, s: "DriftStatus", batch: BatchResult, now: float) -> tuple[str, str | None]:
        """Decide and (asynchronously) send the event of a new episode: 'emit', 'suppressed' or 'off'."""
        outcome, event_id = "off", None
        line = self._line(batch)
        if self.sender is None:
            pass
        elif not line:
            if not self._no_line_warned:
                self._no_line_warned = True
                log.warning("drift alarm but no line name (give --line, or set `line` in model.json): "
                            "no event sent")
        elif self._last_emit is not None and now - self._last_emit < self.min_event_interval_s:
            outcome = "suppressed"
            log.warning("drift event suppressed: the last one was sent %.0fs ago (minimum interval %.0fs)",
                        now - self._last_emit, self.min_event_interval_s)
        else:
            event = build_drift_event(line, s, model_version=batch.model_version, model_sha256=batch.model_sha256,
                                      registry=self.registry, recent_dir=self.recent_dir,
                                      occurred=datetime.fromtimestamp(now, timezone.utc))
            outcome, event_id = "emit", event["id"]
            self._last_emit = now
            self.sender.submit(event)
        if outcome != "emit" and self.metrics is not None:
            self.metrics.drift_prefect_events.labels(outcome).inc()
        self.last_event = {"at": utc_iso(datetime.fromtimestamp(now, timezone.utc)), "decision": outcome,
                           "id": event_id}
        return outcome, event_id

    # -- views and lifecycle -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """JSON-safe monitoring state for ``/health``."""
        with self._lock:
            out = dict(self._state)
        out["enabled"] = True
        out["events"] = {"enabled": self.sender is not None, "min_interval_s": self.min_event_interval_s,
                         "last_decision": self.last_event,
                         "last_send": self.sender.last if self.sender else None,
                         "sent": self.sender.sent if self.sender else 0,
                         "failed": self.sender.failed if self.sender else 0}
        t = self.timings_ms
        out["monitor_ms_per_batch"] = round(float(np.median(t)), 3) if t else None
        return out

    def close(self, timeout: float = 10.0) -> None:
        """Flush pending events (up to ``timeout``)."""
        if self.sender is not None:
            self.sender.close(timeout)
