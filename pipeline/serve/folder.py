"""The hot folder: images dropped into a directory are scored once, then moved out of it.

Convention for writers (documented in ``deploy/SERVING.md``):

* Write under a temporary name and rename when complete. Names starting with ``.`` or ending in
  ``.tmp`` / ``.part`` are ignored, so ``.img.png`` / ``img.png.part`` -> ``img.png`` is the pattern.
* As a second guard against writers that do not rename, a file is only picked up once its size,
  mtime and inode are unchanged across two consecutive scans.
* Subfolders are scanned too (except the daemon's own ``done/`` and ``quarantine/`` at the top and
  hidden folders); the relative path is kept: ``DIR/a/b.png`` -> ``DIR/done/a/b.png``.
* Every other regular file is an input: a non-image ends in ``quarantine/`` with ``<name>.reason.txt``.
* Symbolic links are never followed: a link dropped in the folder (to a file or a folder) gets an error
  row and is quarantined as it is (the link, not its target), and files are only ever moved through
  real directories (``done/``, ``quarantine/`` and their subfolders are opened with ``O_NOFOLLOW``), so
  whoever can write to the inbox cannot make the daemon read, move or write anything outside it.

Polling, not inotify/watchdog: the stable-size rule needs periodic stats anyway, polling works the
same on NFS/SMB shares and bind mounts (where inotify events are missing), and the folder stays
small because processed files leave it. The cost is one ``scandir`` per ``poll_interval_s``.

After the result row is COMMITTED the file is moved with ``os.replace`` (atomic) to ``done/`` or
``quarantine/``; a name already taken there gets ``.<sha8>`` (then ``.<n>``) before the extension.
Exactly-once across crashes is explained in ``pipeline.serve.store``.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.serve.jobs import Job

if TYPE_CHECKING:
    from pipeline.serve.metrics import ServeMetrics
    from pipeline.serve.store import ResultRow

log = logging.getLogger(__name__)

DONE_DIR = "done"
QUARANTINE_DIR = "quarantine"
IGNORED_SUFFIXES = (".tmp", ".part")
_RETRY_S = (1.0, 5.0, 30.0, 120.0)

Sig = tuple[int, int, int]  # size, mtime_ns, inode


def is_ignored(name: str) -> bool:
    """Temp names a writer is still filling: hidden files, ``*.tmp``, ``*.part``."""
    low = name.lower()
    return name.startswith(".") or low.endswith(IGNORED_SUFFIXES)


def unique_destination(dest: Path, sha256: str | None) -> Path:
    """``dest`` if free, else ``stem.<sha8>.ext``, else ``stem.<sha8>.<n>.ext``."""
    fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return dest.with_name(unique_name_at(fd, dest.name, sha256))
    finally:
        os.close(fd)


def open_dir_nofollow(root: Path, parts: tuple[str, ...], create: bool = False) -> int:
    """A descriptor of ``root/parts...`` reached without following a symbolic link below ``root``.

    ``root`` itself may be a link (the operator's choice); anything below it that is a link fails
    with ``ELOOP``/``ENOTDIR``. ``create`` makes missing folders on the way (never through a link).
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts:
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _exists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def unique_name_at(dir_fd: int, name: str, sha256: str | None) -> str:
    """``name`` if free in the folder, else ``stem.<sha8>.ext``, else ``stem.<sha8>.<n>.ext``."""
    if not _exists_at(dir_fd, name):
        return name
    p = Path(name)
    tag = (sha256 or "nohash")[:8]
    cand, n = f"{p.stem}.{tag}{p.suffix}", 1
    while _exists_at(dir_fd, cand):
        cand = f"{p.stem}.{tag}.{n}{p.suffix}"
        n += 1
    return cand


def _write_atomic_at(dir_fd: int, name: str, text: str) -> None:
    """Write-temp, fsync, rename inside an open folder; never through a link.

    The temp name is fixed per target (one daemon per folder), so a temp left by a kill between write
    and rename is overwritten and renamed when the move is redone: no stray files pile up.
    """
    tmp = f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def reason_text(row: "ResultRow") -> str:
    return (f"error_kind: {row.error_kind}\nerror_message: {row.error_message}\nsource: {row.source}\n"
            f"sha256: {row.sha256}\nresult_id: {row.id}\ntime: {row.ts}\nmodel_version: {row.model_version}\n")


class HotFolder:
    """Scans ``root``, submits stable files, and moves each one after its result is committed."""

    def __init__(self, root: Path, submit: Callable[[Job, float], bool], metrics: "ServeMetrics",
                 poll_interval_s: float = 0.2):
        self.root = Path(root)
        self.done_dir = self.root / DONE_DIR
        self.quarantine_dir = self.root / QUARANTINE_DIR
        self.root.mkdir(parents=True, exist_ok=True)
        for d in (self.done_dir, self.quarantine_dir):
            if d.is_symlink():
                raise ValueError(f"{d} is a symbolic link: done/ and quarantine/ must be real folders inside "
                                 f"the hot folder (files are never moved through links)")
            d.mkdir(exist_ok=True)
        self._submit = submit
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self._lock = threading.Lock()
        self._seen: dict[str, Sig] = {}
        self._ready: deque[str] = deque()
        self._in_flight: set[str] = set()
        self._retry: dict[str, tuple[float, int]] = {}  # rel -> (not before, failures so far)
        self._pending_files = 0
        self._scans = 0
        self.moved = 0
        self.quarantined = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hot-folder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop picking up files (files already submitted still finish and move)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def idle(self) -> bool:
        """Nothing left: the last full scan found no file to process and none is in flight."""
        with self._lock:
            return self._scans >= 2 and self._pending_files == 0 and not self._in_flight and not self._ready

    def state(self) -> dict[str, object]:
        with self._lock:
            return {"path": str(self.root), "in_flight": len(self._in_flight), "waiting": len(self._ready),
                    "files_present": self._pending_files, "moved_done": self.moved,
                    "quarantined": self.quarantined}

    # -- scanning ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
                self._submit_ready()
            except Exception:
                log.exception("hot-folder scan failed; retrying")
            self._stop.wait(self.poll_interval_s)

    def _walk(self) -> dict[str, Sig]:
        found: dict[str, Sig] = {}
        stack = [(self.root, "")]
        while stack:
            folder, prefix = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError as exc:
                log.warning("cannot list %s: %s", folder, exc)
                continue
            for e in entries:
                if is_ignored(e.name):
                    continue
                rel = f"{prefix}{e.name}"
                try:
                    if e.is_dir(follow_symlinks=False):
                        if not (prefix == "" and e.name in (DONE_DIR, QUARANTINE_DIR)):
                            stack.append((Path(e.path), rel + "/"))
                        continue
                    if not (e.is_file(follow_symlinks=False) or e.is_symlink()):
                        continue  # FIFOs, sockets, devices: never opened (a FIFO would block a worker)
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue  # vanished between listing and stat
                found[rel] = (st.st_size, st.st_mtime_ns, st.st_ino)
        return found

    def scan(self) -> None:
        """One poll: files seen unchanged since the previous poll become ready (oldest first)."""
        found = self._walk()
        now = time.monotonic()
        with self._lock:
            queued = set(self._ready)
            fresh = []
            for rel, sig in found.items():
                if rel in self._in_flight or rel in queued:
                    continue
                retry = self._retry.get(rel)
                if retry is not None and now < retry[0]:
                    continue
                if self._seen.get(rel) == sig:
                    fresh.append((sig[1], rel))
            self._ready.extend(rel for _, rel in sorted(fresh))
            self._ready = deque(r for r in self._ready if r in found)
            self._seen = found
            self._retry = {r: v for r, v in self._retry.items() if r in found}
            self._pending_files = sum(1 for r in found if r not in self._in_flight)
            self._scans += 1

    def _submit_ready(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if not self._ready:
                    return
                rel = self._ready[0]
            job = Job(source=f"folder:{rel}", kind="folder", path=self.root / rel,
                      on_done=lambda row, rel=rel: self._finish(rel, row))
            with self._lock:
                self._in_flight.add(rel)
            if not self._submit(job, self.poll_interval_s):
                with self._lock:
                    self._in_flight.discard(rel)
                return  # queue full: rescan, then try again
            with self._lock:
                if self._ready and self._ready[0] == rel:
                    self._ready.popleft()

    # -- after the commit ----------------------------------------------------------------------------
    def _finish(self, rel: str, row: "ResultRow | None") -> None:
        """Called once per submitted file: ``row`` is its committed result, None if nothing was recorded."""
        try:
            if row is None:
                self._defer(rel, count=False)
                return
            self._move(rel, row)
            with self._lock:
                self._retry.pop(rel, None)
        except FileNotFoundError:
            log.warning("%s vanished after its result was committed (row %s)", rel, row.id if row else None)
        except OSError as exc:
            self.metrics.move_failures.inc()
            log.error("cannot move %s after commit (row %s): %s; will retry", rel, row.id if row else None, exc)
            self._defer(rel, count=True)
        finally:
            with self._lock:
                self._in_flight.discard(rel)

    def _defer(self, rel: str, count: bool) -> None:
        with self._lock:
            failures = self._retry.get(rel, (0.0, 0))[1] + (1 if count else 0)
            delay = _RETRY_S[min(failures, len(_RETRY_S) - 1)]
            self._retry[rel] = (time.monotonic() + delay, failures)
            self._seen.pop(rel, None)

    def _move(self, rel: str, row: "ResultRow") -> None:
        """Move ``rel`` to done/ or quarantine/ through descriptors opened without following links."""
        parts = Path(rel).parts
        base = DONE_DIR if row.ok else QUARANTINE_DIR
        src_fd = dst_fd = -1
        try:
            src_fd = open_dir_nofollow(self.root, parts[:-1])
            if not _exists_at(src_fd, parts[-1]):
                raise FileNotFoundError(self.root / rel)
            try:
                dst_fd = open_dir_nofollow(self.root, (base, *parts[:-1]), create=True)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise OSError(exc.errno, f"{base}/{'/'.join(parts[:-1])} is (or passes through) a symbolic "
                                             f"link or a file; not moving there") from exc
                raise
            name = unique_name_at(dst_fd, parts[-1], row.sha256)
            if not row.ok:
                _write_atomic_at(dst_fd, name + ".reason.txt", reason_text(row))
            os.replace(parts[-1], name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        finally:
            for fd in (src_fd, dst_fd):
                if fd >= 0:
                    os.close(fd)
        with self._lock:
            if row.ok:
                self.moved += 1
            else:
                self.quarantined += 1
        if not row.ok:
            log.warning("quarantined %s: %s (%s)", rel, row.error_kind, row.error_message,
                        extra={"event": "quarantined", "source": row.source, "kind": row.error_kind})
