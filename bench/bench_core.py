"""Core loop on real data: few-shot magnetic-tile accuracy, training wall time, ORT vs torch latency.

    python bench/bench_core.py [--data ../shared/datasets/magnetic-tile/images] [--shots 20] [--seeds 0]
                               [--masks DIR | --no-masks]

Trains with ``shots`` labelled images per class (train + validation both come from those), evaluates the
exported ONNX model through the runtime on every other image, and times batch-1 inference of the same
model in torch eager and ONNX Runtime. Writes the ``core`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.mdsection import machine_line, update_section  # noqa: E402


def latency_ms(fn, x, repeats: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def dump_scores(path: Path, model, details, summary, cfg) -> None:
    """Held-out, validation and training probabilities (+ labels, paths) and the run's history, for offline
    threshold studies."""
    from pipeline.data.folders import scan_image_folder
    from pipeline.evaluate import evaluate_model
    from pipeline.run import split_dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"probs": details.probs, "y": details.y_true, "paths": np.array([str(p) for p in details.paths])}
    train_set, val_set, _ = split_dataset(scan_image_folder(cfg.data_dir), cfg, summary.metadata.good_class)
    for part, ds in (("train", train_set), ("val", val_set)):
        _, d = evaluate_model(model, ds)
        arrays.update({f"{part}_probs": d.probs, f"{part}_y": d.y_true})
    run_metrics = json.loads((summary.out_dir / "metrics.json").read_text())
    np.savez(path, **arrays, classes=np.array(details.classes), good_class=details.good_class,
             threshold=summary.metadata.threshold, history=json.dumps(run_metrics["history"]))


def split_threshold_goods(held_out, n: int, seed: int, tmp: Path):
    """Take ``n`` good images out of the held-out set into a folder of symlinks for ``--threshold-images``."""
    import random

    goods = [s for s in held_out.samples if held_out.classes[s.label] == "free"]
    random.Random(seed + 1).shuffle(goods)
    picked = goods[:n]
    folder = tmp / "threshold_goods"
    folder.mkdir()
    for s in picked:
        (folder / s.path.name).symlink_to(s.path.resolve())
    chosen = {s.path for s in picked}
    return held_out.subset([s for s in held_out.samples if s.path not in chosen]), folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets/magnetic-tile/images")
    ap.add_argument("--shots", type=int, default=20)
    ap.add_argument("--good-shots", type=int, default=None,
                    help="labelled good images (`defect train --good-shots`; default: --shots)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    ap.add_argument("--config", type=json.loads, default={}, help="TrainConfig overrides as JSON")
    ap.add_argument("--dump", type=Path, default=None,
                    help="also save held-out and validation scores per seed (scores_seed<N>.npz) in this folder")
    ap.add_argument("--val-fraction", type=float, default=0.25,
                    help="share of the labelled shots held back for validation and the threshold")
    ap.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency measurement")
    ap.add_argument("--masks", type=Path, default=None,
                    help="defect pixel masks mirroring --data (default: the dataset's masks/ beside images/, if any)")
    ap.add_argument("--no-masks", action="store_true", help="train without pixel masks")
    ap.add_argument("--threshold-goods", type=int, default=0,
                    help="also give the run N good images from outside the shots for its threshold "
                         "(`defect train --threshold-images`); they are then not evaluated")
    args = ap.parse_args()
    masks = None if args.no_masks else (args.masks or args.data.parent / "masks")
    if masks is not None and not masks.is_dir():
        if args.masks:
            ap.error(f"--masks {masks}: no such folder")
        masks = None

    import torch

    from pipeline.data.folders import sample_shots, scan_image_folder
    from pipeline.evaluate import evaluate_model
    from pipeline.run import RunConfig, run_training
    from pipeline.runtime import OnnxModel, RuntimeOptions
    from pipeline.train import ExportModule, TrainConfig

    rows, lat = [], None
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            _, held_out = sample_shots(scan_image_folder(args.data), args.shots, seed,
                                       {"free": args.good_shots} if args.good_shots else None)
            threshold_dir = None
            if args.threshold_goods:
                held_out, threshold_dir = split_threshold_goods(held_out, args.threshold_goods, seed, Path(tmp))
            cfg = RunConfig(data_dir=args.data, out_dir=Path(tmp) / "run", shots=args.shots, good_class="free",
                            good_shots=args.good_shots,
                            val_fraction=args.val_fraction, masks_dir=masks, threshold_dir=threshold_dir,
                            train=TrainConfig(seed=seed, **args.config))
            t = time.perf_counter()
            s = run_training(cfg)
            wall = time.perf_counter() - t
            model = OnnxModel(s.onnx_path)
            m, details = evaluate_model(model, held_out)
            if args.dump:
                dump_scores(args.dump / f"scores_seed{seed}.npz", model, details, s, cfg)
            rows.append({"seed": seed, "balanced_accuracy": m["balanced_accuracy"],
                         "defect_recall_at_frr": m["defect_recall_at_frr"], "false_reject_rate": m["false_reject_rate"],
                         "oracle_recall_at_2pct": m.get("defect_recall_at_target_frr_oracle"),
                         "auroc": m.get("auroc"), "n_images": m["n_images"], "train_wall_s": wall,
                         "timings": s.timings, "per_class": {k: v["recall"] for k, v in m["per_class"].items()},
                         "head": s.metadata.head})
            print(json.dumps(rows[-1]), flush=True)
            if lat is None and not args.no_latency:
                from pipeline.train import classifier_for, load_checkpoint

                clf = classifier_for(s.metadata)
                clf.load_state_dict(load_checkpoint(Path(tmp) / "run" / "checkpoint.npz"))
                eager = ExportModule(clf).eval()
                spec = s.metadata.preprocess
                x = np.random.default_rng(0).normal(size=(1, 3, spec.height, spec.width)).astype(np.float32)
                xt = torch.from_numpy(x)
                with torch.inference_mode():
                    t_torch = latency_ms(lambda v: eager(v), xt)
                ort_model = OnnxModel(s.onnx_path, options=RuntimeOptions(providers=["CPUExecutionProvider"]))
                t_ort = latency_ms(ort_model.run, x)
                lat = {"torch_eager_ms": t_torch, "ort_fp32_ms": t_ort, "size": spec.height,
                       "threads": torch.get_num_threads()}
                print(json.dumps(lat), flush=True)

    cmd = "python bench/bench_core.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    mean = lambda k: statistics.mean(r[k] for r in rows)  # noqa: E731
    lines = [
        "## Core loop on magnetic-tile (issue 2)", "",
        f"Command: `{cmd}`  ", f"Machine: {machine_line()}", "",
        f"{args.shots} labelled images per class"
        + (f" ({args.good_shots} of the good class)" if args.good_shots else "")
        + f", split as `defect train --shots {args.shots}"
        + (f" --good-shots {args.good_shots}" if args.good_shots else "") + "` splits them (default "
        f"`validation_split` auto: where defect images are scarce a quarter of the good parts validate the threshold "
        f"and every defect image trains), "
        "evaluated through ONNX Runtime on all other images (held out"
        + (f", less {args.threshold_goods} good images given to the run for its threshold" if args.threshold_goods else "")
        + "). "
        f"Classifier head: {rows[0]['head']}; pixel masks of the labelled defect images: "
        f"{'yes (' + str(masks) + ')' if masks else 'none'}.", "",
        "| seed | balanced accuracy | defect recall at model threshold | false-reject rate | oracle recall at 2 % FRR | AUROC | held-out images | training wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['balanced_accuracy']:.3f} | {r['defect_recall_at_frr']:.3f} | "
                     f"{r['false_reject_rate']:.3f} | {r['oracle_recall_at_2pct'] or float('nan'):.3f} | "
                     f"{r['auroc'] or float('nan'):.3f} | {r['n_images']} | {r['train_wall_s']:.0f} s |")
    if len(rows) > 1:
        lines.append(f"| mean | {mean('balanced_accuracy'):.3f} | {mean('defect_recall_at_frr'):.3f} | "
                     f"{mean('false_reject_rate'):.3f} | | | | {mean('train_wall_s'):.0f} s |")
    recall = lambda v: "none held out" if v is None else f"{v:.2f}"  # noqa: E731 (fray has 32 images: 50 shots take all)
    lines += ["", "Per-class recall (first seed): " + ", ".join(f"{k} {recall(v)}" for k, v in rows[0]["per_class"].items()),
              "", "Stage timings (first seed): " + ", ".join(f"{k} {v:.1f} s" for k, v in rows[0]["timings"].items())]
    if lat:
        lines += ["", f"Batch-1 latency at {lat['size']}x{lat['size']} ({lat['threads']} threads, median of 30 after "
                  f"5 warm-up): torch eager {lat['torch_eager_ms']:.1f} ms, ONNX Runtime fp32 {lat['ort_fp32_ms']:.1f} ms "
                  f"({lat['torch_eager_ms'] / lat['ort_fp32_ms']:.2f}x)."]
    update_section(args.out, "core", "\n".join(lines))


if __name__ == "__main__":
    main()
