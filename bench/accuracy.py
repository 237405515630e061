"""Accuracy vs labelled images per class on magnetic-tile, fp32 and INT8, with training wall time.

Library for ``bench/run_all.py``. One run per (shots, seed): ``run_training`` on K labelled images per
class (split as ``defect train --shots K`` splits them: ``RunConfig.validation_split``), then fp32 and INT8 (quantised on the
run's training images) evaluated side by side on every other image of the dataset (held out).
Run folders are kept under the work folder and reused when complete, so parts can be re-run cheaply.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

GOOD_CLASS = "free"


def held_out_folder(data: Path, shots: int, seed: int, work: Path) -> Path:
    """The images not among the K shots, as a labelled folder of symlinks (the data is not copied)."""
    from pipeline.data.folders import sample_shots, scan_image_folder

    out = work / f"held_out_s{shots}_seed{seed}"
    if out.is_dir():
        return out
    _, rest = sample_shots(scan_image_folder(data), shots, seed)
    tmp = out.with_name(out.name + ".tmp")
    for s in rest.samples:
        dst = tmp / rest.classes[s.label] / s.path.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            dst.symlink_to(s.path.resolve())
    tmp.rename(out)
    return out


def held_out_counts(held: Path) -> dict[str, int]:
    """Images per class in a held-out folder (a class with fewer images than K has none left to test)."""
    return {d.name: sum(1 for _ in d.iterdir()) for d in sorted(held.iterdir()) if d.is_dir()}


def trained_run(data: Path, shots: int, seed: int, work: Path, fresh: bool = False) -> tuple[Path, dict[str, Any]]:
    """A complete run folder for (shots, seed), trained now or reused; returns it and its timings."""
    from pipeline.run import RunConfig, run_training
    from pipeline.train import TrainConfig

    run = work / f"run_s{shots}_seed{seed}"
    done = run / "bench_timing.json"
    if done.is_file() and (run / "model.onnx").is_file() and not fresh:
        return run, json.loads(done.read_text())
    t = time.perf_counter()
    summary = run_training(RunConfig(data_dir=data, out_dir=run, shots=shots, good_class=GOOD_CLASS,
                                     train=TrainConfig(seed=seed)))
    timing = {"wall_s": time.perf_counter() - t, "stages": summary.timings, "trained_at": time.strftime("%F %T"),
              "counts": summary.counts}
    done.write_text(json.dumps(timing, indent=1))
    return run, timing


def int8_for_run(run: Path, held: Path, fresh: bool = False) -> dict[str, Any]:
    """Quantise the run's model (calibrated on its training images) and compare with fp32 on ``held``.

    The benchmark records the change whatever it is (``max_drop`` 100 %), and says whether the export
    gate (1 point) would have published it.
    """
    from pipeline.export.precision import MAX_BALANCED_ACCURACY_DROP, export_int8

    report_file = run / "bench_int8.json"
    if report_file.is_file() and (run / "model.int8.onnx").is_file() and not fresh:
        return json.loads(report_file.read_text())
    t = time.perf_counter()
    res = export_int8(run, check_dir=held, max_drop=1.0)
    report = {**res.report, "export_s": time.perf_counter() - t,
              "within_gate": -res.report["balanced_accuracy_change"] <= MAX_BALANCED_ACCURACY_DROP + 1e-9}
    report_file.write_text(json.dumps(report, indent=1))
    return report


def accuracy_runs(data: Path, shots_list: list[int], seeds: list[int], work: Path, fresh: bool = False,
                  log=print) -> list[dict[str, Any]]:
    rows = []
    for shots in shots_list:
        for seed in seeds:
            run, timing = trained_run(data, shots, seed, work, fresh)
            held = held_out_folder(data, shots, seed, work)
            rep = int8_for_run(run, held, fresh)
            row = {"shots": shots, "seed": seed, "bacc_fp32": rep["balanced_accuracy_fp32"],
                   "bacc_int8": rep["balanced_accuracy"], "change": rep["balanced_accuracy_change"],
                   "top1_agreement": rep["top1_agreement"], "within_gate": rep["within_gate"],
                   "n_held_out": rep["n_images"], "held_out_per_class": held_out_counts(held),
                   "train_wall_s": timing["wall_s"], "stages": timing["stages"],
                   "int8_export_s": rep["export_s"], "trained_at": timing["trained_at"]}
            log(json.dumps(row))
            rows.append(row)
    return rows


RECIPES = {
    "default (MinMax, per-channel, head fp32)": {},
    "reduce_range": {"reduce_range": True},
    "head quantised too": {"keep_head_fp32": False},
    "Percentile 99.999": {"calibrate_method": "percentile"},
    "Entropy": {"calibrate_method": "entropy"},
    "per-tensor weights": {"per_channel": False},
}


def quant_recipes(run: Path, held: Path, names: list[str], threads: int, work: Path) -> list[dict[str, Any]]:
    """Each quantisation recipe on the same model: balanced-accuracy change and agreement on ``held``,
    batch-1 latency against fp32 (interleaved), quantisation time. Models are written under ``work``."""
    import numpy as np

    from bench.speed import interleaved_latency, ort_runner, ort_session
    from pipeline.data.folders import scan_image_folder
    from pipeline.export.calibration import balanced_pick, calibration_batch, manifest_split
    from pipeline.export.compare import compare_models
    from pipeline.export.quantize import QuantConfig, quantize_int8
    from pipeline.runtime import OnnxModel, RuntimeOptions

    opts = RuntimeOptions(providers=["CPUExecutionProvider"])
    ref = OnnxModel(run / "model.onnx", options=opts)
    dataset = scan_image_folder(held)
    train = manifest_split(run, "train", ref.classes)
    rows = []
    for name in names:
        cfg = QuantConfig(**RECIPES[name])
        cal = calibration_batch(balanced_pick(train, cfg.max_images, cfg.seed), ref.metadata.preprocess,
                                cfg.max_images)
        out = work / f"recipe_{len(rows)}.onnx"
        t = time.perf_counter()
        quantize_int8(run / "model.onnx", out, cal, cfg)
        quant_s = time.perf_counter() - t
        cand = OnnxModel(out, metadata=ref.metadata.model_copy(update={"onnx_sha256": None}), options=opts)
        rep = compare_models(ref, cand, dataset, "int8", "held-out", 0.01)
        x = np.zeros((1, 3, ref.metadata.preprocess.height, ref.metadata.preprocess.width), np.float32)
        lat = interleaved_latency({"fp32": ort_runner(ort_session(run / "model.onnx", threads)),
                                   "int8": ort_runner(ort_session(out, threads))}, x, 40, 8, 4)
        rows.append({"recipe": name, "config": cfg.model_dump(), "n_images": rep.n_images,
                     "bacc_fp32": rep.balanced_accuracy_fp32, "bacc_int8": rep.balanced_accuracy,
                     "change": rep.balanced_accuracy_change, "top1_agreement": rep.top1_agreement,
                     "decision_agreement": rep.decision_agreement, "quantize_s": quant_s,
                     "fp32_ms": lat["fp32"]["median_ms"], "int8_ms": lat["int8"]["median_ms"]})
        out.unlink(missing_ok=True)
    return rows
