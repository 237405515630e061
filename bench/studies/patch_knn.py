"""Study: does nearest-neighbour patch scoring against the good shots (PatchCore-style, no defect labels)
separate magnetic-tile defects better than the fine-tuned classifier?

    python bench/studies/patch_knn.py [--data ../shared/datasets/magnetic-tile/images] [--blocks 4 10]

Frozen Lite0 features of two blocks (3x3 neighbourhood-averaged, the coarser one upsampled to the finer
grid) describe every patch; the memory bank is every patch of the good shots (15 or 20 images); an
image's score is its patch farthest from any good patch. Prints AUROC and defect recall at 2 % false
rejects (threshold on the held-out good images: an oracle) per seed. Needs the [train] extra (torch).
Measured 2026-11-30, blocks 4+10, 224 px: AUROC 0.80-0.84, oracle recall 0.22-0.28 (the classifier: AUROC
0.89-0.94): with 15-20 good tiles over six exposures, unseen good tiles have patches no good shot has.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    import torch
    import torch.nn.functional as F

    from pipeline.backbones import build_backbone
    from pipeline.data.decode import decode_file
    from pipeline.data.folders import sample_shots, scan_image_folder
    from pipeline.evaluate.metrics import binary_curve
    from pipeline.preprocess import PreprocessSpec, normalize, resize_image

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/datasets/magnetic-tile/images")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--blocks", type=int, nargs=2, default=[4, 10], help="two Lite0 block indices (0-15)")
    ap.add_argument("--shots", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    model = build_backbone("efficientnet_lite0").eval()
    spec = PreprocessSpec(height=args.size, width=args.size)
    ds = scan_image_folder(args.data)
    good = ds.classes.index("free")
    y = np.array([s.label for s in ds.samples])
    t = time.time()
    parts = []
    for i in range(0, len(ds.samples), 32):
        x = torch.from_numpy(normalize(np.stack([resize_image(decode_file(s.path, spec=spec), spec)
                                                 for s in ds.samples[i:i + 32]]), spec))
        with torch.no_grad():
            h = F.relu6(model._bn0(model._conv_stem(x)))
            taps = []
            for k, block in enumerate(model._blocks):
                h = block(h)
                if k in args.blocks:
                    taps.append(F.avg_pool2d(h, 3, 1, 1))
            grid = taps[0].shape[-2:]
            taps = [tp if tp.shape[-2:] == grid else F.interpolate(tp, size=grid, mode="bilinear", align_corners=False)
                    for tp in taps]
            f = torch.cat(taps, 1)
            parts.append(f.permute(0, 2, 3, 1).reshape(f.shape[0], -1, f.shape[1]).half())
    patches = torch.cat(parts)
    print(f"patch features {tuple(patches.shape)} in {time.time() - t:.0f} s", flush=True)
    index = {s.path: i for i, s in enumerate(ds.samples)}
    for seed in args.seeds:
        shots, held = sample_shots(ds, args.shots, seed)
        bank_images = [index[s.path] for s in shots.samples if s.label == good]
        test = np.array([index[s.path] for s in held.samples])
        for n_good in sorted({args.shots * 3 // 4, args.shots}):
            bank = patches[bank_images[:n_good]].float().reshape(-1, patches.shape[-1])
            scores = np.concatenate([
                torch.cdist(patches[test[i:i + 16]].float().reshape(-1, bank.shape[1]), bank).amin(1)
                .reshape(len(test[i:i + 16]), -1).amax(1).numpy() for i in range(0, len(test), 16)])
            is_defect = y[test] != good
            threshold = np.quantile(scores[~is_defect], 0.98)
            auroc = binary_curve(scores, is_defect)["auroc"]
            print(f"seed {seed}, {n_good} good shots in the bank: AUROC {auroc:.3f}, "
                  f"oracle recall at 2 % FRR {(scores[is_defect] > threshold).mean():.3f}", flush=True)


if __name__ == "__main__":
    main()
