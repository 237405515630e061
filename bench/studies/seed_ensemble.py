"""Study: how far apart are models trained on the same few shots, and what does averaging them buy?

    python bench/studies/seed_ensemble.py [--split-seed 0] [--seeds 0 1 2] [--work /tmp/seed-ensemble]

One 20-shot split (``defect train --shots 20 --masks`` with ``--seed SPLIT_SEED`` splits it), trained once per
training seed (the split stays fixed); each model's probabilities on the held-out images (torch, the
training-side scores) are kept in ``--work`` and reused; then every member's and the averaged ensembles'
metrics (``classification_metrics``: balanced accuracy, AUROC, oracle recall at 2 % false rejects).
Measured 2026-11-30 (BENCHMARKS core): members oracle recall 0.534 / 0.589 / 0.562, the mean of three 0.644.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "datasets" / "magnetic-tile" / "images"


def main() -> None:
    import torch

    from pipeline.data.augment import load_images
    from pipeline.data.folders import scan_image_folder
    from pipeline.evaluate.metrics import classification_metrics
    from pipeline.run import RunConfig, split_dataset
    from pipeline.train import TrainConfig, embed, train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (one model each)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/seed-ensemble"))
    args = ap.parse_args()
    masks = args.data.parent / "masks"
    split = RunConfig(data_dir=args.data, out_dir=args.work, shots=20, good_class="free", masks_dir=masks,
                      train=TrainConfig(seed=args.split_seed))
    train_set, val_set, held = split_dataset(scan_image_folder(args.data), split, "free")
    spec = split.train.preprocess_spec()
    x_held, y_held, _ = load_images(held, spec)
    args.work.mkdir(parents=True, exist_ok=True)

    def report(name: str, probs: np.ndarray) -> None:
        m = classification_metrics(y_held.numpy(), probs, list(held.classes), "free")
        print(json.dumps({"model": name, "balanced_accuracy": round(m["balanced_accuracy"], 3),
                          "auroc": round(m["auroc"], 3),
                          "oracle_recall_at_2pct": round(m["defect_recall_at_target_frr_oracle"], 3)}), flush=True)

    members = []
    for seed in args.seeds:
        path = args.work / f"probs_split{args.split_seed}_seed{seed}.npy"
        if not path.exists():
            result = train(train_set, val_set, "free", TrainConfig(seed=seed), masks_dir=masks)
            np.save(path, embed(result.model, x_held, result.spec, torch.device("cpu"))[1])
        members.append(np.load(path))
        report(f"seed {seed}", members[-1])
    for k in range(2, len(members) + 1):
        report(f"mean of seeds {args.seeds[:k]}", np.mean(members[:k], axis=0))


if __name__ == "__main__":
    main()
