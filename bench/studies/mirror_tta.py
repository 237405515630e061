"""Study: does averaging the prediction of an image and its mirror image (test-time augmentation) help?

    python bench/studies/mirror_tta.py --work /tmp/i6/bw [--runs 20/0 20/1 20/2]

Uses the accuracy benchmark's runs (``bench/run_all.py --only accuracy``): each run's fp32 ONNX model on its
held-out images, plain vs left-right mirror averaged vs left-right + up-down averaged. ONNX Runtime only.
Measured 2026-11-23 (20 shots): plain 0.782 / 0.798 / 0.793, mirror-averaged 0.792 / 0.802 / 0.798.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    from pipeline.data.decode import decode_file
    from pipeline.data.folders import scan_image_folder
    from pipeline.preprocess import preprocess
    from pipeline.runtime import OnnxModel, RuntimeOptions

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--runs", nargs="+", default=["20/0", "20/1", "20/2"])
    args = ap.parse_args()
    for r in args.runs:
        shots, seed = r.split("/")
        model = OnnxModel(args.work / f"run_s{shots}_seed{seed}" / "model.onnx",
                          options=RuntimeOptions(providers=["CPUExecutionProvider"]))
        held = scan_image_folder(args.work / f"held_out_s{shots}_seed{seed}")
        spec, classes = model.metadata.preprocess, list(model.metadata.classes)
        y = np.array([classes.index(held.classes[s.label]) for s in held.samples])
        plain, lr, ud = [], [], []
        for i in range(0, len(held.samples), 64):
            x = preprocess([decode_file(s.path, spec=spec) for s in held.samples[i:i + 64]], spec)
            plain.append(model.run(x)[0])
            lr.append(model.run(np.ascontiguousarray(x[..., ::-1]))[0])
            ud.append(model.run(np.ascontiguousarray(x[..., ::-1, :]))[0])
        p, pl, pu = map(np.concatenate, (plain, lr, ud))

        def bacc(pred: np.ndarray) -> float:
            return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))

        print(f"{r}: plain {bacc(p.argmax(1)):.3f}, mirror-averaged {bacc((p + pl).argmax(1)):.3f}, "
              f"mirror + flip {bacc((p + pl + pu).argmax(1)):.3f}", flush=True)


if __name__ == "__main__":
    main()
