"""Camera / video source: any ``cv2.VideoCapture`` source, sampled at a fixed rate.

Two behaviours, chosen from the source string and stated in ``/health`` (``camera.mode``):

* **live** (a device index like ``0``, a device path, or a URL such as ``rtsp://`` / ``http://``):
  frames are grabbed continuously (so the decoder never falls behind) and one is kept every
  ``1/fps`` seconds of wall-clock time. When the queue is full the sampled frame is skipped and
  counted (a stale frame is worth less than the next one). When the stream drops or cannot be opened
  it is reopened with exponential back-off (``reconnect_min_s`` doubling to ``reconnect_max_s``,
  reset by the first good frame), forever unless ``max_failures`` is set.
* **file** (an existing regular file): every frame is decoded in order and one is kept every
  ``1/fps`` seconds of *video* time; the source waits for queue space instead of skipping, and when
  the file ends the source is *finished* (state ``finished``), never reopened.

Sources are labelled ``camera:<src>#<frame index>``; passwords in URLs are masked.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import cv2

from pipeline.serve.jobs import Job

if TYPE_CHECKING:
    from pipeline.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)

_TIMEOUT_MS = 10_000


def redact(src: str) -> str:
    """Mask the password of ``scheme://user:password@host/...``."""
    if "://" not in src:
        return src
    parts = urlsplit(src)
    if parts.password is None:
        return src
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def classify(src: str) -> tuple[str, int | str]:
    """``(mode, capture argument)``: ``live`` for device indices, devices and URLs, ``file`` for video files."""
    s = src.strip()
    if s.isdigit():
        return "live", int(s)
    if "://" in s:
        return "live", s
    p = Path(s)
    if p.is_file():
        return "file", str(p)
    if p.exists():  # /dev/video0 and friends
        return "live", str(p)
    raise FileNotFoundError(f"camera source {src!r}: not a device index, URL or existing file")


def default_open(arg: int | str) -> Any:
    """Open a capture with bounded open/read timeouts so a dead network stream cannot hang forever."""
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, _TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, _TIMEOUT_MS]
    try:
        return cv2.VideoCapture(arg, cv2.CAP_ANY, params)
    except (cv2.error, TypeError):
        return cv2.VideoCapture(arg)


class CameraSource:
    """Samples frames from one capture source into the daemon's queue."""

    def __init__(self, src: str, fps: float, submit: Callable[[Job, float], bool], metrics: "ServeMetrics",
                 reconnect_min_s: float = 0.5, reconnect_max_s: float = 30.0, max_failures: int = 0,
                 open_capture: Callable[[int | str], Any] = default_open):
        self.src = src
        self.mode, self._arg = classify(src)
        self.label = redact(src)
        self.period = 1.0 / fps if fps > 0 else 0.0
        self._submit = submit
        self.metrics = metrics
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.max_failures = max_failures
        self._open = open_capture
        self.state = "starting"
        self.frames_read = 0
        self.frames_sampled = 0
        self.frames_skipped = 0
        self.reconnects = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def finished(self) -> bool:
        """True once a file has ended (or a source has given up): it will produce nothing more."""
        return self.state in ("finished", "failed")

    def state_dict(self) -> dict[str, object]:
        return {"source": self.label, "mode": self.mode, "state": self.state, "frames_read": self.frames_read,
                "frames_sampled": self.frames_sampled, "frames_skipped": self.frames_skipped,
                "reconnects": self.reconnects}

    def start(self) -> None:
        target = self._run_file if self.mode == "file" else self._run_live
        self._thread = threading.Thread(target=self._guard, args=(target,), name="camera", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=_TIMEOUT_MS / 1000 + 2)

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except Exception:
            self.state = "failed"
            log.exception("camera source %s failed", self.label)

    def _job(self, frame: Any, index: int) -> Job:
        return Job(source=f"camera:{self.label}#{index}", kind="camera", frame=frame)

    # -- video file: every sampled frame, in order, then finished ---------------------------------------
    def _run_file(self) -> None:
        cap = self._open(self._arg)
        if cap is None or not cap.isOpened():
            self.state = "failed"
            log.error("cannot open video file %s", self.label)
            return
        self.state = "streaming"
        file_fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        next_t, index = 0.0, -1
        try:
            while not self._stop.is_set():
                if not cap.grab():
                    break
                index += 1
                self.frames_read += 1
                t = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                if t <= 0.0 and index > 0 and file_fps > 0:
                    t = index / file_fps  # container without timestamps
                if self.period:
                    if t + 1e-6 < next_t:
                        continue
                    next_t = next_t + self.period if t < next_t + self.period else t + self.period
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    log.warning("%s: frame %d could not be decoded; skipped", self.label, index)
                    continue
                job = self._job(frame, index)
                while not self._submit(job, 0.5):
                    if self._stop.is_set():
                        return
                self.frames_sampled += 1
        finally:
            cap.release()
        if self._stop.is_set():
            self.state = "stopped"
        else:
            self.state = "finished"
            log.info("video file %s ended after %d frames (%d sampled); source finished", self.label,
                     self.frames_read, self.frames_sampled, extra={"event": "camera_finished"})

    # -- live stream: sample by wall clock, skip when busy, reconnect with back-off -----------------------
    def _run_live(self) -> None:
        delay, failures, index = self.reconnect_min_s, 0, -1
        while not self._stop.is_set():
            cap = self._open(self._arg)
            if cap is not None and cap.isOpened():
                self.state = "streaming"
                log.info("camera %s connected", self.label, extra={"event": "camera_connected"})
                next_due = time.monotonic()
                try:
                    while not self._stop.is_set():
                        if not cap.grab():
                            break
                        index += 1
                        self.frames_read += 1
                        delay, failures = self.reconnect_min_s, 0
                        now = time.monotonic()
                        if self.period:
                            if now < next_due:
                                continue
                            next_due += self.period
                            if next_due < now:
                                next_due = now + self.period
                        ok, frame = cap.retrieve()
                        if not ok or frame is None:
                            continue
                        if self._submit(self._job(frame, index), 0.0):
                            self.frames_sampled += 1
                        else:
                            self.frames_skipped += 1
                            self.metrics.camera_skipped.inc()
                finally:
                    cap.release()
            elif cap is not None:
                cap.release()
            if self._stop.is_set():
                break
            failures += 1
            if self.max_failures and failures >= self.max_failures:
                self.state = "failed"
                log.error("camera %s: giving up after %d failed attempts", self.label, failures)
                return
            self.state = "reconnecting"
            self.reconnects += 1
            self.metrics.camera_reconnects.inc()
            log.warning("camera %s dropped or unreachable; reconnecting in %.1fs", self.label, delay,
                        extra={"event": "camera_reconnect", "delay_s": delay})
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, self.reconnect_max_s)
        self.state = "stopped"
