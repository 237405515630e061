"""End-to-end daemon throughput vs the bare model, and the daemon's peak memory.

    python bench/bench_daemon.py --model models/line1/v3/model.onnx [--images 400] [--size 640x480]
                                 [--http-clients 8] [--append BENCHMARKS.md]

* bare model: ONNX Runtime alone on already preprocessed batches, in every configuration the
  daemon could use: one call at a time on all cores (ORT's default threads) at the daemon's
  micro-batch and at its per-call chunk, the auto plan of a folder-fed daemon on this host, and the
  daemon's own plan (``--streams`` calls at once on ``--threads`` threads each, as
  ``pipeline.serve.models.plan_streams`` resolves them). The ratio is taken against the fastest of
  these whatever the daemon runs, so no configuration is flattered by a slow reference;
* hot folder: the real daemon (``python -m pipeline.serve``) in a subprocess; ``--images`` encoded
  files are renamed into its folder at once, timed until every row is committed and every file moved
  (includes reading, sha256, decode, resize, the SQLite commit with fsync and the move); best of
  ``--rounds`` rounds with fresh images, as the bare model is best of its repeats. The benchmark
  checks for completion every 50 ms with one directory listing (it shares the cores it measures).
  Two rates: *steady*, from the rows' commit times after the first ``--batch`` rows (what the line
  sees under sustained load, and what the ratio uses), and *burst*, wall clock from the moment the
  files appear (includes the folder's two-scan stability rule, 2 x ``poll_interval_s``, once);
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


def folder_images(root: Path, n: int, seed: int = 0) -> tuple[list[bytes], str, str]:
    """``n`` encoded images from a real image folder (recursive, shuffled, cycled when it has fewer),
    their common extension and a label for the table (e.g. the magnetic-tile line images)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in
                   {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
    if not files:
        raise SystemExit(f"no images under {root}")
    exts = {p.suffix.lower().lstrip(".") for p in files}
    if len(exts) > 1:
        raise SystemExit(f"{root} mixes image formats {sorted(exts)}: give a folder of one format")
    order = np.random.default_rng(seed).permutation(len(files))
    chosen = [files[order[i % len(files)]] for i in range(n)]
    sizes = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape[:2] for p in chosen[:50]]
    h, w = (int(v) for v in np.median(np.array(sizes), axis=0))
    name = "/".join(root.resolve().parts[-2:])
    ext = exts.pop()
    grey = sum(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).ndim == 2 for p in chosen[:50]) > 25
    return ([p.read_bytes() for p in chosen], ext,
            f"{name}: {len(files)} {'grey ' if grey else ''}{ext} files, ~{w}x{h}")


def bench_bare(model_path: Path, images: list[bytes], batch: int, threads: int, streams: int = 1,
               repeats: int = 3) -> tuple[float, float]:
    """(images/s, CPU ms/image) of ONNX Runtime alone on preprocessed batches (decode + preprocess not timed).

    ``streams`` > 1: that many calls at once on one session (each on ``threads`` threads), as the
    daemon's inference streams run. CPU time is the whole process's (all ORT threads), so it stays
    meaningful on a busy shared host where wall-clock rates swing with other people's jobs.
    """
    from concurrent.futures import ThreadPoolExecutor

    model = OnnxModel(model_path, options=RuntimeOptions(intra_op_threads=threads, max_batch=batch))
    decoded = [cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
               for b in images]
    batches = [model.preprocess(decoded[i:i + batch]) for i in range(0, len(decoded), batch)]
    best, cpu_ms = 0.0, float("inf")
    with ThreadPoolExecutor(max_workers=streams) as pool:
        list(pool.map(model.run, batches[:streams]))  # warm-up, every stream
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            if streams == 1:
                for x in batches:
                    model.run(x)
            else:
                list(pool.map(model.run, batches))
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


def steady_rate(db: Path, prefix: str, skip: int) -> float:
    """Images/s between the commits of row ``skip`` and the last row whose source starts with ``prefix``."""
    from datetime import datetime

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
        ts = [datetime.fromisoformat(r[0]).timestamp() for r in
              c.execute("SELECT ts FROM results WHERE source LIKE ? ORDER BY id", (prefix + "%",))]
    skip = min(skip, len(ts) - 2)
    return (len(ts) - 1 - skip) / max(ts[-1] - ts[skip], 1e-3)


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


def bench_daemon(model_path: Path, rounds: list[list[bytes]], fmt: str, args: argparse.Namespace,
                 work: Path) -> dict[str, float]:
    watch, stage, db = work / "in", work / "stage", work / "results.sqlite"
    watch.mkdir()
    port = free_port()
    cmd = [sys.executable, "-m", "pipeline.serve", "--model", str(model_path), "--db", str(db),
           "--watch", str(watch), "--http", f"127.0.0.1:{port}", "--max-batch", str(args.batch),
           "--workers", str(args.workers), "--infer-batch", str(args.infer_batch),
           "--inference-streams", str(args.streams), "--intra-op-threads", str(args.threads),
           "--log-level", "WARNING"]
    log = open(work / "daemon.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    out: dict[str, float] = {"folder_ips": 0.0, "folder_cpu_ms": float("inf"), "burst_ips": 0.0}
    try:
        wait_health(port, proc)
        done_total = 0
        for r, images in enumerate(rounds):
            stage.mkdir()
            for i, data in enumerate(images):
                (stage / f"r{r}_img{i:05d}.{fmt}").write_bytes(data)
            time.sleep(0.5)  # let the writes settle before the clock starts
            t0, c0 = time.perf_counter(), proc_cpu_s(proc.pid)
            for p in sorted(stage.iterdir()):
                os.replace(p, watch / p.name)  # complete files appear at once
            done_total += len(images)
            while not (watch / "done").is_dir() or len(os.listdir(watch / "done")) < done_total:
                if proc.poll() is not None:
                    raise RuntimeError(f"daemon died: see {work / 'daemon.log'}")
                if time.perf_counter() - t0 > args.timeout:
                    raise RuntimeError(f"folder run did not finish in {args.timeout}s")
                time.sleep(0.05)
            burst = len(images) / (time.perf_counter() - t0)
            cpu_ms = (proc_cpu_s(proc.pid) - c0) * 1000.0 / len(images)
            if count_rows(db) < done_total:
                raise RuntimeError(f"{done_total} files moved but only {count_rows(db)} rows committed")
            ips = steady_rate(db, f"folder:r{r}_", args.batch)
            if ips > out["folder_ips"]:
                out["folder_ips"], out["folder_cpu_ms"], out["burst_ips"] = ips, cpu_ms, burst
            stage.rmdir()
        if args.http_clients > 0:
            out["http_ips"] = bench_http(port, rounds[0], args.http_clients)
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
    ap.add_argument("--images-from", type=Path, help="use real images from this folder (recursive) instead of "
                    "synthetic camera frames, e.g. ../shared/datasets/magnetic-tile/images")
    ap.add_argument("--batch", type=int, default=16, help="daemon micro-batch (and the bare model's batch)")
    ap.add_argument("--infer-batch", type=int, default=0, help="daemon's images per ONNX Runtime call (0 = auto)")
    ap.add_argument("--workers", type=int, default=2, help="daemon decode threads")
    ap.add_argument("--streams", type=int, default=0, help="daemon's ONNX Runtime calls at once (0 = auto)")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per call (0 = auto)")
    ap.add_argument("--rounds", type=int, default=2, help="hot-folder rounds of --images fresh images (best kept)")
    ap.add_argument("--http-clients", type=int, default=8, help="0 skips the HTTP run")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--append", type=Path, help="append the table to this Markdown file (e.g. BENCHMARKS.md)")
    ap.add_argument("--note", default="", help="free text for the table's note column")
    args = ap.parse_args()

    from pipeline.serve.models import infer_chunk, plan_streams

    if args.images_from:
        everything, args.format, input_label = folder_images(args.images_from, args.images * args.rounds)
    else:
        w, h = (int(v) for v in args.size.lower().split("x"))
        everything = synthetic_images(args.images * args.rounds, (h, w), args.format)
        input_label = f"{w}x{h} {args.format}"
    rounds = [everything[r * args.images:(r + 1) * args.images] for r in range(args.rounds)]
    images = rounds[0]
    model = OnnxModel(args.model)
    on_cpu = model.provider == "CPUExecutionProvider"
    del model
    plan = plan_streams(args.streams, args.threads, None)
    chunk = infer_chunk(on_cpu, args.infer_batch, args.batch, plan.streams)
    one_call_chunk = infer_chunk(on_cpu, args.infer_batch, args.batch)
    # the bare model in each configuration the daemon could run it in; the ratio uses the fastest
    bare: dict[str, tuple[float, float]] = {}
    bare[f"1 call, batch {args.batch}"] = bench_bare(args.model, images, args.batch, 0)
    if one_call_chunk != args.batch:
        bare[f"1 call, batch {one_call_chunk}"] = bench_bare(args.model, images, one_call_chunk, 0)
    configs = {(plan.streams, plan.intra_op_threads, chunk)}
    auto = plan_streams(0, 0, None)  # what auto gives a folder-fed daemon here: always among the references
    configs.add((auto.streams, auto.intra_op_threads, infer_chunk(on_cpu, args.infer_batch, args.batch, auto.streams)))
    for n, threads, per_call in sorted(configs):
        if n > 1 or threads:
            bare[f"{n} x {threads or 'auto'} threads, batch {per_call}"] = bench_bare(
                args.model, images, per_call, threads, n)
    best_name = max(bare, key=lambda k: bare[k][0])
    best, best_cpu = bare[best_name]
    work = Path(tempfile.mkdtemp(prefix="bench_daemon_"))
    try:
        res = bench_daemon(args.model, rounds, args.format, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"

    model = OnnxModel(args.model)
    md = model.metadata
    ratio = res["folder_ips"] / best
    # CPU efficiency: 1.0 = no pipeline overhead (NaN where a tiny run's CPU time did not register a tick)
    cpu_ratio = best_cpu / res["folder_cpu_ms"] if res["folder_cpu_ms"] > 0 else float("nan")
    host = f"{platform.machine()} {os.cpu_count()} CPU, {model.provider}, load {load}"
    header = ("| date (UTC) | model | input | images x rounds | daemon: streams x threads, batch / per call "
              "| bare model img/s by configuration | hot folder img/s steady (burst) | ratio vs fastest bare "
              "| CPU ms/img bare / daemon (ratio) | HTTP img/s | peak RSS MB | RSS MB | host | note |")
    sep = "|" + "---|" * 14
    when = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}"
    bare_cell = "; ".join(f"{k}: {'**' if k == best_name else ''}{v[0]:.1f}{'**' if k == best_name else ''}"
                          for k, v in bare.items())
    row = (f"| {when} | {md.backbone} {md.preprocess.width}x{md.preprocess.height} "
           f"| {input_label} | {args.images} x {args.rounds} "
           f"| {plan.streams} x {plan.intra_op_threads or 'auto'}, {args.batch} / {chunk} | {bare_cell} "
           f"| {res['folder_ips']:.1f} ({res['burst_ips']:.1f}) | {ratio:.2f} "
           f"| {best_cpu:.1f} / {res['folder_cpu_ms']:.1f} ({cpu_ratio:.2f}) "
           f"| {res.get('http_ips', float('nan')):.1f} | {res['hwm_mb']:.0f} | {res['rss_mb']:.0f} | {host} "
           f"| {args.note} |")
    table = "\n".join([header, sep, row])
    print(table)
    print(f"\nend-to-end / fastest bare ({best_name}) = {ratio:.2f} (CPU-time based: {cpu_ratio:.2f}; "
          f"target >= 0.8); peak RSS {res['hwm_mb']:.0f} MB (target <= 300)")
    if args.append:
        existing = args.append.read_text() if args.append.exists() else ""
        with open(args.append, "a", encoding="utf-8") as f:
            if "## Inference daemon" not in existing:
                f.write(f"\n## Inference daemon (bench/bench_daemon.py)\n\n{header}\n{sep}\n")
            f.write(row + "\n")


if __name__ == "__main__":
    main()
