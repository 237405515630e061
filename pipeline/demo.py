"""``defect demo``: the whole closed loop on generated line images, no data and no network needed.

1. Generate labelled line images at the normal exposure; fine-tune, export (parity-checked), register
   and promote version 1 in a local registry.
2. Start the real inference daemon on the registry's champion with a hot folder, HTTP and drift monitoring.
3. Stream in-domain parts, then switch the lamp (brighter exposure) and keep streaming.
4. The daemon's drift monitor raises an alarm; an operator has labelled a few new-domain images, so the
   re-adaptation flow runs (warm start from the champion, replaying its labelled data with the new images:
   ``pipeline.supervised_adapt``), the gate compares challenger and champion on held-out new-domain images,
   and the winner is promoted.
5. The daemon hot-swaps to the new champion without stopping; every streamed image has exactly one result.
   The new model's drift reference is the new lamp, so its monitor stays quiet on the parts that follow.
   The alarm -> promotion -> serving time is measured (target: 10 minutes on 2 CPU cores).
6. A summary is printed and ``report.html`` (with a drift timeline) is written.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.train import Progress, TrainConfig

Say = Callable[[str], None]
LINE = "demo-line"


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent default

    workdir: Path = Path("demo")
    n_per_defect: int = Field(20, ge=4)  # good parts get 3x as many, as on a real line
    image_size: int = Field(128, ge=64)
    seed: int = 0
    normal_exposure: float = 1.0
    shifted_exposure: float = 1.9
    labelled_per_class: int = Field(10, ge=2)  # what the operator labels after the lamp change
    stream_in_domain: int = Field(96, ge=8)
    stream_max_shifted: int = Field(400, ge=8)
    stream_after_swap: int = Field(64, ge=0)  # parts served by the new model (its monitor should stay quiet)
    target_alarm_to_swap_s: float = Field(600, gt=0)  # the target on 2 CPU cores
    stream_interval_s: float = Field(0.03, ge=0)
    timeout_s: float = Field(900, gt=0)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(img_size=128, finetune_epochs=6, feature_views=2,
                                                                    head_steps=200))


@dataclass
class DemoSummary:
    workdir: Path
    report: Path
    v1: str
    v2: str | None
    promoted: bool
    gate_reasons: list[str]
    metrics: dict[str, dict]
    images_to_alarm: int | None
    alarm_to_swap_s: float | None
    n_streamed: int
    n_results: int
    timings: dict[str, float] = field(default_factory=dict)
    alarm_to_promotion_s: float | None = None
    alarms_after_swap: int | None = None  # drift episodes opened by the new model's monitor on the new lamp
    adaptation: dict | None = None  # what the supervised re-adaptation replayed (pipeline.supervised_adapt)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return json.loads(r.read())
    except OSError:
        return None


def _rows(db: Path, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    con.row_factory = sqlite3.Row
    try:
        return con.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # table not created yet
        return []
    finally:
        con.close()


def _served_version(health: dict | None) -> str | None:
    return health.get("model_version") if health else None


class _Stream:
    """Writes rendered line images into the hot folder (temp name + rename, as a camera PC should)."""

    def __init__(self, inbox: Path, size: int, seed: int):
        from pipeline.synth import DEFECT_KINDS

        self.inbox, self.size = inbox, size
        self.rng = np.random.default_rng(seed)
        self.kinds = ["good"] * 6 + list(DEFECT_KINDS)  # mostly good parts, as on a line
        self.n = 0
        inbox.mkdir(parents=True, exist_ok=True)

    def push(self, exposure: float) -> None:
        from pipeline.synth import render_image, save_png

        kind = self.kinds[int(self.rng.integers(len(self.kinds)))]
        save_png(self.inbox / f"part_{self.n:05d}_{kind}.png", render_image(kind, self.rng, self.size, exposure))
        self.n += 1


def _timeline_plot(path: Path, db: Path, switch_at: int, alarm_at: int | None, swap_at: int | None) -> Path | None:
    rows = _rows(db, "SELECT * FROM drift_events ORDER BY rowid")
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = rows[0].keys()
    xs = [r["n_seen"] for r in rows if "n_seen" in keys]
    score = [r["score"] for r in rows]
    thr = [r["threshold"] for r in rows]
    fig = Figure(figsize=(8, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    ax.plot(xs, score, label="drift score", color="tab:blue")
    ax.plot(xs, thr, label="threshold", color="tab:red", linestyle="--")
    ax.axvline(switch_at, color="gray", linestyle=":", label="lamp change")
    if alarm_at is not None:
        ax.axvline(alarm_at, color="tab:orange", label="alarm")
    if swap_at is not None:
        ax.axvline(swap_at, color="tab:green", label="new model serving")
    ax.set_xlabel("images served")
    ax.set_ylabel("score")
    ax.set_title("Drift timeline")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def run_demo(cfg: DemoConfig, progress: Progress | None = None, say: Say = print) -> DemoSummary:
    from flows.adapt import readapt
    from pipeline.data.folders import scan_image_folder
    from pipeline.evaluate import evaluate_model, write_report
    from pipeline.registry import Registry
    from pipeline.run import RunConfig, run_training
    from pipeline.runtime import OnnxModel
    from pipeline.synth import generate_dataset

    wd = Path(cfg.workdir).resolve()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    d = wd / "data"
    say(f"generating line images in {d}")
    generate_dataset(d / "train", n=cfg.n_per_defect, seed=cfg.seed, size=cfg.image_size,
                     exposure=cfg.normal_exposure)
    generate_dataset(d / "test_normal", n=cfg.n_per_defect, seed=cfg.seed + 1, size=cfg.image_size,
                     exposure=cfg.normal_exposure)
    generate_dataset(d / "labelled_new_lamp", n=cfg.labelled_per_class, seed=cfg.seed + 2, size=cfg.image_size,
                     exposure=cfg.shifted_exposure, good_multiplier=3)
    generate_dataset(d / "test_new_lamp", n=cfg.n_per_defect, seed=cfg.seed + 3, size=cfg.image_size,
                     exposure=cfg.shifted_exposure)
    timings["generate_s"] = time.perf_counter() - t0

    say("training version 1 on the normal exposure")
    t0 = time.perf_counter()
    run = run_training(RunConfig(data_dir=d / "train", out_dir=wd / "runs" / "v1", good_class="good",
                                 train=cfg.train), progress=progress)
    registry = Registry(wd / "models")
    v1 = registry.register(LINE, run.out_dir, note="demo: initial model").version
    registry.promote(LINE, v1, reason="demo: initial model")
    timings["train_v1_s"] = time.perf_counter() - t0

    def evaluate(version: str, folder: str) -> dict:
        m, _ = evaluate_model(OnnxModel(registry.show(LINE, version).onnx_path), scan_image_folder(d / folder))
        return {k: m[k] for k in ("balanced_accuracy", "defect_recall_at_frr", "false_reject_rate", "n_images")}

    metrics = {f"{v1} on normal exposure": evaluate(v1, "test_normal"),
               f"{v1} on new lamp": evaluate(v1, "test_new_lamp")}

    db, inbox, recent = wd / "results.sqlite", wd / "inbox", wd / "recent"
    for p in (db, db.with_suffix(".sqlite-wal"), db.with_suffix(".sqlite-shm")):
        p.unlink(missing_ok=True)
    port = _free_port()
    cmd = [sys.executable, "-m", "pipeline.serve", "--model", str(wd / "models"), "--line", LINE, "--db", str(db),
           "--watch", str(inbox), "--http", f"127.0.0.1:{port}", "--recent-dir", str(recent),
           "--model-poll-interval", "1", "--drift-log-interval", "0", "--log-level", "warning"]
    say(f"starting the inference daemon (hot folder {inbox}, http://127.0.0.1:{port})")
    log = open(wd / "daemon.log", "w")
    daemon = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MALLOC_ARENA_MAX": "2"})
    stream = _Stream(inbox, cfg.image_size, cfg.seed + 4)
    deadline = time.monotonic() + cfg.timeout_s
    alarm_at = swap_at = None
    alarm_to_swap = None
    v2, promoted, reasons, adaptation = None, False, [], None
    try:
        while _health(port) is None:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start; see {wd / 'daemon.log'}")
            time.sleep(0.2)
        say(f"streaming {cfg.stream_in_domain} parts at the normal exposure")
        for _ in range(cfg.stream_in_domain):
            stream.push(cfg.normal_exposure)
            time.sleep(cfg.stream_interval_s)
        switch_at = stream.n
        say(f"lamp change: exposure {cfg.normal_exposure} -> {cfg.shifted_exposure}")
        t_switch = time.perf_counter()
        while alarm_at is None and stream.n - switch_at < cfg.stream_max_shifted:
            stream.push(cfg.shifted_exposure)
            time.sleep(cfg.stream_interval_s)
            alarms = _rows(db, "SELECT * FROM drift_events WHERE alarm = 1 ORDER BY rowid LIMIT 1")
            if alarms:
                alarm_at = int(alarms[0]["n_seen"]) if "n_seen" in alarms[0].keys() else stream.n
        if alarm_at is None:
            raise RuntimeError(f"no drift alarm within {cfg.stream_max_shifted} shifted images")
        timings["switch_to_alarm_s"] = time.perf_counter() - t_switch
        say(f"drift alarm after {alarm_at - switch_at} images of the new lamp; re-adapting "
            f"with {cfg.labelled_per_class} operator-labelled images per class")
        t_alarm = time.perf_counter()
        out = readapt(line=LINE, registry=str(wd / "models"), data_dir=str(d / "labelled_new_lamp"),
                      recent_dir=str(recent), reason=f"demo: drift alarm after {alarm_at - switch_at} images",
                      train_config=cfg.train.model_dump(mode="json"))
        v2, promoted, reasons = out["version"], out["promoted"], out["reasons"] if "reasons" in out else []
        timings["readapt_s"] = time.perf_counter() - t_alarm
        adaptation = out.get("adaptation")
        say(f"gate: {v2} {'promoted' if promoted else 'not promoted'} ({timings['readapt_s']:.0f} s after the alarm; "
            + "; ".join(reasons) + ")")
        if promoted:
            while time.monotonic() < deadline:  # keep the line running while the daemon swaps
                stream.push(cfg.shifted_exposure)
                time.sleep(max(cfg.stream_interval_s, 0.05))
                if _served_version(_health(port)) == v2:
                    swap_at = stream.n
                    alarm_to_swap = time.perf_counter() - t_alarm
                    break
            say(f"daemon now serves {v2} ({alarm_to_swap:.0f} s after the alarm)" if swap_at else
                "daemon did not swap in time")
        n_after = cfg.stream_after_swap if swap_at else 16
        for _ in range(n_after):  # more parts on the new model: its drift reference is the new lamp
            stream.push(cfg.shifted_exposure)
            time.sleep(cfg.stream_interval_s)
        while time.monotonic() < deadline:  # every streamed image scored
            n_rows = len(_rows(db, "SELECT id FROM results WHERE source LIKE 'folder:%'"))
            if n_rows >= stream.n:
                break
            time.sleep(0.3)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()
    rows = _rows(db, "SELECT source, COUNT(*) AS n FROM results WHERE source LIKE 'folder:%' GROUP BY source")
    n_results = len(rows)
    alarms_after_swap = len(_rows(db, "SELECT rowid FROM drift_events WHERE kind = 'alarm_started' AND model_version = ?",
                                  (v2,))) if swap_at else None
    doubled = sum(1 for r in rows if r["n"] > 1)
    if v2:
        metrics[f"{v2} on new lamp"] = evaluate(v2, "test_new_lamp")
        metrics[f"{v2} on normal exposure"] = evaluate(v2, "test_normal")
    plot = _timeline_plot(wd / "drift_timeline.png", db, switch_at, alarm_at, swap_at)
    flat = {f"{k}: {m}": v for k, mm in metrics.items() for m, v in mm.items()}
    report = write_report(wd, "defect-pipeline demo: the closed loop", metrics[f"{v1} on normal exposure"] | {},
                          [p for p in [plot] if p], extra={
                              "champion before": v1, "challenger": v2, "promoted": promoted,
                              "gate": "; ".join(reasons), "images from lamp change to alarm":
                                  None if alarm_at is None else alarm_at - switch_at,
                              "alarm to promotion (s)": round(timings["readapt_s"]) if "readapt_s" in timings else None,
                              "alarm to new model serving (s)": None if alarm_to_swap is None else round(alarm_to_swap),
                              "target alarm to serving (s)": f"<= {cfg.target_alarm_to_swap_s:.0f}",
                              "drift alarms of the new model on the new lamp": alarms_after_swap,
                              "re-adaptation": json.dumps(adaptation) if adaptation else None,
                              "images streamed": stream.n, "images with a result": n_results,
                              "images scored twice": doubled, **flat,
                              **{f"time {k}": f"{v:.1f} s" for k, v in timings.items()}})
    summary = DemoSummary(wd, report, v1, v2, promoted, reasons, metrics,
                          None if alarm_at is None else alarm_at - switch_at, alarm_to_swap, stream.n, n_results,
                          timings, timings.get("readapt_s"), alarms_after_swap, adaptation)
    (wd / "summary.json").write_text(json.dumps(summary.__dict__, indent=2, default=str))
    return summary
