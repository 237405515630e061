"""Soak: many images through the real daemon (hot folder + HTTP at once); memory, descriptors and latency
must stay flat once it is warm.

    python bench/soak.py [--images 20000] [--model PATH] [--size 640x480] [--backlog 8] [--http-clients 2]
                         [--write BENCHMARKS.md]

* the daemon (``python -m pipeline.serve``) runs as a subprocess with a hot folder, HTTP and a recent-image
  sample, as on a line; without ``--model`` it serves the tiny test model (fast: a CI-sized soak);
* a feeder keeps ``--backlog`` files waiting in the hot folder (renamed in, as writers do) while
  ``--http-clients`` closed-loop clients post images, both until ``--images`` rows are in, then everything
  drains; a janitor empties ``done/`` so the disk stays flat;
* every quarter second: resident memory (VmRSS), open descriptors (``/proc/PID/fd``) and threads of the daemon;
* latency: the daemon's own per-row ``latency_ms`` (accepted -> scored) in windows of ``--window`` images,
  p50/p95/p99 per window, plus the HTTP round trip.

Checks (``SoakReport.failures``): RSS growth after warm-up < 10 %; descriptors after warm-up never above the
warm-up level + the clients' connections, and back to it when idle; median p95 of the last third of windows
<= 1.5 x that of the first third (after warm-up); exactly one row per file and per HTTP answer. ``--write`` puts the figures in
the ``soak`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.mdsection import machine_line, update_section  # noqa: E402
from bench.bench_daemon import wait_health  # noqa: E402

RSS_GROWTH_LIMIT = 0.10


@dataclass
class SoakConfig:
    images: int = 20_000
    model: Path | None = None  # None: the tiny test model
    size: tuple[int, int] = (480, 640)  # height, width of the generated images
    fmt: str = "jpg"
    http_clients: int = 2  # closed-loop HTTP clients
    window: int = 1000
    warmup: float = 0.1
    backlog: int = 8  # files waiting in the hot folder
    workdir: Path | None = None
    extra_args: tuple[str, ...] = ()
    sample_every_s: float = 0.25
    latency_drift_limit: float = 1.5  # median p95 of the last third of windows / of the first third


@dataclass
class Sample:
    t: float
    committed: int
    rss_mb: float
    fds: int
    threads: int
    cpu_s: float  # the daemon's user + system CPU time so far


@dataclass
class SoakReport:
    config: SoakConfig
    seconds: float = 0.0
    rows: int = 0
    folder_files: int = 0  # written into the hot folder
    http_answers: int = 0  # 200 answers
    distinct_sources: int = 0
    exit_code: int | None = None
    samples: list[Sample] = field(default_factory=list)
    windows: list[dict] = field(default_factory=list)  # {first, last, p50, p95, p99} of latency_ms
    http_ms: dict = field(default_factory=dict)
    rss_warm_mb: float = 0.0
    rss_max_after_mb: float = 0.0
    rss_end_mb: float = 0.0
    fds_warm: int = 0
    fds_max_after: int = 0
    fds_idle_end: int = 0
    p95_first_third: float = 0.0
    p95_last_third: float = 0.0
    cpu_ms_first_third: float = 0.0  # daemon CPU per image: its own cost, whatever the neighbours do
    cpu_ms_last_third: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def rss_growth(self) -> float:
        return (self.rss_max_after_mb - self.rss_warm_mb) / self.rss_warm_mb if self.rss_warm_mb else float("nan")

    @property
    def images_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def synthetic_pool(n: int, size: tuple[int, int], fmt: str, seed: int = 0) -> list[bytes]:
    """Distinct textured images (realistic encode/decode cost), reused round-robin under unique names."""
    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for i in range(n):
        base = cv2.resize(rng.integers(0, 256, (max(h // 16, 1), max(w // 16, 1), 3), dtype=np.uint8), (w, h),
                          interpolation=cv2.INTER_CUBIC)
        cv2.putText(base, f"{i:04d}", (10, h // 2), cv2.FONT_HERSHEY_SIMPLEX, 2.0, (255, 255, 255), 3)
        out.append(cv2.imencode(f".{fmt}", base)[1].tobytes())
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_status(pid: int) -> tuple[float, int]:
    rss, threads = float("nan"), 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, threads


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _count(db: Path, where: str = "") -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return c.execute(f"SELECT COUNT(*) FROM results {where}").fetchone()[0]
    except sqlite3.Error:
        return 0


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_soak(cfg: SoakConfig) -> SoakReport:
    """Run one soak and judge it; the daemon is always stopped (SIGTERM, then SIGKILL) before returning."""
    work = Path(cfg.workdir or tempfile.mkdtemp(prefix="defect-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    watch, db, recent = work / "in", work / "results.sqlite", work / "recent"
    watch.mkdir(exist_ok=True)
    model = cfg.model
    if model is None:
        from tests.tiny_model import make_tiny_model

        model = make_tiny_model(work / "tiny")
    pool = synthetic_pool(256, cfg.size, cfg.fmt)
    report = SoakReport(config=cfg)
    port = _free_port()
    log_path = work / "daemon.log"
    cmd = [sys.executable, "-m", "pipeline.serve", "--model", str(model), "--db", str(db), "--watch", str(watch),
           "--http", f"127.0.0.1:{port}", "--recent-dir", str(recent), "--poll-interval", "0.05",
           "--log-level", "WARNING", *cfg.extra_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    stop = threading.Event()
    http_ms: list[float] = []
    errors: list[str] = []
    try:
        try:
            wait_health(port, proc, timeout=120)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {log_path.read_text()[-2000:]}") from None

        def feeder() -> None:  # keeps `backlog` files waiting in the inbox, as a line writer renaming files in
            while not stop.is_set():
                pending = sum(1 for e in os.scandir(watch) if e.is_file() and not e.name.startswith("."))
                for _ in range(max(0, cfg.backlog - pending)):
                    name = f"img{report.folder_files:06d}.{cfg.fmt}"
                    tmp = watch / f".{name}.part"
                    tmp.write_bytes(pool[report.folder_files % len(pool)])
                    os.replace(tmp, watch / name)
                    report.folder_files += 1
                time.sleep(0.02)

        def client(k: int) -> None:  # one request at a time, the next as soon as the answer is in
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
                i = k
                while not stop.is_set():
                    t0 = time.perf_counter()
                    r = c.post("/predict", content=pool[(i * 7) % len(pool)])
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                    else:
                        http_ms.append((time.perf_counter() - t0) * 1000.0)
                    i += cfg.http_clients

        def janitor() -> None:
            while not stop.wait(2.0):
                for e in os.scandir(watch / "done") if (watch / "done").is_dir() else []:
                    try:
                        os.unlink(e.path)
                    except OSError:
                        pass

        t_start = time.monotonic()
        threads = [threading.Thread(target=feeder, daemon=True), threading.Thread(target=janitor, daemon=True)]
        threads += [threading.Thread(target=client, args=(k,), daemon=True) for k in range(cfg.http_clients)]
        for t in threads:
            t.start()
        fd_dir = Path(f"/proc/{proc.pid}/fd")
        while True:
            committed = _count(db)
            rss, nthreads = _proc_status(proc.pid)
            report.samples.append(Sample(time.monotonic() - t_start, committed, rss, len(os.listdir(fd_dir)),
                                         nthreads, _cpu_s(proc.pid)))
            if committed >= cfg.images:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"daemon died during the soak: {log_path.read_text()[-2000:]}")
            time.sleep(cfg.sample_every_s)
        report.seconds = time.monotonic() - t_start
        stop.set()  # the feeder stops writing, clients finish their request in flight
        for t in threads:
            t.join(60)
        deadline = time.monotonic() + 60  # drain: every file written is committed and moved
        while time.monotonic() < deadline and (_count(db) < report.folder_files + len(http_ms) + len(errors)
                                               or any(e.is_file() for e in os.scandir(watch))):
            time.sleep(0.2)
        time.sleep(1.5)  # idle: connections closed, nothing in flight
        report.fds_idle_end = len(os.listdir(fd_dir))
        report.rss_end_mb = _proc_status(proc.pid)[0]
        proc.send_signal(signal.SIGTERM)
        report.exit_code = proc.wait(60)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with sqlite3.connect(db) as c:
        lat = [r[0] for r in c.execute("SELECT latency_ms FROM results ORDER BY id")]
        report.rows = len(lat)
        report.distinct_sources = c.execute("SELECT COUNT(DISTINCT source) FROM results WHERE source LIKE "
                                            "'folder:%'").fetchone()[0]
        n_errors = c.execute("SELECT COUNT(*) FROM results WHERE decision = 'error'").fetchone()[0]
    report.http_ms = {"p50": _pct(http_ms, 50), "p95": _pct(http_ms, 95), "p99": _pct(http_ms, 99),
                      "n": len(http_ms)}
    for start in range(0, len(lat), cfg.window):
        w = [x for x in lat[start:start + cfg.window] if x is not None]
        report.windows.append({"first": start + 1, "last": start + len(w), "p50": _pct(w, 50), "p95": _pct(w, 95),
                               "p99": _pct(w, 99)})
    report.http_answers = len(http_ms)
    _judge(report, n_errors, errors, log_path)
    if cfg.workdir is None and not report.failures:
        shutil.rmtree(work, ignore_errors=True)
    else:
        report.config.workdir = work
    return report


def _cpu_ms_per_image(samples: list[Sample], first: int, last: int) -> float:
    """Daemon CPU ms per image between the samples that bracket rows ``first``..``last``."""
    a = max((s for s in samples if s.committed <= first), key=lambda s: s.committed, default=samples[0])
    b = min((s for s in samples if s.committed >= last), key=lambda s: s.committed, default=samples[-1])
    return (b.cpu_s - a.cpu_s) * 1000.0 / (b.committed - a.committed) if b.committed > a.committed else float("nan")


def _judge(r: SoakReport, n_errors: int, errors: list[str], log_path: Path) -> None:
    cfg = r.config
    warm_n = int(cfg.images * cfg.warmup)
    warm = [s for s in r.samples if s.committed <= warm_n]
    after = [s for s in r.samples if s.committed > warm_n]
    if len(warm) < 2 or len(after) < 2:
        r.failures.append(f"too few samples ({len(warm)} in warm-up, {len(after)} after): run more images")
        return
    tail = warm[-max(1, len(warm) // 4):]  # the end of the warm-up, when pools and arenas have filled
    r.rss_warm_mb = statistics.mean(s.rss_mb for s in tail)
    r.rss_max_after_mb = max(s.rss_mb for s in after)
    r.fds_warm = max(s.fds for s in tail)
    r.fds_max_after = max(s.fds for s in after)
    windows = [w for w in r.windows if w["first"] > warm_n and w["last"] - w["first"] + 1 >= cfg.window // 2]
    third = max(1, len(windows) // 3)
    r.p95_first_third = statistics.median(w["p95"] for w in windows[:third]) if windows else float("nan")
    r.p95_last_third = statistics.median(w["p95"] for w in windows[-third:]) if windows else float("nan")
    for w in r.windows:
        w["cpu_ms"] = _cpu_ms_per_image(r.samples, w["first"] - 1, w["last"])
    if windows:
        r.cpu_ms_first_third = statistics.median(w["cpu_ms"] for w in windows[:third])
        r.cpu_ms_last_third = statistics.median(w["cpu_ms"] for w in windows[-third:])
    if r.rss_growth >= RSS_GROWTH_LIMIT:
        r.failures.append(f"resident memory grew {r.rss_growth:.1%} after warm-up "
                          f"({r.rss_warm_mb:.0f} -> {r.rss_max_after_mb:.0f} MB)")
    if r.fds_max_after > r.fds_warm + cfg.http_clients + 2:
        r.failures.append(f"open descriptors grew: {r.fds_warm} at warm-up, up to {r.fds_max_after} after")
    warm_idle = min(s.fds for s in warm)
    if r.fds_idle_end > max(r.fds_warm, warm_idle):
        r.failures.append(f"descriptors not released when idle: {r.fds_idle_end} (warm-up {r.fds_warm})")
    if len(windows) >= 3 and r.p95_last_third > cfg.latency_drift_limit * r.p95_first_third:
        r.failures.append(f"latency drifted: p95 {r.p95_first_third:.1f} -> {r.p95_last_third:.1f} ms")
    if r.rows < cfg.images or r.rows != r.folder_files + r.http_answers or r.distinct_sources != r.folder_files:
        r.failures.append(f"{r.rows} rows for {r.folder_files} files + {r.http_answers} HTTP answers "
                          f"({r.distinct_sources} distinct folder sources)")
    if n_errors or errors:
        r.failures.append(f"{n_errors} error rows, {len(errors)} HTTP errors: {errors[:3]}")
    if r.exit_code != 0:
        r.failures.append(f"daemon exit code {r.exit_code}: {log_path.read_text()[-1000:]}")


def markdown(r: SoakReport, command: str, model_label: str) -> str:
    cfg = r.config
    lines = [
        "## Soak: images through the daemon, hot folder + HTTP at once (issue 7)", "",
        f"Command: `{command}`  ", f"Machine: {machine_line()}  ",
        f"Model: {model_label}; images {cfg.size[1]}x{cfg.size[0]} {cfg.fmt.upper()} (256 distinct, unique names); "
        f"{cfg.http_clients} closed-loop HTTP clients and the hot folder (kept at {cfg.backlog} waiting files) at "
        f"once, until {cfg.images} rows; recent-image sample on; warm-up = first {cfg.warmup:.0%}.", "",
        "| | value | limit |", "|---|---|---|",
        f"| rows = folder files + HTTP answers | {r.rows} = {r.folder_files} + {r.http_answers} "
        f"({r.distinct_sources} distinct folder sources) | one row each |",
        f"| wall time, throughput | {r.seconds:.0f} s, {r.images_per_s:.1f} images/s | |",
        f"| resident memory at warm-up end -> max after -> end | {r.rss_warm_mb:.1f} -> {r.rss_max_after_mb:.1f} -> "
        f"{r.rss_end_mb:.1f} MB (growth {r.rss_growth:+.1%}) | < {RSS_GROWTH_LIMIT:.0%} |",
        f"| open descriptors: warm-up, max after, idle at end | {r.fds_warm}, {r.fds_max_after}, {r.fds_idle_end} | "
        f"<= warm-up + {cfg.http_clients + 2} clients' sockets; idle <= warm-up |",
        f"| per-window p95 latency, first third -> last third (median) | {r.p95_first_third:.1f} -> "
        f"{r.p95_last_third:.1f} ms | <= {cfg.latency_drift_limit} x |",
        f"| daemon CPU per image, first third -> last third (median) | {r.cpu_ms_first_third:.1f} -> "
        f"{r.cpu_ms_last_third:.1f} ms | (reported: separates its own cost from neighbours' load) |",
        f"| HTTP round trip p50 / p95 / p99 | {r.http_ms['p50']:.1f} / {r.http_ms['p95']:.1f} / "
        f"{r.http_ms['p99']:.1f} ms ({r.http_ms['n']} requests) | |",
        f"| verdict | {'PASS' if not r.failures else 'FAIL: ' + '; '.join(r.failures)} | |", "",
        "Daemon latency (accepted -> scored, ms) per window of images, with memory and descriptors sampled when "
        "the window ended:", "",
        "| images | p50 | p95 | p99 | CPU ms/image | RSS MB | fds | threads |", "|---|---|---|---|---|---|---|---|",
    ]
    step = max(1, len(r.windows) // 20)
    for w in r.windows[::step]:
        s = next((s for s in r.samples if s.committed >= w["last"]), r.samples[-1])
        lines.append(f"| {w['first']}-{w['last']} | {w['p50']:.1f} | {w['p95']:.1f} | {w['p99']:.1f} | "
                     f"{w.get('cpu_ms', float('nan')):.1f} | {s.rss_mb:.1f} | {s.fds} | {s.threads} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--model", type=Path, help="model.onnx to serve (default: the tiny test model)")
    ap.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the generated images")
    ap.add_argument("--fmt", default="jpg", choices=["jpg", "png", "bmp"])
    ap.add_argument("--backlog", type=int, default=8, help="files kept waiting in the hot folder")
    ap.add_argument("--http-clients", type=int, default=2)
    ap.add_argument("--window", type=int, default=1000)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--write", type=Path, help="write the soak section of this BENCHMARKS.md")
    a = ap.parse_args()
    w, h = (int(x) for x in a.size.lower().split("x"))
    cfg = SoakConfig(images=a.images, model=a.model, size=(h, w), fmt=a.fmt, backlog=a.backlog,
                     http_clients=a.http_clients, window=a.window, workdir=a.workdir)
    report = run_soak(cfg)
    label = "tiny test model (tests/tiny_model.py)"
    if a.model is not None:
        import json

        meta = json.loads(a.model.with_suffix(".json").read_text())
        pp = meta.get("preprocess", {})
        label = f"{meta.get('backbone')} {pp.get('width')}x{pp.get('height')} ({a.model.name})"
    command = "python bench/soak.py " + " ".join(sys.argv[1:])
    body = markdown(report, command, label)
    print(body)
    if a.write:
        update_section(a.write, "soak", body)
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
