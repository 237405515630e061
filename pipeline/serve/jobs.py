"""One image on its way through the daemon, and the decode + preprocess step the worker pool runs.

A job carries its payload (the file's or upload's bytes, or a camera frame) until it is committed,
so that if a hot-swap changes the model's input spec between decode and batch, the batcher can
preprocess it again for the new model instead of scoring it with the wrong geometry.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from pipeline.data.decode import ImageDecodeError, decode_bytes, image_size, to_rgb_uint8
from pipeline.preprocess import PreprocessSpec, resize_image
from pipeline.serve.observers import ImageStats

if TYPE_CHECKING:
    from pipeline.serve.store import ResultRow, ResultStore


class ByteBudget:
    """Caps the file bytes that accepted jobs hold in memory at once.

    A job keeps its payload until its row is committed (a hot-swap may need to decode it again), so
    without a cap ``max_queue`` big files could be held together while commits wait (a locked or full
    database): 32 x 24 MB was +530 MB. A reader waits while the budget is spent; one file larger than
    the whole budget still goes through, alone.
    """

    def __init__(self, limit_bytes: int, give_up: threading.Event | None = None):
        self.limit = limit_bytes
        self.used = 0
        self._give_up = give_up or threading.Event()
        self._cv = threading.Condition()

    def acquire(self, n: int) -> bool:
        """Reserve ``n`` bytes, waiting for room; False when the daemon gave up waiting (shutdown)."""
        with self._cv:
            while self.used > 0 and self.used + n > self.limit:
                if self._give_up.is_set():
                    return False
                self._cv.wait(0.2)
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()


@dataclass(eq=False)
class Job:
    """An accepted image. Exactly one of ``path`` / ``data`` / ``frame`` is the payload."""

    source: str
    kind: str  # "folder" | "http" | "camera": the metric label
    path: Path | None = None
    data: bytes | None = None
    frame: np.ndarray | None = None
    on_done: Callable[["ResultRow"], None] | None = None  # called after the commit (folder: move the file)
    future: Future | None = None  # resolved with the committed row (HTTP)
    accepted: float = field(default_factory=time.monotonic)
    seq: int = 0  # acceptance order (set by the daemon); batches are scored and committed in this order
    # Filled by prepare():
    sha256: str | None = None
    idem_key: str | None = None
    stats: ImageStats | None = None
    drift_stats: np.ndarray | None = None  # pipeline.drift image statistics of the full image (if asked for)
    image: np.ndarray | None = None  # model-size RGB uint8 (normalised per batch by the batcher: 4x smaller)
    spec: PreprocessSpec | None = None
    error_kind: str | None = None
    error_message: str | None = None
    existing: "ResultRow | None" = None  # already committed before (restart): only on_done is left
    skipped: str | None = None  # why nothing is recorded now (file vanished, ledger unreadable): retried later
    scored_at: float | None = None
    completed: bool = False  # set once by the daemon; guards the capacity slot against double release
    reserved: int = 0  # bytes of the in-flight budget this job holds (released when it completes)

    def fail(self, kind: str, message: str) -> None:
        self.error_kind, self.error_message = kind, message
        self.image = None

    @property
    def ready(self) -> bool:
        """Has a model-size image and needs scoring."""
        return self.image is not None and self.error_kind is None and self.existing is None


def image_stats(img: np.ndarray, size: tuple[int, int] | None = None) -> ImageStats:
    """Mean/std per channel of the decoded image; ``size`` (width, height): the file's own, when the
    decode was scaled down."""
    mean, std = cv2.meanStdDev(img)
    m, s = mean.ravel(), std.ravel()
    if m.size == 1:  # a grey image kept as one channel: its three channels are equal
        m, s = np.repeat(m, 3), np.repeat(s, 3)
    width, height = size or (int(img.shape[1]), int(img.shape[0]))
    return ImageStats(height=int(height), width=int(width),
                      mean=(float(m[0]), float(m[1]), float(m[2])), std=(float(s[0]), float(s[1]), float(s[2])))


def _decode(job: Job, max_pixels: int, spec: PreprocessSpec) -> np.ndarray:
    if job.frame is not None:
        return to_rgb_uint8(job.frame, keep_grey=True)
    assert job.data is not None
    return decode_bytes(job.data, max_pixels=max_pixels, spec=spec, keep_grey=True)  # resize_image makes it RGB


def preprocess_job(job: Job, spec: PreprocessSpec, max_pixels: int, drift_stats: bool = False) -> None:
    """Decode the payload and make the model input for ``spec``; errors land in the job, never raise.

    ``drift_stats``: also compute the drift image statistics from the same decoded full image (the
    drift reference has them of full images, and a second decode would double the worker's cost).
    """
    try:
        img = _decode(job, max_pixels, spec)
        if job.stats is None:
            job.stats = image_stats(img, image_size(job.data) if job.data is not None else None)
        if drift_stats and job.drift_stats is None:
            _drift_statistics(job, img)
        job.image = resize_image(img, spec)
        job.spec = spec
    except ImageDecodeError as exc:
        job.fail(exc.kind, str(exc))
    except MemoryError:
        job.fail("too_large", "not enough memory to decode this image")
    except Exception as exc:  # a decoder bug or an exotic format must not take the daemon down
        job.fail("decode_error", f"{type(exc).__name__}: {exc}")


def _drift_statistics(job: Job, img: np.ndarray) -> None:
    from pipeline.drift.stats import image_statistics

    try:
        job.drift_stats = image_statistics(img)
    except Exception:  # the image still gets scored; it is just left out of the drift stream
        job.drift_stats = None


def prepare(job: Job, spec: PreprocessSpec, max_pixels: int, max_file_bytes: int,
            store: "ResultStore | None", drift_stats: bool = False, budget: ByteBudget | None = None) -> Job:
    """Worker step: read, hash, look up the ledger (folder), decode, preprocess. Always returns the job.

    A folder file gets its idempotency key before anything can fail, so even an error row is never
    written twice for the same file (see ``pipeline.serve.store``).
    """
    try:
        if job.path is not None:
            if not _read_file(job, max_file_bytes, store, budget):
                return job
        if job.frame is not None:
            job.sha256 = hashlib.sha256(np.ascontiguousarray(job.frame).data).hexdigest()
        elif job.data is not None:
            job.sha256 = hashlib.sha256(job.data).hexdigest()
        if job.path is not None:
            job.idem_key = f"{job.source}|{job.sha256}"
            if not _lookup(job, store) or job.existing is not None:
                return job
        if not job.data and job.frame is None:
            job.fail("empty", "empty file" if job.path is not None else "empty request body")
            return job
        preprocess_job(job, spec, max_pixels, drift_stats)
    except Exception as exc:  # never let one image stop the pipeline
        job.fail("internal_error", f"{type(exc).__name__}: {exc}")
    return job


def _read_file(job: Job, max_file_bytes: int, store: "ResultStore | None", budget: ByteBudget | None = None
               ) -> bool:
    """Read a folder file into ``job.data``; False when the job is settled without scoring.

    ``budget``: room for the file's bytes is reserved before reading (``job.reserved``; the daemon
    releases it when the job completes)."""
    assert job.path is not None
    try:
        # O_NOFOLLOW: a link dropped in the hot folder is refused, never read (it could point anywhere the
        # daemon may read); O_NONBLOCK: a FIFO swapped in after the scan cannot block the worker.
        fd = os.open(job.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            if st.st_size > max_file_bytes:
                job.idem_key = f"{job.source}|oversize:{st.st_size}:{st.st_mtime_ns}"
                if _lookup(job, store) and job.existing is None:
                    job.fail("too_large", f"file is {st.st_size} bytes, limit is {max_file_bytes}")
                return False
            if budget is not None and st.st_size:
                if not budget.acquire(st.st_size):
                    job.skipped = "daemon stopping"
                    return False
                job.reserved = st.st_size
            job.data = f.read()
        return True
    except FileNotFoundError:
        job.skipped = "vanished"
        return False
    except OSError as exc:
        try:
            st = os.lstat(job.path)
            job.idem_key = f"{job.source}|unreadable:{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            job.skipped = "vanished"
            return False
        if _lookup(job, store) and job.existing is None:
            if stat.S_ISLNK(st.st_mode):
                job.fail("symlink", "a symbolic link: the hot folder only reads regular files")
            elif not stat.S_ISREG(st.st_mode):
                job.fail("not_a_file", "not a regular file (FIFO, socket or device)")
            else:
                job.fail("io_error", f"cannot read file: {exc}")
        return False


def _lookup(job: Job, store: "ResultStore | None") -> bool:
    """Fill ``job.existing`` from the ledger; False (job skipped, retried later) if the ledger is unreadable."""
    if store is None or job.idem_key is None:
        return True
    try:
        job.existing = store.get_by_key(job.idem_key)
    except Exception as exc:
        job.skipped = f"ledger lookup failed: {exc}"
        return False
    return True
