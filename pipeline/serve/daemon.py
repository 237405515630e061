"""The inference daemon: sources -> decode pool -> micro-batches -> ONNX Runtime -> SQLite -> moves/replies.

Threads and hand-offs (each arrow a queue; the capacity semaphore bounds everything in flight)::

    hot folder / HTTP / camera --submit--> decode pool (N threads: read, sha256, ledger lookup,
    decode, resize) --ready--> batcher (collects up to max_batch images or max_wait_ms, picks
    the model: swaps happen only here, between batches) --> inference streams (S threads: stack,
    normalise, ONNX Runtime) --scored, in batch order--> committer (one SQLite transaction per
    batch, then moves files / answers HTTP, metrics, observers)

The batcher forms the next batch as soon as an inference stream is free, so on a CPU host fed by a
hot folder or camera two ONNX Runtime calls run at once on half the cores each (``inference_streams``,
``models.plan_streams``) and the cores stay busy while the decode workers take their share. The committer takes scored batches in
the order they were formed, so rows, moves and observers see images in acceptance order whichever
stream finishes first. A batch never waits for the deadline when nothing else is being decoded.

Never losing an image: a folder file leaves the folder only after its row is committed; a commit
that fails is retried (the file stays, and if the daemon stops first it is redone at the next start);
HTTP callers get their answer only after the commit. Never crashing on one: every per-image failure
(decode, inference, observer) becomes an error row or a log line, not an exception in a loop.

Drift monitoring (``pipeline.serve.drift.DriftObserver``) is one more observer; the decode workers
add the full-image statistics it needs. The recent-image sample (``pipeline.serve.recent``) gets
one of every N newly committed, successfully scored images from the committer, before the payload
is released.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.preprocess import normalize
from pipeline.runtime import Prediction
from pipeline.serve.config import ServeSettings
from pipeline.serve.drift import IMAGE_STATS_KEY, MODEL_KEY, DriftObserver, EventEmitter
from pipeline.serve.jobs import ByteBudget, Job, prepare, preprocess_job
from pipeline.serve.metrics import ServeMetrics
from pipeline.serve.models import LoadedModel, ModelHolder, plan_streams, resolve_model_arg, runtime_options
from pipeline.serve.observers import BatchObserver, BatchResult, ImageResult, ObserverDispatcher, load_observer
from pipeline.serve.recent import RecentSample
from pipeline.serve.store import ResultRow, ResultStore, utc_iso

log = logging.getLogger(__name__)


@dataclass
class ScoredBatch:
    """A batch after inference, on its way to the committer."""

    model: LoadedModel
    jobs: list[Job]
    outputs: dict[int, tuple[Prediction, np.ndarray]] = field(default_factory=dict)  # job index -> (pred, emb)
    inference_s: float = 0.0


class Daemon:
    """One serving process: owns the model, the store, the metrics and the sources."""

    def __init__(self, settings: ServeSettings, observers: Sequence[BatchObserver] = (),
                 event_emitter: EventEmitter | None = None):
        """``event_emitter`` replaces the Prefect transport of drift events (tests, other buses)."""
        self.settings = settings
        self.metrics = ServeMetrics()
        locator = resolve_model_arg(settings.model, settings.line, settings.precision)
        self.streams = plan_streams(settings.inference_streams, settings.intra_op_threads, settings.providers,
                                    queued_sources=bool(settings.watch or settings.camera is not None))
        options = runtime_options(settings.providers, self.streams.intra_op_threads, settings.max_batch)
        self.holder = ModelHolder(locator, options, self.metrics, settings.model_poll_interval_s,
                                  settings.require_checksum, settings.infer_batch, self.streams.streams)
        self.store = ResultStore(settings.db, busy_timeout_s=settings.db_busy_timeout_s)
        extra = [load_observer(spec, settings) for spec in settings.observers]
        self.drift: DriftObserver | None = None
        if settings.drift:
            self.drift = DriftObserver.for_daemon(settings, self.metrics, self.store, event_emitter)
            self.drift.prepare(self.holder.current)  # a missing reference is reported now, not at the 1st image
            extra.append(self.drift)
        self.recent: RecentSample | None = None
        if settings.recent_dir is not None:
            self.recent = RecentSample(settings.recent_dir, every=settings.recent_every,
                                       max_images=settings.recent_max_images,
                                       max_age_s=settings.recent_max_age_days * 86400.0,
                                       max_bytes=int(settings.recent_max_mb * 1024 * 1024), metrics=self.metrics)
        self.dispatcher = ObserverDispatcher([*observers, *extra], self.metrics)
        self._ready: queue.Queue[Job | None] = queue.Queue()
        # futures of ScoredBatch, in the order the batches were formed (the committer's order)
        self._scored: queue.Queue[tuple[Future[ScoredBatch], list[Job]] | None] = queue.Queue(
            maxsize=self.streams.streams + 1)
        self._free_streams = threading.Semaphore(self.streams.streams)
        self._infer = ThreadPoolExecutor(max_workers=self.streams.streams, thread_name_prefix="infer")
        self._capacity = threading.Semaphore(settings.max_queue)
        self._count_lock = threading.Lock()
        self._depth = 0  # accepted, not yet completed
        self._seq = itertools.count()
        self._decoding = 0  # accepted, not yet in the ready queue
        self._pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="decode")
        self._accepting = False
        self._abandon = threading.Event()  # drain timed out: stop retrying commits
        self._budget = ByteBudget(int(settings.max_inflight_mb * 1024 * 1024), give_up=self._abandon)
        self._stop_requested = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started_monotonic = time.monotonic()
        self.folder: Any = None
        self.camera: Any = None
        self.http: Any = None
        self.stopping = False
        self.store_ok = True  # False while commits fail (health says "degraded")

    # -- accepting images ----------------------------------------------------------------------------
    def submit(self, job: Job, timeout: float | None = None) -> bool:
        """Accept a job if there is capacity (waiting up to ``timeout`` s; None = forever). False = refused."""
        if not self._accepting:
            return False
        got = self._capacity.acquire(blocking=False) if timeout == 0 else self._capacity.acquire(timeout=timeout)
        if not got:
            return False
        if not self._accepting:
            self._capacity.release()
            return False
        with self._count_lock:
            self._depth += 1
            self._decoding += 1
            job.seq = next(self._seq)
            self.metrics.queue_depth.set(self._depth)
        job.accepted = time.monotonic()
        self._pool.submit(self._prepare, job)
        return True

    @property
    def queue_depth(self) -> int:
        return self._depth

    def _prepare(self, job: Job) -> None:
        try:
            s = self.settings
            want_stats = self.drift is not None and self.drift.wants_image_stats
            prepare(job, self.holder.current.spec, s.max_pixels, s.max_file_bytes, self.store, want_stats,
                    self._budget)
        except BaseException as exc:  # prepare() does not raise; this is the last line of defence
            job.fail("internal_error", f"{type(exc).__name__}: {exc}")
        finally:
            with self._count_lock:
                self._decoding -= 1
            self._ready.put(job)

    # -- batching + inference ---------------------------------------------------------------------------
    def _batch_loop(self) -> None:
        done = False
        while not done:
            self._free_streams.acquire()  # form the next batch only when a stream can run it
            batch, done = self._collect_batch()
            if not batch:
                self._free_streams.release()
                if not done:
                    self._model_for_next_batch()  # idle: swap now rather than at the next image
                continue
            batch.sort(key=lambda j: j.seq)  # decode finishes out of order; rows follow acceptance order
            model = self._model_for_next_batch()  # between batches: the only place a swap happens
            try:
                future = self._infer.submit(self._score_on_stream, model, batch)
            except RuntimeError:  # executor shut down after a drain timeout while this thread ran on: score here
                self._free_streams.release()
                future = Future()
                future.set_result(self._score(model, batch))
            self._scored.put((future, batch))
        self._scored.put(None)

    def _collect_batch(self) -> tuple[list[Job], bool]:
        """Up to max_batch ready images (waiting at most max_wait_ms once the first is in); ([], False)
        after 0.2 s without any; done=True once the shutdown marker is read."""
        s = self.settings
        try:
            first = self._ready.get(timeout=0.2)
        except queue.Empty:
            return [], False
        if first is None:
            return [], True
        batch = [first]
        deadline = time.monotonic() + s.max_wait_ms / 1000.0
        while len(batch) < s.max_batch:
            try:
                item = self._ready.get_nowait()
            except queue.Empty:
                if self._decoding == 0:
                    break  # nothing else is on its way: do not wait for the deadline
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._ready.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _score_on_stream(self, model: LoadedModel, jobs: list[Job]) -> ScoredBatch:
        try:
            return self._score(model, jobs)
        finally:
            self._free_streams.release()

    def _model_for_next_batch(self) -> LoadedModel:
        try:
            return self.holder.take_pending()
        except Exception:  # never let a swap problem stop scoring
            log.exception("model swap failed; keeping %s", self.holder.current.version)
            return self.holder.current

    def _score(self, model: LoadedModel, jobs: list[Job]) -> ScoredBatch:
        out = ScoredBatch(model=model, jobs=jobs)
        try:
            idx = [i for i, j in enumerate(jobs) if j.ready]
            for i in idx:
                if jobs[i].spec != model.spec:  # decoded for the previous model's input geometry
                    preprocess_job(jobs[i], model.spec, self.settings.max_pixels)
            idx = [i for i in idx if jobs[i].ready]
            if idx:
                t0 = time.perf_counter()
                try:
                    x = normalize(np.stack([jobs[i].image for i in idx]), model.spec)
                    probs, emb = model.model.run(x)
                    preds = model.model.decide(probs)
                    for k, i in enumerate(idx):
                        out.outputs[i] = (preds[k], emb[k])
                except Exception as exc:
                    log.error("batch of %d failed (%s); scoring one by one", len(idx), exc)
                    self._score_singly(model, jobs, idx, out)
                out.inference_s = time.perf_counter() - t0
                self.metrics.inference.observe(out.inference_s)
                self.metrics.batch_size.observe(len(idx))
        except Exception as exc:  # keep the batch moving: whatever is unscored becomes an error row
            log.exception("scoring failed")
            for i, j in enumerate(jobs):
                if j.ready and i not in out.outputs:
                    j.fail("internal_error", f"{type(exc).__name__}: {exc}")
        now = time.monotonic()
        for i, j in enumerate(jobs):
            j.scored_at = now
            if j.ready and i not in out.outputs:
                j.fail("internal_error", "no model output")
        return out

    @staticmethod
    def _score_singly(model: LoadedModel, jobs: list[Job], idx: list[int], out: ScoredBatch) -> None:
        for i in idx:
            try:
                probs, emb = model.model.run(normalize(jobs[i].image[None], model.spec))
                out.outputs[i] = (model.model.decide(probs)[0], emb[0])
            except Exception as exc:
                jobs[i].fail("inference_error", f"{type(exc).__name__}: {exc}")

    # -- commit + completion ----------------------------------------------------------------------------
    def _commit_loop(self) -> None:
        while True:
            item = self._scored.get()
            if item is None:
                return
            future, jobs = item
            try:
                self._commit(future.result())
            except Exception:  # a bug here must not strand the jobs
                log.exception("commit step failed")
                for j in jobs:
                    self._complete(j, None, error="internal error while committing")

    def _row(self, job: Job, model: LoadedModel, output: tuple[Prediction, np.ndarray] | None) -> ResultRow:
        latency = ((job.scored_at or time.monotonic()) - job.accepted) * 1000.0
        common = dict(ts=utc_iso(), source=job.source, sha256=job.sha256, idem_key=job.idem_key,
                      model_version=model.version, latency_ms=round(latency, 3))
        if output is None:
            return ResultRow(decision="error", error_kind=job.error_kind or "internal_error",
                             error_message=job.error_message or "not scored", **common)
        pred = output[0]
        return ResultRow(decision=pred.decision, label=pred.label, probabilities=pred.probabilities,
                         defect_score=pred.defect_score, **common)

    def _commit(self, sb: ScoredBatch) -> None:
        new: list[tuple[int, ResultRow]] = []
        for i, j in enumerate(sb.jobs):
            if j.existing is None and j.skipped is None:
                new.append((i, self._row(j, sb.model, sb.outputs.get(i))))
        stored = self._insert_with_retry([r for _, r in new])
        if stored is None:  # gave up (shutdown): nothing recorded, files stay for the next start
            for j in sb.jobs:
                self._complete(j, None, error="daemon stopped before the result could be stored")
            return
        by_job: dict[int, ResultRow] = {}
        fresh: set[int] = set()
        for (i, row), got in zip(new, stored):
            by_job[i] = got
            if got is row:  # newly inserted (not a conflict with an earlier row)
                fresh.add(i)
                job = sb.jobs[i]
                self.metrics.images.labels(row.decision, job.kind).inc()
                if row.error_kind:
                    self.metrics.errors.labels(row.error_kind).inc()
                    if job.kind != "folder":
                        log.warning("%s: %s (%s)", row.source, row.error_kind, row.error_message,
                                    extra={"event": "image_error", "source": row.source, "kind": row.error_kind})
                if row.latency_ms is not None:
                    self.metrics.latency.observe(row.latency_ms / 1000.0)
        items: list[ImageResult] = []
        drift_stats: list[np.ndarray | None] = []
        for i, j in enumerate(sb.jobs):
            row = by_job.get(i, j.existing)
            if i in by_job:
                out = sb.outputs.get(i)
                items.append(ImageResult(source=j.source, sha256=j.sha256, stats=j.stats, image=j.image,
                                         embedding=out[1] if out else None, prediction=out[0] if out else None,
                                         error_kind=j.error_kind, row_id=row.id if row else None))
                drift_stats.append(j.drift_stats)
                if self.recent is not None and out is not None and i in fresh and not row.error_kind:
                    self.recent.offer(j.source, j.sha256, data=j.data, frame=j.frame)
            self._complete(j, row)
        if items:
            md = sb.model.metadata
            extra: dict[str, Any] = {}
            if self.drift is not None:
                extra = {MODEL_KEY: sb.model, IMAGE_STATS_KEY: tuple(drift_stats)}
            self.dispatcher.publish(BatchResult(model_version=sb.model.version, model_sha256=sb.model.sha256,
                                                classes=tuple(md.classes), items=tuple(items),
                                                inference_ms=sb.inference_s * 1000.0, line=self.settings.line,
                                                extra=extra))

    def _insert_with_retry(self, rows: list[ResultRow]) -> list[ResultRow] | None:
        delay = 0.25
        while True:
            try:
                stored = self.store.insert_many(rows)
                self.store_ok = True
                return stored
            except Exception as exc:
                self.store_ok = False
                self.metrics.store_failures.inc()
                log.error("cannot commit %d results to %s: %s; retrying in %.1fs", len(rows), self.store.path,
                          exc, delay, extra={"event": "store_failure"})
            if self._abandon.wait(delay):
                return None
            delay = min(delay * 2, 10.0)

    def _complete(self, job: Job, row: ResultRow | None, error: str | None = None) -> None:
        """Finish a job exactly once: its source's callback, the HTTP future, the capacity slot."""
        if job.completed:
            return
        job.completed = True
        try:
            if job.on_done is not None:
                job.on_done(row)
        except Exception:
            log.exception("completion of %s failed", job.source)
        finally:
            if job.future is not None:
                try:
                    if row is not None:
                        job.future.set_result(row)
                    else:
                        job.future.set_exception(RuntimeError(error or f"not recorded: {job.skipped}"))
                except InvalidStateError:  # the HTTP client timed out and cancelled it: the row stands
                    pass
            job.data = job.frame = job.image = None
            if job.reserved:
                self._budget.release(job.reserved)
                job.reserved = 0
            job.drift_stats = None
            with self._count_lock:
                self._depth -= 1
                self.metrics.queue_depth.set(self._depth)
            self._capacity.release()

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the pipeline threads, then the sources."""
        import cv2

        cv2.setNumThreads(self.settings.opencv_threads)
        s = self.settings
        self.holder.start()
        self.dispatcher.start()
        for target, name in ((self._batch_loop, "batcher"), (self._commit_loop, "committer")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._accepting = True
        if s.http:
            from pipeline.serve.http import HttpServer

            self.http = HttpServer(self, *s.http_address)
            self.http.start()
        if s.watch:
            from pipeline.serve.folder import HotFolder

            self.folder = HotFolder(s.watch, self.submit, self.metrics, s.poll_interval_s)
            self.folder.start()
        if s.camera is not None:
            from pipeline.serve.camera import CameraSource

            self.camera = CameraSource(s.camera, s.camera_fps, self.submit, self.metrics, s.camera_reconnect_min_s,
                                       s.camera_reconnect_max_s, s.camera_max_failures)
            self.camera.start()
        m = self.holder.current
        log.info("serving model %s (%s) on %s, %d inference stream(s) x %s thread(s); sources: %s", m.version,
                 m.sha256[:12], m.provider, self.streams.streams, self.streams.intra_op_threads or "auto",
                 ", ".join(self.source_names()),
                 extra={"event": "started", "version": m.version, "provider": m.provider, "pid": os.getpid()})

    def source_names(self) -> list[str]:
        s = self.settings
        return [n for n, on in (("folder", s.watch), ("http", s.http), ("camera", s.camera is not None)) if on]

    def finished(self) -> bool:
        """All finite sources have nothing more to give and nothing is in flight (for exit_when_done)."""
        if self.http is not None:
            return False
        if self.camera is not None and not self.camera.finished:
            return False
        if self.folder is not None and not self.folder.idle:
            return False
        return self._depth == 0

    def request_stop(self) -> None:
        self._stop_requested.set()

    def shutdown(self) -> None:
        """Stop taking images, finish (commit, move, answer) what was accepted, then close everything."""
        if self.stopping:
            return
        self.stopping = True
        s = self.settings
        log.info("shutting down: finishing %d accepted images", self._depth, extra={"event": "stopping"})
        self._accepting = False
        for src in (self.folder, self.camera):
            if src is not None:
                src.stop()
        if self.http is not None:
            self.http.begin_shutdown()
        deadline = time.monotonic() + s.drain_timeout_s
        while self._depth > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._depth > 0:
            log.error("drain timeout: %d accepted images not committed; folder files stay for the next start",
                      self._depth)
            self._abandon.set()
        self._ready.put(None)
        for t in self._threads:
            t.join(timeout=max(5.0, s.drain_timeout_s))
        if self.http is not None:
            self.http.join()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._infer.shutdown(wait=False)
        if self.recent is not None:
            self.recent.close()
        self.dispatcher.stop()
        if self.drift is not None:
            self.drift.close()
        self.holder.stop()
        self.store.close()
        log.info("stopped", extra={"event": "stopped"})

    def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT (or until finished with exit_when_done), shut down; exit code."""
        def on_signal(signum: int, _frame: Any) -> None:
            if self._stop_requested.is_set():  # a second Ctrl-C: the operator does not want to wait
                log.warning("second %s: exiting without draining (unfinished folder files are redone "
                            "at the next start)", signal.Signals(signum).name)
                os._exit(1)
            log.info("received %s", signal.Signals(signum).name)
            self.request_stop()

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, on_signal)
        code = 0
        try:
            self.start()
            while not self._stop_requested.wait(0.1):
                if self.settings.exit_when_done and self.finished():
                    log.info("all sources finished; exiting", extra={"event": "finished"})
                    break
                if self.http is not None and not self.http.alive:
                    log.error("HTTP server stopped unexpectedly")
                    code = 1
                    break
                if not all(t.is_alive() for t in self._threads):  # a bug, not bad input: restart us
                    log.error("a pipeline thread died; exiting so the service manager restarts the daemon")
                    code = 1
                    break
        finally:
            self.shutdown()
        return code

    # -- views for the HTTP API ---------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        m = self.holder.current
        sources: dict[str, Any] = {}
        if self.folder is not None:
            sources["folder"] = self.folder.state()
        if self.camera is not None:
            sources["camera"] = self.camera.state_dict()
        if self.http is not None:
            sources["http"] = {"address": f"{self.http.host}:{self.http.port}"}
        return {
            "status": "stopping" if self.stopping else ("ok" if self.store_ok else "degraded"),
            "model_version": m.version, "model_sha256": m.sha256, "provider": m.provider,
            "model": m.describe(), "swaps": self.holder.swaps, "last_refusal": self.holder.last_refusal,
            "inference_streams": self.streams.streams, "intra_op_threads": self.streams.intra_op_threads,
            "queue_depth": self._depth, "max_queue": self.settings.max_queue,
            "uptime_s": round(time.monotonic() - self.started_monotonic, 3),
            "line": self.settings.line, "db": str(self.store.path), "pid": os.getpid(),
            "python": sys.version.split()[0], "sources": sources,
            "drift": self.drift.state() if self.drift is not None else {"enabled": False},
            "recent": self.recent.state() if self.recent is not None else None,
        }
