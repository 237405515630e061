"""HTTP API (FastAPI on uvicorn, in a background thread of the daemon).

``POST /predict``  raw image bytes as the body, or multipart with one file -> the committed result
                   (200; 422 when the image is unusable, the error row is still recorded;
                   413 over ``max_upload_bytes``; 503 when the queue stays full for 5 s or the
                   daemon stops).
``GET /health``    model version/sha/provider, queue depth, uptime, source states.
``GET /metrics``   Prometheus text.
``GET /results``   ``?since=ISO8601&limit=N``: stored rows in time order (latest N without ``since``).

Binds 127.0.0.1 unless told otherwise: there is no authentication, put a reverse proxy in front to
expose it.
"""

from __future__ import annotations

import time

import asyncio
import json
import logging
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from pipeline.serve.jobs import Job

if TYPE_CHECKING:
    from pipeline.serve.daemon import Daemon

log = logging.getLogger(__name__)


class PayloadTooLarge(Exception):
    pass


async def read_body_limited(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it exceeds ``limit`` bytes, declared or streamed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


async def image_from_request(request: Request, body: bytes) -> tuple[bytes, str | None]:
    """(image bytes, client file name) from a raw body or a multipart form with one file."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        return body, None

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, receive=replay).form(max_files=1, max_fields=16)
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise HTTPException(400, "multipart request without a file part")
        return await files[0].read(), files[0].filename
    finally:
        await form.close()


def _safe_name(name: str | None) -> str | None:
    if not name:
        return None
    cleaned = "".join(c for c in name.replace("\\", "/").rsplit("/", 1)[-1] if c.isprintable())[:200]
    return cleaned or None


async def _submit_waiting(daemon: "Daemon", job: Job, patience_s: float) -> bool:
    """Ride out a short burst (queue full for a moment) without blocking the event loop."""
    deadline = asyncio.get_running_loop().time() + patience_s
    while not daemon.submit(job, timeout=0):
        if daemon.stopping or asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def create_app(daemon: "Daemon") -> FastAPI:
    """The API bound to one daemon (no module-level state)."""
    app = FastAPI(title="defect-pipeline inference daemon", docs_url=None, redoc_url=None, openapi_url=None)
    settings = daemon.settings

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        try:
            body = await read_body_limited(request, settings.max_upload_bytes)
        except PayloadTooLarge:
            daemon.metrics.rejected.labels("too_large").inc()
            return JSONResponse({"detail": f"upload larger than {settings.max_upload_bytes} bytes"}, 413)
        data, filename = await image_from_request(request, body)
        name = _safe_name(filename)
        future: Future = Future()
        job = Job(source=f"http:{name}" if name else "http", kind="http", data=data, future=future)
        if not await _submit_waiting(daemon, job, min(settings.request_timeout_s, 5.0)):
            daemon.metrics.rejected.labels("busy").inc()
            reason = "daemon is shutting down" if daemon.stopping else "queue full"
            return JSONResponse({"detail": reason}, 503, headers={"Retry-After": "1"})
        try:
            row = await asyncio.wait_for(asyncio.wrap_future(future), timeout=settings.request_timeout_s)
        except asyncio.TimeoutError:
            return JSONResponse({"detail": "timed out waiting for the result"}, 504)
        except RuntimeError as exc:
            return JSONResponse({"detail": str(exc)}, 503)
        return JSONResponse(row.as_dict(), 200 if row.ok else 422)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return daemon.health()

    @app.post("/adapt", status_code=202)
    async def adapt(request: Request) -> dict[str, Any]:
        """Start `defect adapt` for this daemon's line in a separate process (the daemon never trains).

        The token is checked before a byte of the body is read, and the body is small and bounded:
        an unauthenticated client cannot make the daemon buffer anything.
        """
        authorization = request.headers.get("authorization", "")
        check_adapt_token(settings, authorization)
        try:
            raw = await read_body_limited(request, ADAPT_MAX_BODY_BYTES)
        except PayloadTooLarge:
            raise HTTPException(413, f"POST /adapt bodies are at most {ADAPT_MAX_BODY_BYTES} bytes") from None
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise HTTPException(422, "the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise HTTPException(422, "the body must be a JSON object")
        return await run_in_threadpool(start_adapt, settings, authorization, body)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(daemon.metrics.render(), media_type=daemon.metrics.content_type)

    @app.get("/results")
    def results(since: str | None = None, limit: int = Query(100, ge=0, le=10_000)) -> list[dict[str, Any]]:
        try:
            rows = daemon.store.query(since=since, limit=limit)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        return [r.as_dict() for r in rows]

    return app


ADAPT_MAX_BODY_BYTES = 64 * 1024


def check_adapt_token(settings: Any, authorization: str) -> None:
    """404 when POST /adapt is off (no ``adapt_token``), 401 unless the bearer token matches (constant time)."""
    import hmac

    if not settings.adapt_token:
        raise HTTPException(404, "POST /adapt is disabled (set adapt_token to enable it)")
    expected = f"Bearer {settings.adapt_token}"
    if not hmac.compare_digest(authorization.encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong bearer token")


def start_adapt(settings: Any, authorization: str, body: dict[str, Any]) -> dict[str, Any]:
    """Check token and parameters, then launch the gated retrain; returns what was started.

    Off (404) without ``adapt_token``; 401 on a wrong token (constant-time compare); the data folder must
    resolve inside ``adapt_data_root`` (no traversal, no absolute paths elsewhere); needs a registry model.
    """
    import subprocess
    import sys
    from pathlib import Path

    check_adapt_token(settings, authorization)
    if not settings.registry_mode or not settings.line:
        raise HTTPException(409, "this daemon serves a model file, not a registry line: nothing to re-adapt")
    if not settings.adapt_data_root:
        raise HTTPException(409, "adapt_data_root is not configured")
    data = body.get("data")
    if not isinstance(data, str) or not data:
        raise HTTPException(422, "'data' (a folder under adapt_data_root) is required")
    root = Path(settings.adapt_data_root).resolve()
    folder = (root / data).resolve()
    if not folder.is_relative_to(root) or not folder.is_dir():
        raise HTTPException(422, f"'data' must name an existing folder under {root}")
    shots = body.get("shots")
    if shots is not None and (not isinstance(shots, int) or isinstance(shots, bool) or shots < 1):
        raise HTTPException(422, "'shots' must be a positive integer")
    reason = str(body.get("reason") or "operator request over HTTP")[:500]
    cmd = [sys.executable, "-m", "pipeline.cli", "adapt", "--line", settings.line, "--data", str(folder),
           "--registry", str(Path(settings.model).resolve()), "--reason", reason, "--json"]
    if shots:
        cmd += ["--shots", str(shots)]
    log_path = Path(settings.db).resolve().parent / f"adapt-{settings.line}-{int(time.time())}.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return {"started": True, "pid": proc.pid, "line": settings.line, "data": str(folder), "log": str(log_path)}


class HttpServer:
    """uvicorn in a background thread; the main thread keeps the signals."""

    def __init__(self, daemon: "Daemon", host: str, port: int):
        self.host, self.port = host, port
        s = daemon.settings
        config = uvicorn.Config(create_app(daemon), host=host, port=port, log_config=None, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=int(s.drain_timeout_s) + 5,
                                server_header=False)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> None:
        """Start serving; raise if the address cannot be bound."""
        self._thread = threading.Thread(target=self._serve, name="http", daemon=True)
        self._thread.start()
        waited = 0.0
        while not self.server.started:
            if not self._thread.is_alive() or waited > timeout:
                raise RuntimeError(f"HTTP server could not start on {self.host}:{self.port} (address in use?)")
            self._thread.join(0.05)
            waited += 0.05
        if self.port == 0:
            sock = self.server.servers[0].sockets[0]
            self.port = sock.getsockname()[1]
        log.info("HTTP API on http://%s:%d", self.host, self.port, extra={"event": "http_started"})

    def _serve(self) -> None:
        try:
            self.server.run()
        except SystemExit:  # uvicorn exits on bind errors; report through `alive`
            pass
        except Exception:
            log.exception("HTTP server crashed")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def begin_shutdown(self) -> None:
        """Stop accepting connections; requests in flight still get their answers."""
        self.server.should_exit = True

    def join(self, timeout: float = 60.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
