"""Study: how far does +-d grey levels of pixel noise move the *pretrained* Lite0 embedding, on magnetic-tile
images vs natural images (scikit-image's chelsea, coffee, astronaut)?

    python bench/studies/backbone_noise.py [--data ../shared/datasets/magnetic-tile/images] [--images 100]

Median cosine between clean and noisy pooled embeddings (noise drawn per element from {-d, 0, +d}).
Needs the [train] extra (torch) and scikit-image's sample images.
Measured 2026-11-23: magnetic-tile d=1 0.949, d=4 0.871; natural d=1 0.994, d=4 0.950.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    import torch
    from skimage import data as samples

    from pipeline.backbones import build_backbone
    from pipeline.data.decode import decode_file
    from pipeline.data.folders import scan_image_folder
    from pipeline.preprocess import PreprocessSpec, preprocess

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/datasets/magnetic-tile/images")
    ap.add_argument("--images", type=int, default=100)
    args = ap.parse_args()
    model = build_backbone("efficientnet_lite0").eval()
    spec = PreprocessSpec(height=224, width=224)
    files = scan_image_folder(args.data).samples
    rng = np.random.default_rng(0)
    pick = rng.choice(len(files), min(args.images, len(files)), replace=False)
    tiles = preprocess([decode_file(files[i].path, spec=spec) for i in pick], spec)
    natural = preprocess([cv2.resize(samples.chelsea(), (300, 225)), samples.coffee(), samples.astronaut()], spec)

    def embed(a: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.forward_features(torch.from_numpy(a)).numpy()

    for name, x in (("magnetic-tile", tiles), ("natural", natural)):
        clean = embed(x)
        for d in (1, 4):
            step = d / float(np.mean(spec.std))
            noisy = embed((x + rng.choice(np.array([-step, 0.0, step], np.float32), size=x.shape)).astype(np.float32))
            cos = (clean * noisy).sum(1) / (np.linalg.norm(clean, axis=1) * np.linalg.norm(noisy, axis=1))
            print(f"{name}: +-{d} grey levels -> median embedding cosine {np.median(cos):.3f}", flush=True)


if __name__ == "__main__":
    main()
