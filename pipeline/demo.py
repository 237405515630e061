"""``defect demo``: the loop on generated line images, no data and no network needed.

Generate a labelled training set and an independent test set, fine-tune, export with the
parity check, evaluate the served ONNX model on the unseen test set, classify a few images
through the runtime, and print a summary pointing at the reports.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

from pipeline.train import Progress, TrainConfig


class DemoConfig(BaseModel):
    workdir: Path = Path("demo")
    n_per_defect: int = Field(24, ge=4)  # good parts get 3x as many, as on a real line
    image_size: int = Field(160, ge=64)
    seed: int = 0
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(img_size=160, finetune_epochs=8, feature_views=2))


@dataclass
class DemoSummary:
    run_dir: Path
    eval_dir: Path
    validation: dict
    test: dict
    timings: dict[str, float]
    predictions: list[dict] = field(default_factory=list)


def run_demo(cfg: DemoConfig, progress: Progress | None = None) -> DemoSummary:
    from pipeline.data.decode import decode_file
    from pipeline.data.folders import scan_image_folder
    from pipeline.evaluate import evaluate_to_dir
    from pipeline.run import RunConfig, run_training
    from pipeline.runtime import OnnxModel
    from pipeline.synth import generate_dataset

    wd = Path(cfg.workdir)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    train_dir, test_dir = wd / "data" / "train", wd / "data" / "test"
    generate_dataset(train_dir, n=cfg.n_per_defect, seed=cfg.seed, size=cfg.image_size)
    generate_dataset(test_dir, n=cfg.n_per_defect, seed=cfg.seed + 1000, size=cfg.image_size)
    timings["generate_s"] = time.perf_counter() - t0

    run = run_training(RunConfig(data_dir=train_dir, out_dir=wd / "run", good_class="good", train=cfg.train),
                       progress=progress)
    timings.update({f"train.{k}": v for k, v in run.timings.items()})

    t0 = time.perf_counter()
    model = OnnxModel(run.onnx_path)
    test_metrics, _, _ = evaluate_to_dir(model, scan_image_folder(test_dir), wd / "eval",
                                         title="Demo: unseen generated test set")
    timings["evaluate_s"] = time.perf_counter() - t0

    samples = [next((test_dir / c).iterdir()) for c in model.classes]
    preds = model.predict([decode_file(p) for p in samples])
    predictions = [{"path": str(p), **pr.as_dict()} for p, pr in zip(samples, preds)]
    (wd / "summary.json").write_text(json.dumps({"validation": run.metrics, "test": test_metrics,
                                                  "timings": timings}, indent=2, default=str))
    return DemoSummary(run.out_dir, wd / "eval", run.metrics, test_metrics, timings, predictions)
