"""The model being served and its hot-swap.

A watcher thread polls the model file (or the registry's ``CHAMPION`` for the line). When what it
sees changes and then stays the same for one more poll (so a sidecar + ONNX pair written one after
the other is read as a pair), it loads the new model in the background: ONNX Runtime session,
sha256 check against the metadata (``OnnxModel``), a smoke inference with shape and value checks.
Only a model that passes becomes *pending*; the batching thread swaps it in between two batches, so
every batch is scored by exactly one model and every row names the version that scored it.
A model that fails is refused: logged, counted in ``defect_model_refusals_total{reason}``, and not
retried until the files change again; the old model keeps serving.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.metadata import ModelMetadata, load_metadata, precision_path, sidecar_path
from pipeline.preprocess import PreprocessSpec
from pipeline.runtime import ModelIntegrityError, OnnxModel, RuntimeOptions, candidate_providers

if TYPE_CHECKING:
    from pipeline.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


class ModelRefused(RuntimeError):
    """A model that must not serve; ``reason`` is a short label for metrics."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _stat_sig(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _variant_mismatch(fp32: Path, variant: Path) -> str | None:
    """Why ``variant`` is not a precision variant of ``fp32`` (None when it is)."""
    try:
        made_from = json.loads(sidecar_path(variant).read_text(encoding="utf-8"))["extra"]["fp32_onnx_sha256"]
        fp32_sha = json.loads(sidecar_path(fp32).read_text(encoding="utf-8"))["onnx_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"cannot be matched to {fp32.name} ({type(exc).__name__}: {exc})"
    if made_from != fp32_sha:
        return f"was exported from another model (fp32 sha256 {str(made_from)[:12]}…, not {str(fp32_sha)[:12]}…)"
    return None


@dataclass(frozen=True)
class ModelLocator:
    """Where the served model lives: one ONNX file, or the champion of a line in a registry.

    ``precision`` other than fp32 picks the variant beside that model (``model.int8.onnx``, ...); where it
    is absent the fp32 model is served and a warning logged once per model, so a new champion exported
    without INT8 keeps the line running rather than stopping it.
    """

    target: Path
    line: str | None = None
    precision: str = "fp32"
    _warned: set = field(default_factory=set, compare=False, repr=False)

    @property
    def registry_mode(self) -> bool:
        return self.target.is_dir()

    def with_precision(self, path: Path) -> Path:
        """The file to serve for the model at ``path``: its precision variant when it exists and was made
        from this very model (its sidecar names the fp32 sha256), else ``path``."""
        variant = precision_path(path, self.precision)
        if variant == path:
            return path
        problem = "does not exist" if not variant.is_file() else _variant_mismatch(path, variant)
        if problem is None:
            return variant
        if (path, problem) not in self._warned:
            self._warned.add((path, problem))
            log.warning("precision %s asked for but %s %s (run `defect export --%s` before registering); "
                        "serving the fp32 model %s", self.precision, variant.name, problem, self.precision, path,
                        extra={"event": "precision_fallback"})
        return path

    def resolve(self) -> tuple[Path, Any]:
        """The ONNX path to load now and a fingerprint that changes whenever it (or the pointer) does."""
        if not self.registry_mode:
            path = self.with_precision(self.target)
            return path, (None, _stat_sig(path), _stat_sig(sidecar_path(path)))
        from pipeline.registry import model_dir, read_champion

        if not self.line:
            raise ModelRefused("config", f"{self.target} is a registry folder: --line is required")
        try:
            version = read_champion(self.target, self.line)
            if version is None:
                raise ModelRefused("missing", f"line {self.line!r} in registry {self.target} has no champion")
            path = self.with_precision(model_dir(self.target, self.line, version) / "model.onnx")
        except ModelRefused:
            raise
        except Exception as exc:  # unreadable pointer, invalid version name...
            raise ModelRefused("registry", f"cannot resolve the champion of {self.line!r}: {exc}") from exc
        return path, (version, _stat_sig(path), _stat_sig(sidecar_path(path)))

    def registered_sha256(self, path: Path, fingerprint: Any) -> str | None:
        """Registry mode: the sha256 the registry recorded for ``path`` when the version was registered.

        A model must match it, not just its own sidecar: whoever can replace ``model.onnx`` can replace
        ``model.json`` beside it, but ``registry.json`` is only written by the registry. None for a
        plain model file (its sidecar is all there is).
        """
        if not self.registry_mode:
            return None
        from pipeline.registry import registered_sha256

        version = fingerprint[0]
        try:
            return registered_sha256(self.target, self.line, version, path.name)
        except Exception as exc:  # no record: not a registered version (copied in by hand, half-written)
            raise ModelRefused("integrity", f"{self.line}/{version}: no registry checksum for {path.name}: {exc}"
                               ) from exc

    def describe(self) -> str:
        return f"registry {self.target} line {self.line}" if self.registry_mode else str(self.target)


@dataclass(frozen=True)
class LoadedModel:
    """A verified model ready to score, plus what results must say about it."""

    model: OnnxModel
    version: str
    path: Path
    fingerprint: Any
    loaded_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def sha256(self) -> str:
        return self.model.sha256

    @property
    def metadata(self) -> ModelMetadata:
        return self.model.metadata

    @property
    def spec(self) -> PreprocessSpec:
        return self.model.metadata.preprocess

    @property
    def provider(self) -> str:
        return self.model.provider

    def describe(self) -> dict[str, Any]:
        md = self.metadata
        return {"version": self.version, "sha256": self.sha256, "path": str(self.path), "provider": self.provider,
                "classes": md.classes, "good_class": md.good_class, "threshold": md.threshold,
                "backbone": md.backbone, "line": md.line, "precision": md.extra.get("precision", "fp32"),
                "loaded_at": self.loaded_at.isoformat()}


def model_version(meta: ModelMetadata, sha256: str) -> str:
    """What results record: the metadata's version, else the first 12 hex digits of the ONNX sha256."""
    return meta.version or sha256[:12]


def smoke_test(model: OnnxModel) -> None:
    """Run two grey images through the model; raise ModelRefused unless outputs look like a classifier's."""
    spec, md = model.metadata.preprocess, model.metadata
    grey = np.full((spec.height, spec.width, 3), 128, np.uint8)
    try:
        probs, emb = model.run(model.preprocess([grey, grey]))
    except Exception as exc:
        raise ModelRefused("smoke", f"smoke inference failed: {exc}") from exc
    n = len(md.classes)
    if probs.shape != (2, n):
        raise ModelRefused("smoke", f"probs shape {probs.shape}, expected (2, {n}) for classes {md.classes}")
    if emb.ndim != 2 or emb.shape[0] != 2 or (md.embedding_dim and emb.shape[1] != md.embedding_dim):
        raise ModelRefused("smoke", f"embedding shape {emb.shape}, metadata says dim {md.embedding_dim}")
    if not (np.isfinite(probs).all() and np.isfinite(emb).all()):
        raise ModelRefused("smoke", "non-finite outputs on a plain grey image")
    if probs.min() < -1e-4 or probs.max() > 1 + 1e-4 or np.abs(probs.sum(axis=1) - 1).max() > 1e-2:
        raise ModelRefused("smoke", "outputs are not probabilities (outside 0..1 or rows not summing to 1)")


# On CPU, ONNX Runtime's peak activation memory grows linearly with the batch (EfficientNet-Lite0 at
# 224 px: ~210 MB at 4 images, ~540 MB at 16) while throughput barely changes past 4 images. With
# several inference streams the images in flight at once are shared out between them (2 streams x 2
# images: the same peak as 1 x 4, and the fastest on 2 cores: BENCHMARKS.md daemon-e2e).
CPU_INFER_BATCH = 4


def infer_chunk(on_cpu: bool, infer_batch: int, max_batch: int, streams: int = 1) -> int:
    """Images per ONNX Runtime call: ``infer_batch`` when set; else on CPU the in-flight budget
    (CPU_INFER_BATCH) shared between the streams; on a GPU provider the whole micro-batch."""
    if infer_batch:
        return infer_batch
    return min(max(1, CPU_INFER_BATCH // max(1, streams)), max_batch) if on_cpu else max_batch


def tune_batch(model: OnnxModel, infer_batch: int, max_batch: int, streams: int = 1) -> None:
    """Set how many images one ONNX Runtime call gets (``OnnxModel.run`` chunks by ``options.max_batch``)."""
    chunk = infer_chunk(model.provider == "CPUExecutionProvider", infer_batch, max_batch, streams)
    model.options = model.options.model_copy(update={"max_batch": chunk})


def load_verified(path: Path, options: RuntimeOptions, require_checksum: bool, fingerprint: Any = None,
                  infer_batch: int = 0, line: str | None = None, registered_sha256: str | None = None,
                  streams: int = 1) -> LoadedModel:
    """Load, verify integrity, smoke-test. Raises ModelRefused(reason) for anything unfit to serve.

    ``line``: when given and the metadata names a line, they must agree (a model trained for another
    line is refused rather than silently scoring the wrong product). ``registered_sha256``: what the
    registry recorded for this file; the sidecar must agree before ONNX Runtime sees a byte, and the
    bytes loaded must match it.
    """
    if not path.is_file():
        raise ModelRefused("missing", f"model file not found: {path}")
    try:
        meta = load_metadata(path)
    except Exception as exc:
        raise ModelRefused("metadata", f"{path}: unreadable metadata: {exc}") from exc
    if line and meta.line and meta.line != line:
        raise ModelRefused("line", f"{path}: model is for line {meta.line!r}, this daemon serves {line!r}")
    if require_checksum and not meta.onnx_sha256:
        raise ModelRefused("integrity", f"{path}: metadata has no onnx_sha256 (require_checksum is on)")
    if registered_sha256 is not None and meta.onnx_sha256 != registered_sha256:
        raise ModelRefused("integrity", f"{path}: sidecar sha256 {str(meta.onnx_sha256)[:12]}… is not the "
                                        f"{registered_sha256[:12]}… the registry recorded: replaced after registration")
    if registered_sha256 is not None and not options.verify_sha256:
        options = options.model_copy(update={"verify_sha256": True})
    try:
        model = OnnxModel(path, meta, options)
    except ModelIntegrityError as exc:
        raise ModelRefused("integrity", str(exc)) from exc
    except Exception as exc:
        raise ModelRefused("load", f"{path}: ONNX Runtime cannot load it: {exc}") from exc
    if registered_sha256 is not None and model.sha256 != registered_sha256:  # the bytes actually loaded
        raise ModelRefused("integrity", f"{path}: changed while loading (sha256 {model.sha256[:12]}…); refused")
    tune_batch(model, infer_batch, options.max_batch, streams)
    smoke_test(model)
    return LoadedModel(model=model, version=model_version(meta, model.sha256), path=path, fingerprint=fingerprint)


class ModelHolder:
    """Holds the serving model; a watcher thread prepares verified replacements for a swap between batches."""

    def __init__(self, locator: ModelLocator, options: RuntimeOptions, metrics: "ServeMetrics",
                 poll_interval_s: float = 2.0, require_checksum: bool = True, infer_batch: int = 0,
                 streams: int = 1):
        self.locator = locator
        self.infer_batch = infer_batch
        self.streams = streams
        self.options = options
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self.require_checksum = require_checksum
        path, fp = locator.resolve()
        self.current: LoadedModel = load_verified(path, options, require_checksum, fp, infer_batch, locator.line,
                                                  locator.registered_sha256(path, fp), streams)
        metrics.set_model(self.current.version, self.current.sha256, self.current.provider)
        self._pending: LoadedModel | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: Any = fp  # last fingerprint observed (for the settle check)
        self._refused: Any = None  # fingerprint of the last refused model: not retried until it changes
        self.last_refusal: dict[str, str] | None = None
        self.swaps = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="model-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll()
            except Exception:  # the watcher must survive anything; the old model keeps serving
                log.exception("model watcher error")

    def _known(self) -> Any:
        with self._lock:
            return (self._pending or self.current).fingerprint

    def poll(self) -> None:
        """One watcher step: notice a change, wait for it to settle, then verify and stage it."""
        try:
            path, fp = self.locator.resolve()
        except ModelRefused as exc:
            fp = ("unresolvable", str(exc))
            if fp != self._refused and fp == self._seen:
                self._refuse(fp, exc.reason, str(exc))
            self._seen = fp
            return
        if fp == self._known() or fp == self._refused:
            self._seen = fp
            return
        if fp != self._seen:  # changed since the last poll: let it settle one more poll
            self._seen = fp
            return
        log.info("model change detected, loading %s", path)
        try:
            candidate = load_verified(path, self.options, self.require_checksum, fp, self.infer_batch,
                                      self.locator.line, self.locator.registered_sha256(path, fp), self.streams)
        except ModelRefused as exc:
            self._refuse(fp, exc.reason, str(exc))
            return
        with self._lock:
            cur = self.current
            if candidate.sha256 == cur.sha256 and candidate.version == cur.version:
                # The serving model again (touched, re-copied, or a pending change reverted): keep it.
                self.current = LoadedModel(cur.model, cur.version, cur.path, fp, cur.loaded_at)
                self._pending = None
                return
            self._pending = candidate
        log.info("model %s verified (sha256 %s, provider %s); swapping in between batches",
                 candidate.version, candidate.sha256[:12], candidate.provider,
                 extra={"event": "model_verified", "version": candidate.version})

    def _refuse(self, fp: Any, reason: str, message: str) -> None:
        self._refused = fp
        self.metrics.refusals.labels(reason).inc()
        self.last_refusal = {"reason": reason, "message": message,
                             "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        log.error("new model refused (%s): %s; still serving %s", reason, message, self.current.version,
                  extra={"event": "model_refused", "reason": reason})

    def take_pending(self) -> LoadedModel:
        """Called by the batching thread between batches: swap if a verified model waits; return the one to use."""
        with self._lock:
            if self._pending is None:
                return self.current
            old, self.current, self._pending = self.current, self._pending, None
            self.swaps += 1
        self.metrics.swaps.inc()
        self.metrics.set_model(self.current.version, self.current.sha256, self.current.provider)
        log.info("model swapped %s -> %s", old.version, self.current.version,
                 extra={"event": "model_swapped", "old": old.version, "new": self.current.version})
        return self.current


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's or systemd's CPUAffinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class StreamPlan:
    """How the daemon runs ONNX Runtime: ``streams`` calls at once, each on ``intra_op_threads`` threads."""

    streams: int
    intra_op_threads: int  # 0: ONNX Runtime's default


def plan_streams(streams: int, intra_op_threads: int, providers: list[str] | None,
                 cores: int | None = None, queued_sources: bool = True) -> StreamPlan:
    """Resolve the ``inference_streams`` / ``intra_op_threads`` settings (0 = auto) for this host.

    On a CPU, one call spread over every core spends part of each layer waiting for its slowest thread,
    and on a small host the decode workers preempt exactly those threads. Two calls at once on half the
    cores each keep every core busy instead (measured on 2 cores: see BENCHMARKS.md ``daemon-e2e``).
    That pays where images queue up (a hot folder, a camera: ``queued_sources``). Request/response
    clients each wait for their answer, and there one call on every core answers sooner (measured:
    15-20 % more requests per second with 8-16 clients), so auto keeps one stream for an HTTP-only
    daemon. A GPU provider runs one call at a time (it batches internally); auto picks it whenever
    this ONNX Runtime build offers one.
    """
    cores = cores or usable_cores()
    on_cpu = candidate_providers(providers)[0] == "CPUExecutionProvider"
    n = streams or (2 if on_cpu and cores >= 2 and queued_sources else 1)
    threads = intra_op_threads or (max(1, cores // n) if on_cpu and n > 1 else 0)
    return StreamPlan(streams=n, intra_op_threads=threads)


def runtime_options(providers: list[str] | None, intra_op_threads: int, max_batch: int) -> RuntimeOptions:
    """The daemon's ONNX Runtime options. Spinning is off: ORT's idle intra-op threads otherwise busy-wait
    between batches and take the cores the decode workers need (measured on 2 cores, 640x480 JPEG:
    daemon CPU per image 1.53x the bare model's with spinning, 0.93-1.08x without)."""
    return RuntimeOptions(providers=providers, intra_op_threads=intra_op_threads, max_batch=max(max_batch, 1),
                          allow_spinning=False)


def resolve_model_arg(model: str | os.PathLike, line: str | None, precision: str = "fp32") -> ModelLocator:
    """Validate the ``--model`` argument early with a clear message."""
    target = Path(model)
    if not target.exists():
        raise FileNotFoundError(f"model not found: {target}")
    if target.is_dir() and not line:
        raise ValueError(f"{target} is a folder, i.e. a model registry: give --line to serve its champion")
    if target.is_file() and target.suffix != ".onnx":
        raise ValueError(f"{target}: expected an .onnx file or a registry folder")
    return ModelLocator(target=target, line=line, precision=precision)
