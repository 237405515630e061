"""The closed-loop demo as a measurement: drift alarm -> re-adaptation -> gate -> promotion -> hot-swap.

    python bench/bench_demo.py [--workdir runs/demo]

Runs ``defect demo`` (``pipeline.demo.run_demo``, default configuration) and writes the ``demo`` section of
BENCHMARKS.md: images from the lamp change to the alarm, the gate's verdict, the alarm -> promotion and
alarm -> new-model-serving wall times (target: 10 minutes on 2 CPU cores), and accuracy before and after.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.mdsection import machine_line, update_section  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    ap.add_argument("--note", default="", help="a line about the conditions (e.g. machine load)")
    args = ap.parse_args(argv)

    from pipeline.demo import DemoConfig, run_demo
    from pipeline.offline import apply_offline_defaults

    apply_offline_defaults()

    cfg = DemoConfig(workdir=args.workdir, seed=args.seed)
    load_before = os.getloadavg()[0]
    s = run_demo(cfg, say=lambda msg: print(f"[demo] {msg}", flush=True))
    load = f"load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after the run"
    cmd = " ".join(["python bench/bench_demo.py", *(shlex.quote(a) for a in (argv or sys.argv[1:]))])
    t = s.timings
    fmt = lambda v: "-" if v is None else f"{v:.0f} s"  # noqa: E731
    ok = s.alarm_to_swap_s is not None and s.alarm_to_swap_s <= cfg.target_alarm_to_swap_s
    lines = ["## Closed-loop demo (issue 5)", "", f"Command: `{cmd}` (what `make demo` runs, in its own folder)  ",
             f"Machine: {machine_line()}; {load}  ", *([args.note] if args.note else []), "",
             f"Generated line images at {cfg.image_size} px; version 1 trained on the normal exposure; the lamp changes "
             f"(exposure {cfg.normal_exposure} -> {cfg.shifted_exposure}) after {cfg.stream_in_domain} parts; the operator "
             f"has labelled {cfg.labelled_per_class} new-lamp images per defect class ({3 * cfg.labelled_per_class} good).",
             "", "| step | result |", "|---|---|",
             f"| images from the lamp change to the drift alarm | {s.images_to_alarm} |",
             f"| re-adaptation (readapt flow, supervised) | {s.v2} {'promoted' if s.promoted else 'NOT promoted'} over {s.v1} |",
             f"| gate | {'; '.join(s.gate_reasons)} |",
             f"| alarm -> promotion | {fmt(s.alarm_to_promotion_s)} |",
             f"| alarm -> daemon serving the new model | **{fmt(s.alarm_to_swap_s)}** (target <= "
             f"{cfg.target_alarm_to_swap_s:.0f} s: {'met' if ok else 'NOT met'}) |",
             f"| drift alarms of the new model on the new lamp | {s.alarms_after_swap} |",
             f"| images streamed / with exactly one result | {s.n_streamed} / {s.n_results} |",
             f"| replayed champion images | {(s.adaptation or {}).get('replay', {}).get('replayed', '-')} |",
             "", "| model | balanced accuracy | defect recall at threshold | false-reject rate | images |",
             "|---|---|---|---|---|"]
    for name, m in s.metrics.items():
        lines.append(f"| {name} | {m['balanced_accuracy']:.3f} | {m['defect_recall_at_frr']:.3f} | "
                     f"{m['false_reject_rate']:.3f} | {m['n_images']} |")
    lines += ["", "Times: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items())]
    update_section(args.out, "demo", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
