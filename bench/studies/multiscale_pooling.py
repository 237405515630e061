"""Study: which frozen Lite0 features separate magnetic-tile defects? Pooling (mean / max / std) and depth
(mid-level blocks vs the head), class-balanced logistic regression, 20 shots x 3 seeds.

    python bench/studies/multiscale_pooling.py [--data ../shared/datasets/magnetic-tile/images] [--size 224]

Small defects (a blowhole, a thin crack) cover a few percent of a tile: averaging over the whole image
dilutes them, and ImageNet's top layer describes objects rather than texture. Prints mean balanced
accuracy on every image not among the shots per feature set. Needs the [train] extra (torch).
Measured 2026-11-30 (224 px / 320 px): head mean 0.771 / 0.771, head max 0.805 / 0.797, blocks 10+14
mean+max+std 0.818 / 0.818; early blocks 4+7 0.705 / 0.680.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench" / "studies"))

from frozen_features import logistic_regression  # noqa: E402

# Lite0 block outputs: 0:16 1-2:24 3-4:40 5-7:80 8-10:112 11-14:192 15:320 (channels); head 1280
TAPS = {"b4": 4, "b7": 7, "b10": 10, "b14": 14, "b15": 15}


def pooled(x, how: str):
    if how == "mean":
        return x.mean(dim=(2, 3))
    if how == "max":
        return x.amax(dim=(2, 3))
    if how == "std":
        return x.std(dim=(2, 3))
    raise ValueError(how)


def main() -> None:
    import torch
    import torch.nn.functional as F

    from pipeline.backbones import build_backbone
    from pipeline.data.decode import decode_file
    from pipeline.data.folders import sample_shots, scan_image_folder
    from pipeline.preprocess import PreprocessSpec, normalize, resize_image
    from pipeline.train import balanced_accuracy

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/datasets/magnetic-tile/images")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--shots", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_backbone("efficientnet_lite0").eval()
    spec = PreprocessSpec(height=args.size, width=args.size)
    ds = scan_image_folder(args.data)
    y = np.array([s.label for s in ds.samples])
    t = time.time()
    feats: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(ds.samples), 32):
        x = torch.from_numpy(normalize(np.stack([resize_image(decode_file(s.path, spec=spec), spec)
                                                 for s in ds.samples[i:i + 32]]), spec))
        with torch.no_grad():
            h = F.relu6(model._bn0(model._conv_stem(x)))
            for k, block in enumerate(model._blocks):
                h = block(h)
                for name, idx in TAPS.items():
                    if idx == k:
                        for how in ("mean", "max", "std"):
                            feats.setdefault(f"{name}.{how}", []).append(pooled(h, how).numpy())
            h = F.relu6(model._bn1(model._conv_head(h)))
            for how in ("mean", "max", "std"):
                feats.setdefault(f"head.{how}", []).append(pooled(h, how).numpy())
    f = {k: np.concatenate(v) for k, v in feats.items()}
    print(f"features of {len(y)} images at {args.size} px in {time.time() - t:.0f} s", flush=True)
    sets = {
        "head.mean (baseline)": ["head.mean"],
        "head.max": ["head.max"],
        "head.mean+max": ["head.mean", "head.max"],
        "b10.mean+max": ["b10.mean", "b10.max"],
        "b14.mean+max": ["b14.mean", "b14.max"],
        "b15.mean+max": ["b15.mean", "b15.max"],
        "b7+b10+b14 mean+max": ["b7.mean", "b7.max", "b10.mean", "b10.max", "b14.mean", "b14.max"],
        "b10+b14+head mean+max": ["b10.mean", "b10.max", "b14.mean", "b14.max", "head.mean", "head.max"],
        "b10+b14 mean+max+std": ["b10.mean", "b10.max", "b10.std", "b14.mean", "b14.max", "b14.std"],
        "b4+b7 mean+max+std": ["b4.mean", "b4.max", "b4.std", "b7.mean", "b7.max", "b7.std"],
    }
    splits = []
    for seed in args.seeds:
        shots, _ = sample_shots(ds, args.shots, seed)
        chosen = {s.path for s in shots.samples}
        splits.append(np.array([s.path in chosen for s in ds.samples]))
    for name, keys in sets.items():
        x = np.concatenate([f[k] for k in keys], axis=1)
        scores = [balanced_accuracy(y[~tr], logistic_regression(x[tr], y[tr], x[~tr], len(ds.classes)), len(ds.classes))
                  for tr in splits]
        print(f"{name:28s} dim {x.shape[1]:5d}: balanced accuracy {np.mean(scores):.3f} "
              f"({', '.join(f'{s:.3f}' for s in scores)})", flush=True)


if __name__ == "__main__":
    main()
