"""Study: frozen EfficientNet-Lite0 features + class-balanced logistic regression on magnetic-tile, 20 shots x 3 seeds,
with and without a Gaussian blur before the backbone (is fine texture signal or noise?).

    python bench/studies/frozen_features.py [--data ../shared/datasets/magnetic-tile/images] [--variants base blur0.8]

Prints mean balanced accuracy on every image not among the shots. Needs the [train] extra (torch).
Measured 2026-11-23: base 0.771 (0.792, 0.772, 0.748); blur0.8 0.737 (0.741, 0.727, 0.741).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

VARIANTS = {"base": None, "blur0.8": 0.8, "blur1.5": 1.5}


def logistic_regression(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, n_classes: int) -> np.ndarray:
    """L2-regularised, class-weighted multinomial logistic regression (LBFGS) on standardised features."""
    import torch

    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xt = torch.tensor((xtr - mu) / sd, dtype=torch.float32)
    xe = torch.tensor((xte - mu) / sd, dtype=torch.float32)
    yt = torch.tensor(ytr)
    w = torch.tensor(1.0 / np.bincount(ytr, minlength=n_classes), dtype=torch.float32)
    w = w / w.sum() * n_classes
    lin = torch.nn.Linear(xt.shape[1], n_classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=300)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xt), yt, weight=w) + 1e-2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return lin(xe).argmax(1).numpy()


def main() -> None:
    import torch

    from pipeline.backbones import build_backbone
    from pipeline.data.decode import decode_file
    from pipeline.data.folders import sample_shots, scan_image_folder
    from pipeline.preprocess import PreprocessSpec, normalize, resize_image
    from pipeline.train import balanced_accuracy

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/datasets/magnetic-tile/images")
    ap.add_argument("--variants", nargs="+", default=["base", "blur0.8"], choices=list(VARIANTS))
    ap.add_argument("--shots", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    model = build_backbone("efficientnet_lite0").eval()
    spec = PreprocessSpec(height=224, width=224)
    ds = scan_image_folder(args.data)
    raw = [decode_file(s.path) for s in ds.samples]
    y = np.array([s.label for s in ds.samples])
    for name in args.variants:
        sigma = VARIANTS[name]
        t = time.time()

        def prep(im: np.ndarray) -> np.ndarray:
            x = resize_image(im, spec)
            return cv2.GaussianBlur(x, (0, 0), sigma) if sigma else x

        feats = []
        for i in range(0, len(raw), 32):
            with torch.no_grad():
                feats.append(model.forward_features(torch.from_numpy(
                    normalize(np.stack([prep(im) for im in raw[i:i + 32]]), spec))).numpy())
        f = np.concatenate(feats)
        scores = []
        for seed in args.seeds:
            shots, _ = sample_shots(ds, args.shots, seed)
            chosen = {s.path for s in shots.samples}
            tr = np.array([s.path in chosen for s in ds.samples])
            pred = logistic_regression(f[tr], y[tr], f[~tr], len(ds.classes))
            scores.append(balanced_accuracy(y[~tr], pred, len(ds.classes)))
        print(f"{name}: balanced accuracy {np.mean(scores):.3f} ({', '.join(f'{s:.3f}' for s in scores)}) "
              f"[{time.time() - t:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
