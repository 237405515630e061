"""On-disk model registry: ``<root>/<line>/<version>/`` plus a ``CHAMPION`` pointer per line.

Layout::

    <root>/<line>/<version>/model.onnx, model.json, [model.int8.onnx, model.int8.json], metrics.json,
                            report.html, manifest.json, drift reference, PNGs, registry.json
    <root>/<line>/CHAMPION        one line: the champion version; replaced atomically
    <root>/<line>/history.jsonl   promotions and rollbacks, append-only
    <root>/<line>/.lock           the line lock (see :func:`line_lock`)

``registry.json`` is written by the registry only: it records the sha256 of every file as it was
registered, so a model swapped on disk *together with* its sidecar is still refused at load time.

Versions are published with a directory rename, so a reader sees a version completely or not at
all. Nothing here imports torch or ONNX Runtime at module import (``load_*`` import the runtime).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, ValidationError

from pipeline.metadata import ModelMetadata, sidecar_path

if TYPE_CHECKING:  # pragma: no cover - typing only; the runtime pulls in onnxruntime
    from pipeline.runtime import OnnxModel, RuntimeOptions

log = logging.getLogger(__name__)

CHAMPION_FILE = "CHAMPION"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".lock"
REGISTER_LOCK_FILE = ".register.lock"
RECORD_FILE = "registry.json"
MODEL_FILE = "model.onnx"
INT8_MODEL_FILE = "model.int8.onnx"
METRICS_FILE = "metrics.json"
HEADLINE_METRIC = "balanced_accuracy"
RECORD_SCHEMA = 1

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
_AUTO_VERSION_RE = re.compile(r"^v(\d+)$")
# Names that live beside the version folders inside a line folder.
_RESERVED_VERSIONS = {CHAMPION_FILE, HISTORY_FILE, LOCK_FILE, REGISTER_LOCK_FILE}
# What counts as an artefact worth keeping; checkpoints, caches and logs of other kinds stay behind.
ARTEFACT_SUFFIXES = frozenset({".onnx", ".json", ".jsonl", ".html", ".png", ".jpg", ".jpeg", ".svg", ".npz",
                               ".npy", ".csv", ".txt", ".md", ".yaml", ".yml"})


# --------------------------------------------------------------------------- errors


class RegistryError(RuntimeError):
    """Base class: anything the registry refuses to do, with a message fit for an operator."""


class InvalidNameError(RegistryError, ValueError):
    """A line or version name that could escape the registry folder or collide with its files."""


class VersionNotFoundError(RegistryError, LookupError):
    """The requested line/version is not in the registry."""


class VersionExistsError(RegistryError):
    """An explicit version name that is already taken."""


class NoChampionError(RegistryError, LookupError):
    """The line has no champion (nothing promoted yet), or no earlier one to roll back to."""


class IntegrityError(RegistryError):
    """Files do not match the checksums recorded for them (tampered, swapped or truncated)."""


class LineBusyError(RegistryError, TimeoutError):
    """Another process holds the line lock (a retrain or promotion is running)."""


# --------------------------------------------------------------------------- paths and names


def validate_name(name: str, kind: str = "name") -> str:
    """Return ``name`` if it is a safe line/version name, else raise :class:`InvalidNameError`.

    Names become folder names, so anything with separators, a leading dot or odd characters
    (path traversal, hidden files) is refused up front.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidNameError(f"invalid {kind} name {name!r}: must match {NAME_PATTERN}")
    if kind == "version" and name in _RESERVED_VERSIONS:
        raise InvalidNameError(f"invalid version name {name!r}: reserved for the registry's own files")
    return name


def line_dir(root: str | os.PathLike, line: str) -> Path:
    return Path(root) / validate_name(line, "line")


def model_dir(root: str | os.PathLike, line: str, version: str) -> Path:
    return line_dir(root, line) / validate_name(version, "version")


def read_champion(root: str | os.PathLike, line: str) -> str | None:
    """The champion version of a line, or None when the line has none yet."""
    p = line_dir(root, line) / CHAMPION_FILE
    try:
        text = p.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


def registered_sha256(root: str | os.PathLike, line: str, version: str, file: str = MODEL_FILE) -> str:
    """The sha256 the registry recorded for ``file`` of a version (for loaders that open files themselves)."""
    record = _read_record(model_dir(root, line, version))
    try:
        return record["files"][file]
    except KeyError:
        raise IntegrityError(f"{line}/{version}: no registered checksum for {file}") from None


def _fsync_dir(path: Path) -> None:
    """Make a rename/create in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry / no env vars (minimal containers)
        return f"uid{os.getuid()}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _version_sort_key(name: str) -> tuple:
    """Natural order: v2 < v10, and auto versions before hand-named ones of equal prefix."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)


# --------------------------------------------------------------------------- locks


class LineLock:
    """An exclusive, cross-process lock on one line (``fcntl.flock`` on ``<line>/.lock``).

    Hand a held lock to :meth:`Registry.promote` / :meth:`Registry.rollback` when promoting from
    inside a locked retrain: flock locks taken twice through two descriptors block each other even
    within one process, so the registry must not take it again.
    """

    def __init__(self, root: Path, line: str, path: Path, fd: int):
        self.root, self.line, self.path = root, line, path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def covers(self, root: str | os.PathLike, line: str) -> bool:
        return self.held and self.line == line and Path(root).resolve() == self.root.resolve()

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __repr__(self) -> str:
        return f"LineLock({self.line!r}, held={self.held})"


def _lock_holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""
    return f" (held by {text})" if text else ""


def _flock(path: Path, timeout: float | None, what: str) -> int:
    """Open ``path`` and take an exclusive flock on it; None waits forever, 0 tries once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fd
        deadline = time.monotonic() + max(timeout, 0.0)
        delay = 0.01
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LineBusyError(f"{what} is busy: lock {path} not acquired within {timeout:g} s"
                                    f"{_lock_holder(path)}")
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.2)
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def line_lock(root: str | os.PathLike, line: str, timeout: float | None = None) -> Iterator[LineLock]:
    """Hold the lock of one line so two retrains (or a retrain and a promotion) never overlap.

    Works across processes and across threads (each call opens its own descriptor). ``timeout``:
    None waits as long as it takes, 0 fails at once; on expiry :class:`LineBusyError` names the
    holder. Locks of different lines are independent. The kernel drops the lock if the holder dies.
    """
    ldir = line_dir(root, line)
    ldir.mkdir(parents=True, exist_ok=True)
    path = ldir / LOCK_FILE
    fd = _flock(path, timeout, f"line {line!r}")
    lock = LineLock(Path(root), line, path, fd)
    try:
        # Diagnostics for whoever waits on us; the lock itself is the flock, not this text.
        info = f"pid {os.getpid()} on {socket.gethostname()} since {_now().isoformat(timespec='seconds')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        yield lock
    finally:
        lock.release()


# --------------------------------------------------------------------------- records


class ModelVersion(BaseModel):
    """A registered model version as the registry sees it (a snapshot: ``champion`` is as of reading)."""

    line: str
    version: str
    path: Path
    created: datetime  # when it was registered
    model_created: datetime | None = None  # ``created`` from model.json (when it was exported)
    onnx_sha256: str
    files: dict[str, str] = Field(default_factory=dict)  # relative path -> sha256 at registration
    metrics: dict[str, Any] = Field(default_factory=dict)  # headline metrics, see headline_metrics()
    note: str | None = None
    source: str | None = None  # the run folder it was registered from
    user: str | None = None
    champion: bool = False

    @property
    def onnx_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def has_int8(self) -> bool:
        return INT8_MODEL_FILE in self.files

    def metadata(self) -> ModelMetadata:
        """The version's ``model.json``."""
        return ModelMetadata.model_validate_json((self.path / "model.json").read_text(encoding="utf-8"))

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict for listings (``list --json``)."""
        return {"line": self.line, "version": self.version, "champion": self.champion,
                "created": self.created.isoformat(), "onnx_sha256": self.onnx_sha256,
                "int8": self.has_int8, "note": self.note, "metrics": self.metrics, "path": str(self.path)}


class HistoryEntry(BaseModel):
    """One line of ``history.jsonl``."""

    time: datetime
    action: Literal["promote", "rollback"]
    version: str
    previous: str | None = None
    reason: str = ""
    user: str | None = None
    onnx_sha256: str | None = None


def _read_record(vdir: Path) -> dict[str, Any]:
    p = vdir / RECORD_FILE
    try:
        record = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if vdir.is_dir():
            raise IntegrityError(f"{vdir}: no {RECORD_FILE}; not a registered version") from None
        raise VersionNotFoundError(f"no version {vdir.parent.name}/{vdir.name} in registry {vdir.parent.parent}") \
            from None
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{p}: unreadable registry record: {e}") from e
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict) or "onnx_sha256" not in record:
        raise IntegrityError(f"{p}: malformed registry record")
    return record


def headline_metrics(model_metrics: Any, metrics_file: Any) -> dict[str, Any]:
    """The metrics a version is listed and compared by.

    ``model.json``'s ``metrics`` (the artefact contract) when they carry ``balanced_accuracy``;
    else ``metrics.json`` when it is a flat evaluation dict; else its ``test``/``evaluation``/
    ``validation`` section (a training run's summary nests them); else whatever is there.
    """
    candidates: list[Any] = [model_metrics, metrics_file]
    if isinstance(metrics_file, dict):
        candidates += [metrics_file.get(k) for k in ("test", "evaluation", "validation")]
    for c in candidates:
        if isinstance(c, dict) and HEADLINE_METRIC in c:
            return c
    for c in (model_metrics, metrics_file):
        if isinstance(c, dict) and c:
            return c
    return {}


def _copy_hashed(src: Path, dst: Path) -> str:
    """Copy ``src`` to ``dst`` (fsynced) and return the sha256 of the bytes written."""
    h = hashlib.sha256()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while block := fi.read(1 << 20):
            h.update(block)
            fo.write(block)
        fo.flush()
        os.fsync(fo.fileno())
    shutil.copystat(src, dst, follow_symlinks=True)
    return h.hexdigest()


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _artefact_files(run: Path, meta: ModelMetadata) -> list[str]:
    """Relative POSIX paths of the run's files to register: artefact types only, no hidden files."""
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(run, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            p = Path(dirpath) / name
            if name.startswith(".") or p.suffix.lower() not in ARTEFACT_SUFFIXES or not p.is_file():
                continue
            rel = p.relative_to(run).as_posix()
            if rel != RECORD_FILE:
                found.add(rel)
    ref = meta.drift_reference
    if ref and not ref.lstrip().startswith(("{", "[")):  # a file name, not inline statistics
        ref_path = (run / ref).resolve()
        if not ref_path.is_relative_to(run.resolve()):
            raise RegistryError(f"{run}: drift reference {ref!r} points outside the run folder")
        if not ref_path.is_file():
            raise RegistryError(f"{run}: model.json names drift reference {ref!r} but the file is missing")
        found.add(ref_path.relative_to(run.resolve()).as_posix())
    return sorted(found)


def _stamp_sidecar(path: Path, line: str, version: str) -> bytes:
    """The sidecar JSON with ``line``/``version`` set, other keys (even unknown ones) kept as they were."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["line"], data["version"] = line, version
    ModelMetadata.model_validate(data)
    return (json.dumps(data, indent=2) + "\n").encode()


# --------------------------------------------------------------------------- the registry


class Registry:
    """Versions, checksums, the champion pointer, promotion and rollback under one root folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ---- reading

    def lines(self) -> list[str]:
        """Lines that have at least a folder in the registry, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME_RE.fullmatch(p.name))

    def list_versions(self, line: str | None = None) -> list[ModelVersion]:
        """Registered versions of one line (or of all lines), in version order.

        Half-written or foreign folders are skipped with a warning so one bad folder does not hide
        the rest; :meth:`show` on such a folder raises the actual problem.
        """
        lines = [validate_name(line, "line")] if line is not None else self.lines()
        out: list[ModelVersion] = []
        for ln in lines:
            ldir = self.root / ln
            if not ldir.is_dir():
                continue
            champ = read_champion(self.root, ln)
            names = sorted((p.name for p in ldir.iterdir()
                            if p.is_dir() and _NAME_RE.fullmatch(p.name) and p.name not in _RESERVED_VERSIONS),
                           key=_version_sort_key)
            for name in names:
                try:
                    out.append(self._load_version_info(ln, name, champ))
                except RegistryError as e:
                    log.warning("skipping %s/%s: %s", ln, name, e)
        return out

    def show(self, line: str, version: str) -> ModelVersion:
        """One version's registry record and metrics; raises :class:`VersionNotFoundError` if absent."""
        return self._load_version_info(line, version, read_champion(self.root, validate_name(line, "line")))

    def champion(self, line: str) -> ModelVersion | None:
        """The line's champion, or None when nothing was promoted yet."""
        v = read_champion(self.root, line)
        return None if v is None else self.show(line, v)

    def history(self, line: str) -> list[HistoryEntry]:
        """Promotions and rollbacks of a line, oldest first (unparseable lines are skipped with a warning)."""
        p = line_dir(self.root, line) / HISTORY_FILE
        try:
            raw = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        out = []
        for i, text in enumerate(raw.splitlines(), 1):
            if not text.strip():
                continue
            try:
                out.append(HistoryEntry.model_validate_json(text))
            except ValidationError as e:
                log.warning("%s:%d: skipping unreadable history entry: %s", p, i, e.errors()[0]["msg"])
        return out

    def verify(self, line: str, version: str) -> ModelVersion:
        """Re-hash every registered file of a version; :class:`IntegrityError` names the first mismatch."""
        info = self.show(line, version)
        for rel, sha in sorted(info.files.items()):
            p = info.path / rel
            if not p.is_file():
                raise IntegrityError(f"{line}/{version}: registered file {rel} is missing")
            actual = _hash_file(p)
            if actual != sha:
                raise IntegrityError(f"{line}/{version}: {rel} sha256 {actual[:12]}… does not match the "
                                     f"registered {sha[:12]}… (modified after registration)")
        return info

    def _load_version_info(self, line: str, version: str, champion: str | None) -> ModelVersion:
        vdir = model_dir(self.root, line, version)
        record = _read_record(vdir)
        model_created = None
        try:
            meta = json.loads((vdir / "model.json").read_text(encoding="utf-8"))
            model_created = meta.get("created")
        except (OSError, ValueError) as e:
            raise IntegrityError(f"{line}/{version}: unreadable model.json: {e}") from e
        metrics_file = None
        mpath = vdir / METRICS_FILE
        if mpath.is_file():
            try:
                metrics_file = json.loads(mpath.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise IntegrityError(f"{line}/{version}: unreadable {METRICS_FILE}: {e}") from e
        metrics = headline_metrics(meta.get("metrics"), metrics_file)
        try:
            return ModelVersion(line=line, version=version, path=vdir, created=record["registered"],
                                model_created=model_created, onnx_sha256=record["onnx_sha256"],
                                files=record["files"], metrics=metrics, note=record.get("note"),
                                source=record.get("source"), user=record.get("user"),
                                champion=(version == champion))
        except (KeyError, ValidationError) as e:
            raise IntegrityError(f"{line}/{version}: malformed registry record: {e}") from e

    # ---- registering

    def register(self, line: str, run_dir: str | os.PathLike, *, version: str | None = None,
                 note: str | None = None) -> ModelVersion:
        """Copy a run's artefacts into a new version folder and return it.

        Refuses a model whose ONNX bytes do not match the sha256 in its sidecar (every ``*.onnx``
        in the run is checked). The copy is built in ``<line>/.tmp-<uuid>`` and published with one
        rename, so readers never see a partial version; version numbers (``v0001``…) are allocated
        under a short per-line lock, so concurrent registrations get distinct versions. It does not
        take the line lock, so a retrain may register while holding it.
        """
        validate_name(line, "line")
        if version is not None:
            validate_name(version, "version")
        run = Path(run_dir)
        if not run.is_dir():
            raise RegistryError(f"run folder {run} not found")
        onnx_path, side = run / MODEL_FILE, run / "model.json"
        for p in (onnx_path, side):
            if not p.is_file():
                raise RegistryError(f"{run}: missing {p.name}; expected an exported model artefact")
        try:
            meta = ModelMetadata.model_validate_json(side.read_text(encoding="utf-8"))
        except (ValidationError, ValueError) as e:
            raise RegistryError(f"{side}: invalid model metadata: {e}") from e
        files = _artefact_files(run, meta)
        onnx_files = [f for f in files if f.endswith(".onnx") and "/" not in f]

        ldir = self.root / line
        ldir.mkdir(parents=True, exist_ok=True)
        tmp = ldir / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            hashes = {rel: _copy_hashed(run / rel, tmp / rel) for rel in files}
            # Check the bytes we copied, not the source again: nothing can change between check and use.
            for rel in onnx_files:
                self._check_onnx_against_sidecar(run, tmp, rel, hashes[rel])
            with self._register_lock(ldir):
                version = version or self._next_version(ldir)
                final = ldir / version
                if final.exists():
                    raise VersionExistsError(f"version {line}/{version} already exists")
                for rel in onnx_files:  # sidecars learn where they live; the ONNX bytes stay untouched
                    side_rel = sidecar_path(rel).as_posix()
                    data = _stamp_sidecar(tmp / side_rel, line, version)
                    _write_durable(tmp / side_rel, data)
                    hashes[side_rel] = _sha256_bytes(data)
                record = {"schema": RECORD_SCHEMA, "line": line, "version": version,
                          "registered": _now().isoformat(), "source": str(run.resolve()), "note": note,
                          "user": _current_user(), "onnx_sha256": hashes[MODEL_FILE],
                          "files": dict(sorted(hashes.items()))}
                _write_durable(tmp / RECORD_FILE, (json.dumps(record, indent=2) + "\n").encode())
                for d in sorted({(tmp / f).parent for f in hashes}, key=lambda p: len(p.parts), reverse=True):
                    _fsync_dir(d)
                os.rename(tmp, final)
                _fsync_dir(ldir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("registered %s/%s from %s", line, version, run)
        return self.show(line, version)

    @staticmethod
    def _check_onnx_against_sidecar(run: Path, tmp: Path, rel: str, actual: str) -> None:
        side_rel = sidecar_path(rel).as_posix()
        if not (tmp / side_rel).is_file():
            raise IntegrityError(f"{run}: {rel} has no sidecar {side_rel}; its checksum cannot be verified")
        try:
            expected = json.loads((tmp / side_rel).read_text(encoding="utf-8")).get("onnx_sha256")
        except (OSError, ValueError, AttributeError) as e:
            raise IntegrityError(f"{run}: unreadable {side_rel}: {e}") from e
        if not expected:
            raise IntegrityError(f"{run}: {side_rel} records no onnx_sha256; cannot verify {rel}")
        if expected != actual:
            raise IntegrityError(f"{run}: {rel} sha256 {actual[:12]}… does not match {side_rel} "
                                 f"({expected[:12]}…): the model file was modified or replaced")

    @contextlib.contextmanager
    def _register_lock(self, ldir: Path) -> Iterator[None]:
        """Short lock around version allocation + publish (separate from the long-held line lock)."""
        fd = _flock(ldir / REGISTER_LOCK_FILE, None, f"registration on {ldir.name!r}")
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @staticmethod
    def _next_version(ldir: Path) -> str:
        nums = [int(m.group(1)) for p in ldir.iterdir() if (m := _AUTO_VERSION_RE.fullmatch(p.name))]
        return f"v{max(nums, default=0) + 1:04d}"

    # ---- champion

    def promote(self, line: str, version: str, reason: str = "", *, user: str | None = None,
                lock: LineLock | None = None, timeout: float | None = None) -> ModelVersion:
        """Make ``version`` the champion: verify its files, replace ``CHAMPION`` atomically, log history.

        Takes the line lock (waiting up to ``timeout``; None = forever) unless ``lock`` is a held lock
        of this line, e.g. from a retrain that registers then promotes. Promoting the current
        champion again changes nothing and logs nothing.
        """
        validate_name(line, "line")
        validate_name(version, "version")
        self.show(line, version)  # fail fast on unknown versions, before creating lock files
        with self._locked(line, lock, timeout):
            info = self.verify(line, version)
            current = read_champion(self.root, line)
            if current == version:
                log.info("%s/%s is already the champion", line, version)
                return info.model_copy(update={"champion": True})
            self._switch_champion(line, "promote", info, current, reason, user)
        log.info("promoted %s/%s (was %s): %s", line, version, current, reason)
        return info.model_copy(update={"champion": True})

    def rollback(self, line: str, reason: str = "", *, user: str | None = None,
                 lock: LineLock | None = None, timeout: float | None = None) -> ModelVersion:
        """Make the previous champion (per history) the champion again; repeated rollbacks walk further back.

        Raises :class:`NoChampionError` when there is no champion or no earlier one.
        """
        validate_name(line, "line")
        if read_champion(self.root, line) is None:
            raise NoChampionError(f"line {line!r} has no champion to roll back from")
        with self._locked(line, lock, timeout):
            current = read_champion(self.root, line)
            if current is None:
                raise NoChampionError(f"line {line!r} has no champion to roll back from")
            stack = self._champion_stack(line, current)
            if len(stack) < 2:
                raise NoChampionError(f"line {line!r}: no earlier champion than {current} to roll back to")
            target = stack[-2]
            try:
                info = self.verify(line, target)
            except VersionNotFoundError:
                raise RegistryError(f"line {line!r}: previous champion {target} is no longer in the registry") \
                    from None
            self._switch_champion(line, "rollback", info, current, reason, user)
        log.info("rolled %s back from %s to %s: %s", line, current, target, reason)
        return info.model_copy(update={"champion": True})

    def _switch_champion(self, line: str, action: str, info: ModelVersion, previous: str | None, reason: str,
                         user: str | None) -> None:
        """Point CHAMPION at ``info.version`` (atomically), then record why in the history."""
        self._set_champion(line, info.version)
        self._append_history(line, HistoryEntry(time=_now(), action=action, version=info.version, previous=previous,
                                                reason=reason, user=user or _current_user(),
                                                onnx_sha256=info.onnx_sha256))

    def _champion_stack(self, line: str, current: str) -> list[str]:
        """Champions in the order they took over, with rollbacks popped; the last is ``current``.

        ``CHAMPION`` is the truth: it is replaced before the history line is appended, so a crash
        in between leaves a champion that history lacks, which is pushed here.
        """
        stack: list[str] = []
        for e in self.history(line):
            if e.action == "rollback" and stack and stack[-1] == e.previous:
                stack.pop()
            elif e.previous and (not stack or stack[-1] != e.previous):
                stack.append(e.previous)  # the pointer changed outside the registry's history
            if not stack or stack[-1] != e.version:
                stack.append(e.version)
        if not stack or stack[-1] != current:
            stack.append(current)
        return stack

    @contextlib.contextmanager
    def _locked(self, line: str, lock: LineLock | None, timeout: float | None) -> Iterator[None]:
        if lock is not None:
            if not lock.covers(self.root, line):
                raise RegistryError(f"the lock given ({lock!r}) is not a held lock of line {line!r} in {self.root}")
            yield
            return
        with line_lock(self.root, line, timeout=timeout):
            yield

    def _set_champion(self, line: str, version: str) -> None:
        """Write-temp, fsync, rename, fsync dir: CHAMPION is always the old or the new version, whole."""
        ldir = self.root / line
        tmp = ldir / f".{CHAMPION_FILE}.tmp-{uuid.uuid4().hex}"
        try:
            _write_durable(tmp, f"{version}\n".encode())
            os.replace(tmp, ldir / CHAMPION_FILE)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(ldir)
        for stale in ldir.glob(f".{CHAMPION_FILE}.tmp-*"):  # from a switch killed before its rename; we hold
            with contextlib.suppress(OSError):           # the line lock, so no other switch is under way
                stale.unlink()

    def _append_history(self, line: str, entry: HistoryEntry) -> None:
        p = self.root / line / HISTORY_FILE
        data = (entry.model_dump_json() + "\n").encode()
        fd = os.open(p, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # a torn last line from a crash must not swallow this entry
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---- loading

    def load_version(self, line: str, version: str, *, int8: bool = False,
                     options: RuntimeOptions | None = None) -> OnnxModel:
        """An :class:`~pipeline.runtime.OnnxModel` of a version, refused unless its bytes are the registered ones.

        The runtime checks the file against its sidecar; this also checks it against the registry
        record, so a model replaced on disk together with its sidecar is refused too.
        """
        from pipeline.runtime import ModelIntegrityError, OnnxModel

        info = self.show(line, version)
        name = INT8_MODEL_FILE if int8 else MODEL_FILE
        expected = info.files.get(name)
        if expected is None:
            raise VersionNotFoundError(f"{line}/{version} has no {name}")
        path = info.path / name
        if not path.is_file():
            raise IntegrityError(f"{line}/{version}: registered file {name} is missing")
        if _hash_file(path) != expected:  # before handing unknown bytes to ONNX Runtime
            raise IntegrityError(f"{line}/{version}: {name} does not match the sha256 recorded at registration "
                                 f"({expected[:12]}…): it was replaced or modified on disk")
        try:
            model = OnnxModel(path, options=options)
        except ModelIntegrityError as e:
            raise IntegrityError(f"{line}/{version}: {e}") from e
        if model.sha256 != expected:  # the bytes actually loaded (closes the check-then-load window)
            raise IntegrityError(f"{line}/{version}: {name} changed while loading; refusing it")
        return model

    def load_champion(self, line: str, *, int8: bool = False, options: RuntimeOptions | None = None) -> OnnxModel:
        """The line's champion model, integrity-checked; :class:`NoChampionError` when there is none."""
        version = read_champion(self.root, line)
        if version is None:
            raise NoChampionError(f"line {line!r} has no champion in {self.root}")
        return self.load_version(line, version, int8=int8, options=options)
