"""A bounded on-disk sample of recently scored images, so re-adaptation has images of the current domain.

When drift is detected the re-adaptation flow (``flows.adapt.readapt(recent_dir=...)``) needs images
of the *new* domain, and the daemon is the only place that sees them. It keeps one of every
``every`` successfully scored images (error rows never), as a copy of the original file bytes, or a
lossless PNG of a camera frame, in one flat folder:

    recent-<UTC yyyymmddThhmmssffffff>-<seq>-<sha256[:12]>.<ext>

Names sort in time order; ``list_images`` (what adaptation reads) skips the hidden temp files that
each image is written to first (write, fsync, rename), so a reader never sees half an image.
Bounded: beyond ``max_images`` files or ``max_bytes`` the oldest are deleted, and so is anything
older than ``max_age_s``. Only files with the ``recent-`` prefix are ever deleted.

Cheap on the hot path: ``offer`` (committer thread) only counts and, for one image in ``every``,
hands the bytes to a writer thread through a small bounded queue; when the writer lags the image
is skipped and counted, never waited for.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)

RECENT_PREFIX = "recent-"
_AGE_CHECK_S = 60.0


def sniff_extension(data: bytes) -> str | None:
    """File extension for encoded image bytes from their magic number; None when not recognised."""
    head = bytes(data[:16])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if head.startswith(b"\xff\xd8"):
        return ".jpg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return ".gif"
    if head.startswith(b"BM"):
        return ".bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return ".tif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    if head[:1] == b"P" and head[1:2] in (b"1", b"4"):
        return ".pbm"
    if head[:1] == b"P" and head[1:2] in (b"2", b"5"):
        return ".pgm"
    if head[:1] == b"P" and head[1:2] in (b"3", b"6"):
        return ".ppm"
    return None


def encode_png(rgb: np.ndarray) -> bytes:
    """RGB uint8 -> PNG bytes (fast compression: the writer thread should not hog a core)."""
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


_STAMP = "%Y%m%dT%H%M%S%f"


def _stamp_time(name: str) -> float | None:
    """The time a sample file was taken, from its name (``recent-<stamp>-...``); None for other names."""
    stamp = name[len(RECENT_PREFIX):].split("-", 1)[0]
    try:
        return datetime.strptime(stamp, _STAMP).replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class _Pending:
    stem: str
    taken: float
    data: bytes | None
    frame: np.ndarray | None


@dataclass(frozen=True)
class _Entry:
    name: str
    size: int
    taken: float  # when the image was scored (UTC epoch seconds, from the name)


class RecentSample:
    """Keeps one of every ``every`` scored images in ``folder``, bounded by count, bytes and age."""

    def __init__(self, folder: str | os.PathLike, *, every: int = 10, max_images: int = 500,
                 max_age_s: float = 14 * 86400.0, max_bytes: int = 1 << 30, max_pending: int = 32,
                 metrics: "ServeMetrics | None" = None, clock: Callable[[], float] = time.time):
        if every < 1 or max_images < 1 or max_bytes < 1 or max_age_s <= 0 or max_pending < 1:
            raise ValueError(f"recent sample needs every, max_images, max_bytes, max_pending >= 1 and "
                             f"max_age_s > 0; got {every}, {max_images}, {max_bytes}, {max_pending}, {max_age_s}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not os.access(self.folder, os.W_OK):
            raise PermissionError(f"recent-image folder {self.folder} is not writable")
        self.every, self.max_images, self.max_bytes, self.max_age_s = every, max_images, max_bytes, max_age_s
        self.metrics = metrics
        self._clock = clock
        self._seen = 0
        self._seq = itertools.count()
        self.saved = 0
        self.dropped = 0
        self.deleted = 0
        self._q: queue.Queue[_Pending | None] = queue.Queue(maxsize=max_pending)
        self._lock = threading.Lock()  # guards the index (writer thread vs state())
        self._thread: threading.Thread | None = None
        self._closed = False
        self._entries: deque[_Entry] = deque()
        self._bytes = 0
        self._scan()
        self.prune()

    # -- the hot path (committer thread) ----------------------------------------------------------------
    def offer(self, source: str, sha256: str | None, data: bytes | None = None,
              frame: np.ndarray | None = None) -> bool:
        """Consider one successfully scored image; True when it was queued for writing."""
        if self._closed or (data is None and frame is None):
            return False
        self._seen += 1
        if (self._seen - 1) % self.every:
            return False
        now = self._clock()
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime(_STAMP)
        stem = f"{RECENT_PREFIX}{stamp}-{next(self._seq):06d}-{(sha256 or 'nohash')[:12]}"
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="recent-sample", daemon=True)
            self._thread.start()
        try:
            self._q.put_nowait(_Pending(stem, now, data, frame))
        except queue.Full:
            self._drop(f"{source}: writer busy")
            return False
        return True

    # -- the writer thread ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:
                item = self._q.get(timeout=_AGE_CHECK_S)
            except queue.Empty:
                self._safe_prune()
                continue
            if item is None:
                return
            try:
                self._write(item)
            except Exception as exc:  # disk full, permissions...: the daemon goes on without this sample
                self._drop(f"{item.stem}: {type(exc).__name__}: {exc}", warn=True)
            self._safe_prune()

    def _write(self, item: _Pending) -> Path:
        if item.data is not None:
            ext = sniff_extension(item.data)
            payload = item.data
            if ext is None:  # an exotic format OpenCV decoded: keep it as PNG so any reader can open it
                from pipeline.data.decode import decode_bytes

                payload, ext = encode_png(decode_bytes(item.data)), ".png"
        else:
            from pipeline.data.decode import to_rgb_uint8

            assert item.frame is not None
            payload, ext = encode_png(to_rgb_uint8(item.frame)), ".png"
        if len(payload) > self.max_bytes:
            raise ValueError(f"image of {len(payload)} bytes exceeds the whole sample budget ({self.max_bytes})")
        final = self.folder / f"{item.stem}{ext}"
        tmp = self.folder / f".{final.name}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with self._lock:
            self._entries.append(_Entry(final.name, len(payload), item.taken))
            self._bytes += len(payload)
        self.saved += 1
        if self.metrics is not None:
            self.metrics.recent_saved.inc()
        return final

    def _drop(self, why: str, warn: bool = False) -> None:
        self.dropped += 1
        if self.metrics is not None:
            self.metrics.recent_dropped.inc()
        (log.warning if warn else log.debug)("recent sample: skipped %s", why)

    def _safe_prune(self) -> None:
        try:
            self.prune()
        except Exception:
            log.exception("recent sample: pruning %s failed", self.folder)

    # -- bounds -------------------------------------------------------------------------------------------
    def _scan(self) -> None:
        """Index our files already on disk (oldest first) and remove temp files a crash left behind."""
        entries: list[_Entry] = []
        for p in self.folder.iterdir():
            name = p.name
            if name.startswith(f".{RECENT_PREFIX}") and name.endswith(".tmp"):
                p.unlink(missing_ok=True)
            elif name.startswith(RECENT_PREFIX) and p.is_file():
                st = p.stat()
                taken = _stamp_time(name)
                entries.append(_Entry(name, st.st_size, st.st_mtime if taken is None else taken))
        entries.sort(key=lambda e: e.name)
        with self._lock:
            self._entries = deque(entries)
            self._bytes = sum(e.size for e in entries)

    def prune(self) -> int:
        """Delete the oldest files beyond the count and byte limits, and any older than the age limit."""
        now = self._clock()
        removed = 0
        with self._lock:
            while self._entries and (len(self._entries) > self.max_images or self._bytes > self.max_bytes
                                     or now - self._entries[0].taken > self.max_age_s):
                e = self._entries.popleft()
                self._bytes -= e.size
                try:
                    (self.folder / e.name).unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("recent sample: cannot delete %s: %s", e.name, exc)
                removed += 1
            n, b = len(self._entries), self._bytes
        self.deleted += removed
        if self.metrics is not None:
            self.metrics.recent_files.set(n)
            self.metrics.recent_bytes.set(b)
        return removed

    # -- views and lifecycle ------------------------------------------------------------------------------
    def files(self) -> list[Path]:
        """The sample, oldest first."""
        with self._lock:
            return [self.folder / e.name for e in self._entries]

    def state(self) -> dict[str, Any]:
        with self._lock:
            n, b = len(self._entries), self._bytes
        return {"dir": str(self.folder), "images": n, "bytes": b, "every": self.every,
                "max_images": self.max_images, "max_bytes": self.max_bytes, "max_age_s": self.max_age_s,
                "saved": self.saved, "dropped": self.dropped, "deleted": self.deleted}

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to ``timeout``), then stop the writer."""
        self._closed = True
        if self._thread is None:
            return
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            log.warning("recent sample: writer did not catch up within %.0fs", timeout)
            return
        self._thread.join(timeout)
