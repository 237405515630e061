"""End-to-end daemon throughput vs the bare model, and the daemon's peak memory.

    python bench/bench_daemon.py --model models/line1/v3/model.onnx [--images 400] [--size 640x480]
                                 [--http-clients 8] [--append BENCHMARKS.md]

* bare model: ``OnnxModel.run`` on already preprocessed batches of ``--batch`` (what ONNX Runtime
  alone can do on this host);
* hot folder: the real daemon (``python -m pipeline.serve``) in a subprocess; ``--images`` encoded
  files are renamed into its folder at once, timed until every row is committed and every file moved
  (includes reading, sha256, decode, resize, the SQLite commit with fsync and the move);
* HTTP (optional): ``--http-clients`` concurrent clients POSTing the same files;
* memory: VmHWM (peak) and VmRSS of the daemon from ``/proc/<pid>/status`` after the runs;
* CPU ms per image (bare model process vs daemon process, from ``/proc``): the pipeline's overhead
  measured in a way that survives a busy shared host, where wall-clock rates swing.

Prints a Markdown table; ``--append FILE`` adds it to a benchmark log. Targets: end-to-end >= 0.8 x
bare model, peak RSS <= 300 MB on CPU with EfficientNet-Lite0.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.runtime import OnnxModel, RuntimeOptions  # noqa: E402


def synthetic_images(n: int, size: tuple[int, int], fmt: str, seed: int = 0) -> list[bytes]:
    """Textured, distinct images (so JPEG/PNG sizes and decode cost are realistic, not flat fields)."""
    rng = np.random.default_rng(seed)
    h, w = size
    base = cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h),
                      interpolation=cv2.INTER_CUBIC)
    out = []
    for i in range(n):
        img = base.copy()
        cv2.putText(img, f"{i:05d}", (10, h // 2), cv2.FONT_HERSHEY_SIMPLEX, 2.0, (255, 255, 255), 3)
        img = cv2.add(img, rng.integers(0, 12, img.shape, dtype=np.uint8))
        ok, buf = cv2.imencode(f".{fmt}", img, [cv2.IMWRITE_JPEG_QUALITY, 90] if fmt == "jpg" else [])
        out.append(buf.tobytes())
    return out


def bench_bare(model_path: Path, images: list[bytes], batch: int, threads: int, repeats: int = 2
               ) -> tuple[float, float]:
    """(images/s, CPU ms/image) of ONNX Runtime alone on preprocessed batches (decode + preprocess not timed).

    CPU time is the whole process's (all ORT threads), so it stays meaningful on a busy shared host
    where wall-clock rates swing with other people's jobs.
    """
    model = OnnxModel(model_path, options=RuntimeOptions(intra_op_threads=threads, max_batch=batch))
    decoded = [cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
               for b in images]
    batches = [model.preprocess(decoded[i:i + batch]) for i in range(0, len(decoded), batch)]
    model.run(batches[0])  # warm-up
    best, cpu_ms = 0.0, float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for x in batches:
            model.run(x)
        best = max(best, len(decoded) / (time.perf_counter() - t0))
        cpu_ms = min(cpu_ms, (time.process_time() - c0) * 1000.0 / len(decoded))
    return best, cpu_ms


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_memory_mb(pid: int) -> tuple[float, float]:
    """(VmHWM, VmRSS) in MB."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            vals[key] = int(rest.split()[0]) / 1024.0
    return vals.get("VmHWM", float("nan")), vals.get("VmRSS", float("nan"))


def count_rows(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return int(c.execute("SELECT COUNT(*) FROM results").fetchone()[0])
    except sqlite3.Error:
        return 0


def wait_health(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("daemon did not come up")


def bench_daemon(model_path: Path, images: list[bytes], fmt: str, args: argparse.Namespace,
                 work: Path) -> dict[str, float]:
    watch, stage, db = work / "in", work / "stage", work / "results.sqlite"
    watch.mkdir()
    stage.mkdir()
    for i, data in enumerate(images):
        (stage / f"img{i:05d}.{fmt}").write_bytes(data)
    port = free_port()
    cmd = [sys.executable, "-m", "pipeline.serve", "--model", str(model_path), "--db", str(db),
           "--watch", str(watch), "--http", f"127.0.0.1:{port}", "--max-batch", str(args.batch),
           "--workers", str(args.workers), "--infer-batch", str(args.infer_batch), "--log-level", "WARNING"]
    env = {**os.environ, "DEFECT_INTRA_OP_THREADS": str(args.threads)}
    log = open(work / "daemon.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    out: dict[str, float] = {}
    try:
        wait_health(port, proc)
        t0, c0 = time.perf_counter(), proc_cpu_s(proc.pid)
        for p in sorted(stage.iterdir()):
            os.replace(p, watch / p.name)  # complete files appear at once
        n = len(images)
        while (len(os.listdir(watch / "done")) < n or count_rows(db) < n):
            if proc.poll() is not None:
                raise RuntimeError(f"daemon died: see {work / 'daemon.log'}")
            if time.perf_counter() - t0 > args.timeout:
                raise RuntimeError(f"folder run did not finish in {args.timeout}s")
            time.sleep(0.01)
        out["folder_ips"] = n / (time.perf_counter() - t0)
        out["folder_cpu_ms"] = (proc_cpu_s(proc.pid) - c0) * 1000.0 / n
        if args.http_clients > 0:
            out["http_ips"] = bench_http(port, images, args.http_clients)
        out["hwm_mb"], out["rss_mb"] = proc_memory_mb(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return out


def bench_http(port: int, images: list[bytes], clients: int) -> float:
    import httpx

    lock = threading.Lock()
    todo = list(range(len(images)))
    failures: list[int] = []

    def worker() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                r = c.post("/predict", content=images[i])
                if r.status_code != 200:
                    failures.append(r.status_code)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{len(failures)} HTTP requests failed: {sorted(set(failures))}")
    return len(images) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="model.onnx with its model.json")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--size", default="640x480", help="WxH of the synthetic camera images")
    ap.add_argument("--format", default="jpg", choices=["jpg", "png", "bmp"])
    ap.add_argument("--batch", type=int, default=16, help="daemon micro-batch (and the bare model's batch)")
    ap.add_argument("--infer-batch", type=int, default=0, help="daemon's images per ONNX Runtime call (0 = auto)")
    ap.add_argument("--workers", type=int, default=2, help="daemon decode threads")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = its default)")
    ap.add_argument("--http-clients", type=int, default=8, help="0 skips the HTTP run")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--append", type=Path, help="append the table to this Markdown file (e.g. BENCHMARKS.md)")
    ap.add_argument("--note", default="", help="free text for the table's note column")
    args = ap.parse_args()

    from pipeline.serve.models import CPU_INFER_BATCH

    w, h = (int(v) for v in args.size.lower().split("x"))
    images = synthetic_images(args.images, (h, w), args.format)
    model = OnnxModel(args.model)
    chunk = args.infer_batch or (min(CPU_INFER_BATCH, args.batch) if model.provider == "CPUExecutionProvider"
                                 else args.batch)
    del model
    bare, bare_cpu = bench_bare(args.model, images, args.batch, args.threads)
    bare_chunk, bare_chunk_cpu = ((bare, bare_cpu) if chunk == args.batch
                                  else bench_bare(args.model, images, chunk, args.threads))
    work = Path(tempfile.mkdtemp(prefix="bench_daemon_"))
    try:
        res = bench_daemon(args.model, images, args.format, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"

    model = OnnxModel(args.model)
    md = model.metadata
    ratio, ratio_chunk = res["folder_ips"] / bare, res["folder_ips"] / bare_chunk
    cpu_ratio = bare_chunk_cpu / res["folder_cpu_ms"]  # CPU efficiency: 1.0 = no pipeline overhead
    host = f"{platform.machine()} {os.cpu_count()} CPU, {model.provider}, load {load}"
    header = ("| date (UTC) | model | input | images | batch / per ORT call | bare model img/s (batch / per call) "
              "| hot folder img/s | ratio (vs batch / per call) | CPU ms/img bare / daemon (ratio) | HTTP img/s "
              "| peak RSS MB | RSS MB | host | note |")
    sep = "|" + "---|" * 14
    when = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}"
    row = (f"| {when} | {md.backbone} {md.preprocess.width}x{md.preprocess.height} "
           f"| {w}x{h} {args.format} | {args.images} | {args.batch} / {chunk} | {bare:.1f} / {bare_chunk:.1f} "
           f"| {res['folder_ips']:.1f} | {ratio:.2f} / {ratio_chunk:.2f} "
           f"| {bare_chunk_cpu:.1f} / {res['folder_cpu_ms']:.1f} ({cpu_ratio:.2f}) "
           f"| {res.get('http_ips', float('nan')):.1f} | {res['hwm_mb']:.0f} | {res['rss_mb']:.0f} | {host} "
           f"| {args.note} |")
    table = "\n".join([header, sep, row])
    print(table)
    print(f"\nend-to-end / bare = {ratio:.2f} (same ORT batch: {ratio_chunk:.2f}; CPU-time based: {cpu_ratio:.2f}; "
          f"target >= 0.8); peak RSS {res['hwm_mb']:.0f} MB (target <= 300)")
    if args.append:
        existing = args.append.read_text() if args.append.exists() else ""
        with open(args.append, "a", encoding="utf-8") as f:
            if "## Inference daemon" not in existing:
                f.write(f"\n## Inference daemon (bench/bench_daemon.py)\n\n{header}\n{sep}\n")
            f.write(row + "\n")


if __name__ == "__main__":
    main()
