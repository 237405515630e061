"""Every benchmark in one command: writes BENCHMARKS.md sections and PNG plots under bench/plots/.

    python bench/run_all.py                          # everything (long: 12 trainings for the accuracy part)
    python bench/run_all.py --only latency,preprocess,floor
    python bench/run_all.py --quick                  # smoke run: 1 seed, 5 shots, fewer repeats

Parts (``--only``, comma-separated):

* ``floor``: the machine (CPU, cores, ISA), measured sgemm GFLOP/s (numpy, torch) and ONNX Runtime
  uint8 x int8 GEMM GOP/s, the model's MACs counted from the ONNX graph, and the resulting compute floor;
* ``latency``: torch eager vs ONNX Runtime fp32 vs INT8 at batch 1/8/32, interleaved, medians, warm-up
  excluded, same thread count;
* ``tuning``: graph optimisation level x threads at batch 1, IO binding vs plain ``run``;
* ``recipe``: INT8 quantisation recipes (reduce_range, calibration method, head, per-tensor) on the same
  model: balanced-accuracy change on held-out images and batch-1 latency;
* ``preprocess``: decode, resize, normalise per image, separately;
* ``accuracy``: balanced accuracy vs labelled images per class (5/10/20/50 x 3 seeds) on magnetic-tile,
  fp32 and INT8 on every held-out image;
* ``training``: training wall time per run (from the accuracy runs, or the one model the speed parts use);
* ``daemon``: ``bench/bench_daemon.py`` end to end (hot folder + HTTP) with the fp32 and the INT8 model.

Related, separate: ``bench/sensitivity.py`` (how far pixel noise, a mirror image and INT8 move the predictions
of the accuracy runs; reads this script's work folder).

Trained run folders and raw results are kept in ``--work`` (default: $TMPDIR/defect-bench) and reused,
so a part can be re-run (or the Markdown re-rendered) without training again; ``--fresh`` retrains.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import accuracy as acc  # noqa: E402
from bench import speed  # noqa: E402
from bench.mdsection import machine_line, update_section  # noqa: E402

PARTS = ("floor", "latency", "tuning", "recipe", "preprocess", "accuracy", "training", "daemon")
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "magnetic-tile" / "images"
PLOTS = REPO / "bench" / "plots"
TARGET_RATIO, TARGET_INT8_MS, TARGET_DROP = 2.0, 6.0, 0.01


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    ap.add_argument("--quick", action="store_true", help="1 seed, 5 shots, fewer repeats: checks that it all runs")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="magnetic-tile images/ (one folder per class)")
    ap.add_argument("--shots", type=int, nargs="+", help="labelled images per class [5 10 20 50; quick: 5]")
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds per shot count [0 1 2; quick: 0]")
    ap.add_argument("--run-dir", type=Path, help="use this trained run folder for the speed parts (needs "
                    "model.onnx + checkpoint.npz + manifest.json) instead of training one")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="intra-op threads for torch and ONNX Runtime [all usable cores]")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "defect-bench")
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--fresh", action="store_true", help="retrain / re-quantise instead of reusing the work folder")
    ap.add_argument("--daemon-images", type=int, help="images per daemon run [400; quick: 100]")
    args = ap.parse_args()
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    args.shots = args.shots or ([5] if args.quick else [5, 10, 20, 50])
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.daemon_images = args.daemon_images or (100 if args.quick else 400)
    return args


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Results:
    """Raw results per part, kept in the work folder so the Markdown can be rebuilt from any subset."""

    def __init__(self, path: Path):
        self.path = path
        self.load_at_start = "?"
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def put(self, part: str, value: Any, command: str) -> None:
        self.data[part] = {"value": value, "command": command, "machine": machine_line(),
                           "at": time.strftime("%Y-%m-%d %H:%M"), "load": f"{self.load_at_start} -> {speed.loadavg()}"}
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def get(self, part: str) -> dict[str, Any] | None:
        return self.data.get(part)


# --------------------------------------------------------------------------- the model the speed parts use


def speed_model(args: argparse.Namespace) -> tuple[Path, Path, dict[str, Any]]:
    """(run folder, its INT8 model, the INT8 report on held-out images) for latency/tuning/floor/daemon."""
    if args.run_dir:
        run, shots, seed = args.run_dir, None, None
    else:
        shots, seed = (5 if args.quick else 20), 0
        say(f"speed model: {shots}-shot Lite0 on magnetic-tile (seed {seed}), trained or reused in {args.work}")
        run, _ = acc.trained_run(args.data, shots, seed, args.work, args.fresh)
    int8 = run / "model.int8.onnx"
    if shots is not None:
        report = acc.int8_for_run(run, acc.held_out_folder(args.data, shots, seed, args.work), args.fresh)
    elif not int8.is_file():
        from pipeline.export.precision import export_int8

        report = export_int8(run, max_drop=1.0).report
    else:
        from pipeline.metadata import load_metadata

        report = load_metadata(int8).extra.get("parity", {})
    return run, int8, report


# --------------------------------------------------------------------------- parts


def part_floor(args, res: Results, cmd: str) -> None:
    run, int8, _ = speed_model(args)
    say("floor: machine, sgemm, int8 GEMM, MACs")
    value = {"machine": speed.machine_info(), "rates": speed.sgemm_gflops(),
             "macs": speed.count_macs(run / "model.onnx", batch=1)}
    value["rates"]["ort_int8_gemm"] = speed.ort_int8_gemm_gops(threads=args.threads)
    res.put("floor", value, cmd)


def part_latency(args, res: Results, cmd: str) -> None:
    run, int8, report = speed_model(args)
    calls, warmup, rounds = (12, 3, 3) if args.quick else (60, 10, 6)
    say(f"latency: torch eager / ORT fp32 / ORT INT8 at batch 1, 8, 32 ({args.threads} threads)")
    value = speed.latency_table(run, int8, [1, 8, 32], args.threads, calls, warmup, rounds)
    value["cpu_ms_1thread"] = speed.cpu_ms_single_thread(run, int8, calls, warmup)
    value["int8_report"] = {k: report.get(k) for k in ("balanced_accuracy_fp32", "balanced_accuracy",
                                                       "balanced_accuracy_change", "top1_agreement", "n_images",
                                                       "images")}
    value["run"] = str(run)
    res.put("latency", value, cmd)


def part_tuning(args, res: Results, cmd: str) -> None:
    run, int8, _ = speed_model(args)
    calls, warmup, rounds = (10, 3, 2) if args.quick else (40, 8, 4)
    threads = sorted({1, args.threads})
    say(f"tuning: graph optimisation x threads {threads}, IO binding")
    res.put("tuning", speed.tuning_table(run / "model.onnx", int8, threads, calls, warmup, rounds), cmd)


def part_recipe(args, res: Results, cmd: str) -> None:
    if args.run_dir:
        raise SystemExit("the recipe part needs the held-out images of a bench-trained model (no --run-dir)")
    run, _, _ = speed_model(args)
    shots = 5 if args.quick else 20
    names = list(acc.RECIPES)[:2] if args.quick else list(acc.RECIPES)
    say(f"recipe: {len(names)} INT8 recipes on the {shots}-shot model, checked on its held-out images")
    rows = acc.quant_recipes(run, acc.held_out_folder(args.data, shots, 0, args.work), names, args.threads,
                             args.work)
    res.put("recipe", rows, cmd)


def part_preprocess(args, res: Results, cmd: str) -> None:
    from pipeline.data.decode import IMAGE_EXTENSIONS
    from pipeline.preprocess import PreprocessSpec

    files = sorted(p for p in args.data.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[::10] \
        if args.data.is_dir() else []
    spec = PreprocessSpec()  # Lite0: 224x224 stretch, area interpolation
    say(f"preprocess: decode / resize / normalise on {len(files)} real images + camera-sized JPEGs")
    value = speed.preprocessing_cost(spec, files[:60 if args.quick else 140], repeats=1 if args.quick else 3)
    res.put("preprocess", {"spec": spec.model_dump(), "sets": value}, cmd)


def part_accuracy(args, res: Results, cmd: str) -> None:
    if not args.data.is_dir():
        raise SystemExit(f"accuracy needs the magnetic-tile images at {args.data} (--data)")
    say(f"accuracy: shots {args.shots} x seeds {args.seeds} (one training each; long)")
    rows = acc.accuracy_runs(args.data, args.shots, args.seeds, args.work, args.fresh, log=say)
    res.put("accuracy", rows, cmd)


def part_training(args, res: Results, cmd: str) -> None:
    rows = (res.get("accuracy") or {}).get("value")
    if not rows:
        run, _, _ = speed_model(args)
        timing = json.loads((run / "bench_timing.json").read_text()) if (run / "bench_timing.json").is_file() else {}
        rows = [{"shots": "?", "seed": 0, "train_wall_s": timing.get("wall_s"), "stages": timing.get("stages", {}),
                 "trained_at": timing.get("trained_at")}]
    res.put("training", rows, cmd)


def part_daemon(args, res: Results, cmd: str) -> None:
    """The daemon on the real line images (grey magnetic-tile JPEGs) and on synthetic colour camera
    frames, fp32 and INT8, with its default plan (inference streams) and, for comparison, one
    ONNX Runtime call at a time on every core (the pre-streams default)."""
    run, int8, _ = speed_model(args)
    real = ["--images-from", str(args.data)] if args.data.is_dir() else []
    configs = [("fp32, line images", run / "model.onnx", real),
               ("fp32, line images, 1 stream", run / "model.onnx", [*real, "--streams", "1"]),
               ("int8, line images", int8, real),
               ("fp32, 640x480 colour frames", run / "model.onnx", ["--size", "640x480"]),
               ("int8, 640x480 colour frames", int8, ["--size", "640x480"])]
    if not real:
        configs = [c for c in configs if "line images" not in c[0]]
    out = {}
    for name, model, extra in configs:
        argv = [sys.executable, str(REPO / "bench" / "bench_daemon.py"), "--model", str(model),
                "--images", str(args.daemon_images), *extra,
                "--http-clients", "4" if args.quick else "8", "--note", f"{name} (run_all)"]
        say(f"daemon: {name}: {' '.join(argv[1:])}")
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"bench_daemon.py failed for {name}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        lines = proc.stdout.strip().splitlines()
        out[name] = {"header": lines[0], "row": lines[2], "summary": lines[-1],
                     "command": "python bench/bench_daemon.py " + " ".join(shlex.quote(a) for a in argv[2:])}
    res.put("daemon", out, cmd)


# --------------------------------------------------------------------------- plots and Markdown


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency(lat: dict[str, Any]) -> list[str]:
    plt = _plt()
    PLOTS.mkdir(parents=True, exist_ok=True)
    batches = list(lat["batches"])
    engines = list(next(iter(lat["batches"].values())))
    names = []
    for key, ylabel, fname in (("ms_per_image", "ms per image (median)", "latency.png"),
                               ("images_per_s", "images / s", "throughput.png")):
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        width = 0.8 / len(engines)
        for i, eng in enumerate(engines):
            vals = [lat["batches"][b][eng][key] for b in batches]
            xs = [j + (i - (len(engines) - 1) / 2) * width for j in range(len(batches))]
            bars = ax.bar(xs, vals, width, label=eng)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_yscale("log")  # torch eager and INT8 differ by an order of magnitude or more
        ax.set_ylabel(ylabel + " (log scale)")
        ax.set_title(f"{lat['backbone']} {lat['input']}, {lat['threads']} threads")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(PLOTS / fname, dpi=110)
        plt.close(fig)
        names.append(fname)
    return names


def plot_accuracy(rows: list[dict[str, Any]]) -> str:
    plt = _plt()
    PLOTS.mkdir(parents=True, exist_ok=True)
    shots = sorted({r["shots"] for r in rows})
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for key, label, marker in (("bacc_fp32", "ONNX Runtime fp32", "o"), ("bacc_int8", "ONNX Runtime INT8", "s")):
        means = [statistics.mean(r[key] for r in rows if r["shots"] == k) for k in shots]
        sds = [statistics.pstdev([r[key] for r in rows if r["shots"] == k]) for k in shots]
        ax.errorbar(shots, means, yerr=sds, marker=marker, capsize=3, label=label)
        ax.scatter([r["shots"] for r in rows], [r[key] for r in rows], s=8, alpha=0.4)
    ax.set_xscale("log")
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # only the measured shot counts are labelled
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel("balanced accuracy (held out)")
    ax.set_title("magnetic-tile, EfficientNet-Lite0 (mean ± sd over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOTS / "accuracy_vs_shots.png", dpi=110)
    plt.close(fig)
    return "accuracy_vs_shots.png"


def plot_preprocess(sets: dict[str, dict[str, float]]) -> str:
    plt = _plt()
    PLOTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    names = list(sets)
    left = [0.0] * len(names)
    for key, label in (("decode_ms", "decode"), ("resize_ms", "resize"), ("normalize_ms", "normalise")):
        vals = [sets[n][key] for n in names]
        ax.barh(names, vals, left=left, label=label)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("ms per image, one thread (median)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOTS / "preprocess.png", dpi=110)
    plt.close(fig)
    return "preprocess.png"


def _head(title: str, entry: dict[str, Any]) -> list[str]:
    return [f"## {title}", "", f"Command: `{entry['command']}`  ", f"Machine: {entry['machine']}  ",
            f"Measured: {entry['at']} (load average 1/5/15 min at start -> end: {entry.get('load', '?')})", ""]


def render_speed(res: Results, out: Path) -> None:
    lat, floor, tuning = res.get("latency"), res.get("floor"), res.get("tuning")
    if not (lat or floor or tuning):
        return
    lines: list[str] = []
    if floor:
        f = floor["value"]
        m, r, macs = f["machine"], f["rates"], f["macs"]
        lines += _head("Inference speed: the machine and the compute floor (issue 6)", floor)
        lines += [f"CPU: {m['cpu']}, {m['cores_usable']} usable cores, ISA {', '.join(m['isa'])}; ONNX Runtime "
                  f"{m['onnxruntime']}; load average at start {m['load_avg_at_start']}.", "",
                  f"Model: {macs['macs'] / 1e6:.0f} M multiply-accumulates per 224x224 image "
                  f"({macs['gflops']:.2f} GFLOP; {100 * macs['depthwise_macs'] / macs['macs']:.0f} % in depthwise "
                  "convolutions), counted from the ONNX graph (Conv + Gemm shapes).", "",
                  "| measured peak | rate | compute floor per image |", "|---|---|---|"]
        for key, label in (("numpy_sgemm", "numpy sgemm 2048² (fp32)"), ("torch_sgemm", "torch mm 2048² (fp32)"),
                           ("ort_int8_gemm", "ONNX Runtime MatMulInteger 1024² (u8 x s8)")):
            if key in r:
                lines.append(f"| {label} | {r[key]:.0f} G{'OP' if 'int8' in key else 'FLOP'}/s | "
                             f"{macs['gflops'] / r[key] * 1000:.2f} ms |")
        lines.append("")
    if lat:
        v = lat["value"]
        if not floor:
            lines += _head("Inference speed (issue 6)", lat)
        else:
            lines += [f"Latency command: `{lat['command']}` ({lat['at']}, load average {lat.get('load', '?')})", ""]
        engines = list(v["batches"]["1"])
        lines += [f"{v['backbone']} {v['input']}, {v['threads']} intra-op threads for every engine, same random "
                  "input; engines measured in interleaved rounds; median over all timed calls, warm-up excluded "
                  "(p10-p90 in brackets).", "",
                  "| batch | " + " | ".join(f"{e} ms/batch" for e in engines) + " | " +
                  " | ".join(f"{e} img/s" for e in engines) + " | fp32 vs torch | INT8 vs fp32 |",
                  "|---" * (2 * len(engines) + 3) + "|"]
        for b, row in v["batches"].items():
            cells = [f"{row[e]['median_ms']:.2f} ({row[e]['p10_ms']:.1f}-{row[e]['p90_ms']:.1f})" for e in engines]
            cells += [f"{row[e]['images_per_s']:.0f}" for e in engines]
            ratio = (f"{row['torch eager']['median_ms'] / row['ORT fp32']['median_ms']:.2f}x"
                     if "torch eager" in row else "")
            i8 = f"{row['ORT fp32']['median_ms'] / row['ORT INT8']['median_ms']:.2f}x" if "ORT INT8" in row else ""
            lines.append(f"| {b} | " + " | ".join(cells) + f" | {ratio} | {i8} |")
        b1 = v["batches"]["1"]
        lines.append("")
        if floor:
            f = floor["value"]
            fl32 = f["macs"]["gflops"] / f["rates"]["numpy_sgemm"] * 1000
            fl8 = f["macs"]["gflops"] / f["rates"]["ort_int8_gemm"] * 1000
            b32 = v["batches"].get("32", b1)
            lines += [f"Against the floor: ORT fp32 at batch 32 runs at {b32['ORT fp32']['ms_per_image'] / fl32:.1f}x "
                      f"the fp32 compute floor per image ({fl32:.2f} ms), batch 1 at "
                      f"{b1['ORT fp32']['median_ms'] / fl32:.1f}x; INT8 at batch 32 at "
                      f"{b32.get('ORT INT8', {}).get('ms_per_image', float('nan')) / fl8:.1f}x its floor "
                      f"({fl8:.2f} ms). Depthwise convolutions and activations are memory-bound and never reach "
                      "GEMM rates, so a few x above the floor is the expected end point on CPU.", ""]
        checks = []
        if "torch eager" in b1:
            r = b1["torch eager"]["median_ms"] / b1["ORT fp32"]["median_ms"]
            checks.append(f"ORT fp32 / torch eager at batch 1: **{r:.2f}x** (target >= {TARGET_RATIO:.1f}x: "
                          f"{'met' if r >= TARGET_RATIO else 'NOT met'})")
        if "ORT INT8" in b1:
            ms = b1["ORT INT8"]["median_ms"]
            checks.append(f"ORT INT8 at batch 1: **{ms:.2f} ms** per image (target <= {TARGET_INT8_MS:.0f} ms: "
                          f"{'met' if ms <= TARGET_INT8_MS else 'NOT met'})")
        rep = v.get("int8_report") or {}
        if rep.get("balanced_accuracy_change") is not None:
            ch = rep["balanced_accuracy_change"]
            checks.append(f"INT8 balanced accuracy on {rep['n_images']} held-out images ({rep['images']}): "
                          f"{rep['balanced_accuracy']:.3f} vs fp32 {rep['balanced_accuracy_fp32']:.3f} "
                          f"(**{100 * ch:+.2f} points**, target >= -1: "
                          f"{'met' if ch >= -TARGET_DROP - 1e-9 else 'NOT met'}"
                          f"; top-1 agreement {100 * rep['top1_agreement']:.1f} %)")
        cpu = v.get("cpu_ms_1thread")
        if cpu:
            checks.append("Single-thread CPU time per image at batch 1 (process CPU time: not inflated by other "
                          "load on the machine): " + ", ".join(f"{k} {ms:.2f} ms" for k, ms in cpu.items()))
        lines += [f"- {c}" for c in checks] + [""]
        lines += [f"![{n[:-4]}](bench/plots/{n})" for n in plot_latency(v)] + [""]
    if tuning:
        t = tuning["value"]
        lines += [f"Runtime tuning (command: `{tuning['command']}`, {tuning['at']}, load average "
                  f"{tuning.get('load', '?')}): batch-1 median ms by ONNX "
                  "Runtime graph optimisation level and intra-op threads.", "",
                  "| model / threads | disable | basic | extended | all |", "|---|---|---|---|---|"]
        for k, row in t["graph_optimization"].items():
            lines.append(f"| {k} | " + " | ".join(f"{row[lvl]:.2f}" for lvl in ("disable", "basic", "extended", "all"))
                         + " |")
        lines += ["", f"IO binding on CPU ({t['threads_for_io_binding']} threads; outputs bound to buffers allocated "
                  "once): median ms per call.", "", "| model / batch | session.run | run_with_iobinding |",
                  "|---|---|---|"]
        lines += [f"| {k} | {r['run']:.2f} | {r['io_binding']:.2f} |" for k, r in t["io_binding"].items()]
        if t.get("spinning"):
            lines += ["", f"Thread spinning ({t['threads_for_io_binding']} threads; `RuntimeOptions.allow_spinning`): "
                      "median ms per call.", "", "| model / batch | spinning (default) | no spinning |",
                      "|---|---|---|"]
            lines += [f"| {k} | {r['spinning']:.2f} | {r['no spinning']:.2f} |" for k, r in t["spinning"].items()]
        lines.append("")
    update_section(out, "speed", "\n".join(lines))


def render_preprocess(res: Results, out: Path) -> None:
    e = res.get("preprocess")
    if not e:
        return
    sets, spec = e["value"]["sets"], e["value"]["spec"]
    lat = res.get("latency")
    lines = _head("Preprocessing cost (issue 6)", e)
    lines += [f"Per image, one thread, median: decode (OpenCV, to RGB uint8), resize to {spec['width']}x"
              f"{spec['height']} ({spec['resize']}, {spec['interpolation']}), normalise to float32 NCHW.", "",
              "| images | decode ms | resize ms | normalise ms | total ms |", "|---|---|---|---|---|"]
    for name, r in sets.items():
        lines.append(f"| {name} | {r['decode_ms']:.2f} | {r['resize_ms']:.2f} | {r['normalize_ms']:.3f} | "
                     f"{r['total_ms']:.2f} |")
    if lat:
        b1 = lat["value"]["batches"]["1"]
        ref = b1.get("ORT INT8", b1["ORT fp32"])
        name = "INT8" if "ORT INT8" in b1 else "fp32"
        worst = max(sets.values(), key=lambda r: r["total_ms"])
        lines += ["", f"Against inference: ORT {name} batch 1 takes {ref['median_ms']:.2f} ms; preprocessing a "
                  f"camera frame costs up to {worst['total_ms']:.2f} ms on one core, so the daemon's decode threads "
                  "(2 by default) keep up as long as decode + resize stays below inference x workers."]
    lines += ["", f"![preprocessing](bench/plots/{plot_preprocess(sets)})"]
    update_section(out, "preprocess", "\n".join(lines))


def render_recipe(res: Results, out: Path) -> None:
    e = res.get("recipe")
    if not e:
        return
    rows = e["value"]
    lines = _head("INT8 recipes compared (issue 6)", e)
    lines += [f"Same fp32 model, same calibration images (its training split), checked on {rows[0]['n_images']} "
              "held-out images; batch-1 latency interleaved with fp32 (median, graph optimisation 'all').", "",
              "| recipe | balanced accuracy fp32 -> INT8 | change (points) | top-1 agreement | decisions agree "
              "| INT8 ms | fp32 ms | quantise s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['bacc_fp32']:.3f} -> {r['bacc_int8']:.3f} | {100 * r['change']:+.2f} | "
                     f"{100 * r['top1_agreement']:.1f} % | {100 * r['decision_agreement']:.1f} % | "
                     f"{r['int8_ms']:.2f} | {r['fp32_ms']:.2f} | {r['quantize_s']:.0f} |")
    update_section(out, "int8-recipe", "\n".join(lines))


def render_accuracy(res: Results, out: Path) -> None:
    e = res.get("accuracy")
    if not e:
        return
    rows = e["value"]
    lines = _head("Accuracy vs labelled images per class, fp32 and INT8 (issue 6)", e)
    trained = sorted(r["trained_at"] for r in rows)  # runs are reused from the work folder: say when they ran
    lines[4] = f"Measured: runs trained {trained[0]} to {trained[-1]} (per run: section `training`)"
    lines += ["magnetic-tile, EfficientNet-Lite0 (default recipe), K labelled images per class, split as "
              "`defect train --shots K` splits them (default `validation_split` auto: with fewer than 40 "
              "images per defect class, a quarter of the good parts validate and every defect image trains; "
              "otherwise a quarter of every class); every other image is held out and scored by both the fp32 "
              "and the INT8 model (INT8 calibrated on the run's training images only).", "",
              "| shots | seeds | balanced accuracy fp32 | balanced accuracy INT8 | change (points) | top-1 agreement "
              "| within the 1-point gate | training wall time (median) |", "|---|---|---|---|---|---|---|---|"]
    for k in sorted({r["shots"] for r in rows}):
        rs = [r for r in rows if r["shots"] == k]

        def ms(key: str, scale: float = 1.0) -> str:
            vals = [r[key] * scale for r in rs]
            return f"{statistics.mean(vals):.3f} ± {statistics.pstdev(vals):.3f}" if scale == 1 else \
                f"{statistics.mean(vals):+.2f} (worst {min(vals):+.2f})"

        lines.append(f"| {k} | {len(rs)} | {ms('bacc_fp32')} | {ms('bacc_int8')} | {ms('change', 100)} | "
                     f"{100 * statistics.mean(r['top1_agreement'] for r in rs):.1f} % | "
                     f"{sum(r['within_gate'] for r in rs)}/{len(rs)} | "
                     f"{statistics.median(r['train_wall_s'] for r in rs):.0f} s |")
    classes = sorted({c for r in rows for c in r.get("held_out_per_class", {})})
    thin = [(r["shots"], c, r["held_out_per_class"].get(c, 0)) for r in rows if r.get("held_out_per_class")
            for c in classes if r["held_out_per_class"].get(c, 0) < 10]
    if thin:  # balanced accuracy averages the classes that have held-out images; say which ones are thin
        seen = sorted(set(thin))
        lines += ["", "Held-out classes with fewer than 10 images (balanced accuracy averages only the classes "
                  "present): " + "; ".join(f"{k} shots: {c} {n}" for k, c, n in seen) + "."]
    lines += ["", "Per run: " + "; ".join(f"{r['shots']}/{r['seed']}: {r['bacc_fp32']:.3f} -> {r['bacc_int8']:.3f}"
                                          for r in rows), "",
              "Reading the INT8 columns: the held-out defect classes are small (fray has 12-27 held-out images, so one "
              "image is 1-2 points of balanced accuracy), and these few-shot models sit close to a class boundary on "
              "many images: section `sensitivity` shows the fp32 model itself changing 5-14 % of its top-1 "
              "answers under +-2 grey levels of pixel noise or a mirror image, which is the size of INT8's "
              "disagreement. The export gate (`defect export --int8`) measures the change per model and refuses "
              "those that lose more than 1 point.", "",
              f"![accuracy vs shots](bench/plots/{plot_accuracy(rows)})"]
    update_section(out, "accuracy", "\n".join(lines))


def render_training(res: Results, out: Path) -> None:
    e = res.get("training")
    if not e:
        return
    rows = e["value"]
    lines = _head("Training wall time (issue 6)", e)
    lines += ["One `run_training` (data scan, feature cache, head, fine-tuning, export + parity + drift reference, "
              "report) per row; runs reused from the work folder keep the time measured when they were trained.", "",
              "| shots | seed | wall time | stages | trained at |", "|---|---|---|---|---|"]
    for r in rows:
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in (r.get("stages") or {}).items() if isinstance(v, (int, float)))
        wall = f"{r['train_wall_s']:.0f} s" if r.get("train_wall_s") is not None else "?"
        lines.append(f"| {r['shots']} | {r['seed']} | {wall} | {stages} | {r.get('trained_at', '')} |")
    update_section(out, "training", "\n".join(lines))


def render_daemon(res: Results, out: Path) -> None:
    e = res.get("daemon")
    if not e:
        return
    v = e["value"]
    lines = _head("Daemon end to end: line images and camera frames, fp32 and INT8 (issues 3, 6)", e)
    first = next(iter(v.values()))
    lines += [first["header"], "|" + "---|" * (first["header"].count("|") - 1)]
    lines += [x["row"] for x in v.values()] + [""]
    lines += [f"- {k}: `{x['command']}`: {x['summary']}" for k, x in v.items()]
    lines += ["", "Ratio: the hot folder's steady rate (row commit times after the first batch) over the fastest "
              "bare-model configuration (one ONNX Runtime call at a time on every core, or the daemon's own "
              "plan of two single-threaded calls at once). The daemon's own work per image (read, sha256, "
              "ledger lookup, JPEG decode, resize, image and drift statistics, SQLite commit, file move) runs on "
              "the same cores as the model, so on a CPU-only host the ratio is at most "
              "model CPU / (model CPU + pipeline CPU): the CPU column shows both per image."]
    update_section(out, "daemon-e2e", "\n".join(lines))


RUNNERS = {"floor": part_floor, "latency": part_latency, "tuning": part_tuning, "recipe": part_recipe,
           "preprocess": part_preprocess,
           "accuracy": part_accuracy, "training": part_training, "daemon": part_daemon}


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    res = Results(args.work / "results.json")
    cmd = "python bench/run_all.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    for part in PARTS:  # fixed order: training reads the accuracy runs
        if part in args.parts:
            t = time.perf_counter()
            res.load_at_start = speed.loadavg()
            RUNNERS[part](args, res, cmd.strip())
            say(f"{part} done in {time.perf_counter() - t:.0f} s")
    for render in (render_speed, render_recipe, render_preprocess, render_accuracy, render_training, render_daemon):
        render(res, args.out)
    say(f"wrote {args.out} and plots in {PLOTS}")


if __name__ == "__main__":
    main()
