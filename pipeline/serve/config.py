"""Daemon settings: one pydantic-settings model fed by CLI flags > ``DEFECT_*`` env > YAML file > defaults.

Flat on purpose: every field maps to one env var (``DEFECT_MAX_BATCH=32``) and one YAML key
(``max_batch: 32``), so a systemd unit, a container and a config file all read the same way.
See ``deploy/serve.example.yaml`` for every key with its default and why.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

DEFAULT_HTTP_PORT = 8765


class ServeSettings(BaseSettings):
    """Everything the inference daemon needs to run on a line."""

    model_config = SettingsConfigDict(env_prefix="DEFECT_", extra="forbid", yaml_file=None,
                                      protected_namespaces=())

    # What to serve and where results go.
    model: str = Field(description="an .onnx file (with its model.json sidecar) or a registry root folder")
    line: str | None = Field(None, description="production line; required when `model` is a registry folder")
    db: Path = Field(description="SQLite results database (created if missing)")
    db_busy_timeout_s: float = Field(30.0, gt=0.0, description="a commit waits this long for a lock held by "
                                     "another process (a reader's exclusive lock), then is retried with backoff")

    # Sources (at least one).
    watch: Path | None = Field(None, description="hot folder to pick up images from")
    http: str | None = Field(None, description="HOST:PORT (or just PORT, bound on 127.0.0.1) for the HTTP API")
    camera: str | None = Field(None, description="cv2.VideoCapture source: device index, RTSP/HTTP URL, video file")
    camera_fps: float = Field(2.0, ge=0.0, description="frames sampled per second; 0 = every frame")
    camera_reconnect_min_s: float = Field(0.5, gt=0.0)
    camera_reconnect_max_s: float = Field(30.0, gt=0.0)
    camera_max_failures: int = Field(0, ge=0, description="give a live stream up after this many failed "
                                                         "reconnects in a row; 0 = retry forever")

    # Batching and capacity.
    max_batch: int = Field(16, ge=1, le=1024)
    infer_batch: int = Field(0, ge=0, le=1024, description="images per ONNX Runtime call (a micro-batch is run "
                             "in chunks of this); 0 = auto: 4 on CPU, max_batch on a GPU provider")
    max_wait_ms: float = Field(20.0, ge=0.0, description="latency bound: a batch waits at most this long to fill")
    workers: int = Field(2, ge=1, le=64, description="decode + preprocess threads")
    inference_streams: int = Field(0, ge=0, le=64, description="ONNX Runtime calls run at once, each on its own "
                                   "micro-batch; 0 = auto: 2 when the model runs on the CPU of a host with >= 2 "
                                   "cores and a hot folder or camera feeds the daemon, else 1 (see deploy/SERVING.md)")
    max_queue: int = Field(32, ge=1, description="images accepted but not yet committed (backpressure)")

    # Operator-triggered re-adaptation over HTTP: POST /adapt. Off unless a token is set.
    adapt_token: str | None = Field(None, description="bearer token that enables POST /adapt (off when unset)")
    adapt_data_root: str | None = Field(None, description="POST /adapt may only name labelled folders under this root")

    # Input limits.
    max_upload_bytes: int = Field(32 * 1024 * 1024, ge=1, description="HTTP body limit -> 413")
    max_file_bytes: int = Field(256 * 1024 * 1024, ge=1)
    max_pixels: int = Field(50_000_000, ge=1)
    max_inflight_mb: float = Field(512.0, gt=0.0, description="hot-folder file bytes held in memory at once "
                                   "(each image keeps its bytes until committed); readers wait beyond it")

    # Hot folder.
    poll_interval_s: float = Field(0.2, gt=0.0, description="folder scan period; a file must keep its size "
                                                           "and mtime across two scans to be picked up")

    # Model.
    model_poll_interval_s: float = Field(2.0, gt=0.0, description="how often the model file / CHAMPION is checked")
    require_checksum: bool = Field(True, description="refuse models whose metadata carries no onnx_sha256")
    precision: Literal["fp32", "int8", "fp16"] = Field(
        "fp32", description="serve model.int8.onnx / model.fp16.onnx (written by `defect export --int8/--fp16`) "
        "beside the model file or in the champion's version folder; when that file is absent, fp32 is served "
        "and a warning logged")
    providers: list[str] | None = None
    intra_op_threads: int = Field(0, ge=0)
    opencv_threads: int = Field(1, ge=0, description="OpenCV's own thread pool; 1 because decode threads "
                                                    "already run in parallel")

    # Drift monitoring (pipeline.serve.drift) and the recent-image sample re-adaptation learns from.
    drift: bool = Field(True, description="monitor drift against the model's reference (models without "
                                          "one are served unmonitored, with a warning)")
    emit_prefect_events: bool = Field(False, description="send defect.drift.detected to Prefect "
                                      "(PREFECT_API_URL) when an alarm episode starts")
    drift_log_interval_s: float = Field(60.0, ge=0.0, description="write the drift scores to drift_events at "
                                         "most this often, s (0: every window)")
    drift_event_min_interval_s: float = Field(1800.0, ge=0.0, description="at most one drift event per this "
                                              "many seconds, whatever the episodes (a flapping stream must not "
                                              "start many re-adaptations)")
    recent_dir: Path | None = Field(None, description="keep a bounded sample of recent scored images here")
    recent_every: int = Field(10, ge=1, description="keep 1 of every N scored images")
    recent_max_images: int = Field(500, ge=1)
    recent_max_age_days: float = Field(14.0, gt=0.0)
    recent_max_mb: float = Field(1024.0, gt=0.0, description="disk budget of the sample")

    # Lifecycle.
    request_timeout_s: float = Field(30.0, gt=0.0)
    drain_timeout_s: float = Field(30.0, ge=0.0, description="on SIGTERM, how long to finish accepted images")
    exit_when_done: bool = Field(False, description="exit 0 once the video file has ended and/or the hot "
                                                    "folder is empty (batch mode); not with http")
    observers: list[str] = Field(default_factory=list, description="'module:factory' names; factory(settings) "
                                                                   "returns a BatchObserver")
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("yaml_file"):
            sources.append(YamlConfigSettingsSource(settings_cls))
        return tuple(sources)

    @field_validator("http")
    @classmethod
    def _http_form(cls, v: str | None) -> str | None:
        if v is not None:
            parse_host_port(v)
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ServeSettings":
        if not (self.watch or self.http or self.camera is not None):
            raise ValueError("no image source: give at least one of watch, http, camera")
        if self.exit_when_done and self.http:
            raise ValueError("exit_when_done needs finite sources (watch, camera file); the HTTP API never ends")
        if self.camera_reconnect_max_s < self.camera_reconnect_min_s:
            raise ValueError("camera_reconnect_max_s must be >= camera_reconnect_min_s")
        return self

    @property
    def http_address(self) -> tuple[str, int] | None:
        return parse_host_port(self.http) if self.http else None

    @property
    def registry_mode(self) -> bool:
        """A folder as `model` means a registry root whose champion for `line` is served."""
        return Path(self.model).is_dir()


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``PORT`` (-> 127.0.0.1: loopback unless asked otherwise)."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"bad HTTP address {text!r}: expected HOST:PORT") from None
    if not 0 <= p <= 65535:
        raise ValueError(f"bad port {p}")
    return host, p


def load_settings(config_file: str | os.PathLike | None = None, **overrides: Any) -> ServeSettings:
    """Settings from (highest first) ``overrides`` (CLI flags), ``DEFECT_*`` env, the YAML file, defaults.

    ``None`` overrides are dropped so an unset CLI flag never hides the env or the file.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if config_file is None:
        return ServeSettings(**given)
    path = Path(config_file)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")

    class _FromYaml(ServeSettings):
        model_config = SettingsConfigDict(yaml_file=path)

    loaded = _FromYaml(**given)
    return ServeSettings.model_construct(**loaded.model_dump())
