"""How much do a model's predictions move under pixel noise, a flip, and INT8? (Context for INT8 agreement.)

    python bench/sensitivity.py --work /tmp/i6/bw [--runs 20/0 20/1 50/0] [--images 300] [--out BENCHMARKS.md]

For each accuracy-benchmark run (``bench/run_all.py --only accuracy`` leaves ``run_s{K}_seed{S}`` and
``held_out_s{K}_seed{S}`` in its work folder), a seeded sample of held-out images is scored by the fp32
model as is, with every pixel moved by -d/0/+d grey levels at random (d = 1, 2, 4; all channels alike), mirrored left-right,
and by the INT8 model. Top-1 agreement with the unperturbed fp32 prediction and the median cosine of the
embeddings say whether INT8's disagreement is a quantisation problem or the model's own sensitivity.
No torch: ONNX Runtime and the shared numpy preprocessing only.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.mdsection import machine_line, update_section  # noqa: E402


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    c = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(np.median(c))


def sensitivity(run: Path, held: Path, n_images: int, seed: int = 0) -> dict[str, tuple[float, float]]:
    """{perturbation: (top-1 agreement with clean fp32, median embedding cosine)} on ``n_images`` held-out images."""
    from pipeline.data.decode import decode_file
    from pipeline.data.folders import scan_image_folder
    from pipeline.preprocess import preprocess
    from pipeline.runtime import OnnxModel, RuntimeOptions

    opts = RuntimeOptions(providers=["CPUExecutionProvider"])
    ref = OnnxModel(run / "model.onnx", options=opts)
    spec = ref.metadata.preprocess
    samples = scan_image_folder(held).samples
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(samples), min(n_images, len(samples)), replace=False)
    x = preprocess([decode_file(samples[i].path, spec=spec) for i in pick], spec)
    p0, e0 = ref.run(x)
    out: dict[str, tuple[float, float]] = {}

    def record(name: str, probs: np.ndarray, emb: np.ndarray) -> None:
        out[name] = (float((probs.argmax(1) == p0.argmax(1)).mean()), _cos(e0, emb))

    step = 1.0 / float(np.mean(spec.std))  # one grey level in model-input units
    for d in (1, 2, 4):
        levels = np.array([-d * step, 0.0, d * step], np.float32)  # same offset in all channels, as a mono camera
        noisy = (x + rng.choice(levels, size=(x.shape[0], 1, *x.shape[2:]))).astype(np.float32)
        record(f"±{d} grey level noise", *ref.run(noisy))
    record("left-right mirror", *ref.run(np.ascontiguousarray(x[..., ::-1])))
    int8 = run / "model.int8.onnx"
    if int8.is_file():
        q = OnnxModel(int8, metadata=ref.metadata.model_copy(update={"onnx_sha256": None}), options=opts)
        record("INT8 model", *q.run(x))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="bench/run_all.py's work folder (accuracy runs)")
    ap.add_argument("--runs", nargs="+", default=["10/1", "20/0", "20/1", "50/0"], help="SHOTS/SEED of each run")
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = ap.parse_args(argv)
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    for r in args.runs:
        shots, seed = r.split("/")
        run, held = args.work / f"run_s{shots}_seed{seed}", args.work / f"held_out_s{shots}_seed{seed}"
        if not (run / "model.onnx").is_file() or not held.is_dir():
            raise SystemExit(f"{run} or {held} missing: run `python bench/run_all.py --only accuracy` first")
        rows[r] = sensitivity(run, held, args.images)
        print(r, rows[r], flush=True)
    kinds = list(next(iter(rows.values())))
    cmd = "python bench/sensitivity.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = ["## Prediction sensitivity: pixel noise, mirror, INT8 (issue 6)", "", f"Command: `{cmd}`  ",
             f"Machine: {machine_line()}", "",
             f"{args.images} held-out magnetic-tile images per run (runs of the accuracy benchmark: shots/seed). "
             "Each cell: top-1 agreement with the unperturbed fp32 prediction / median cosine of the embeddings.", "",
             "| run | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for r, res in rows.items():
        lines.append(f"| {r} | " + " | ".join(f"{100 * a:.1f} % / {c:.3f}" for a, c in res.values()) + " |")
    update_section(args.out, "sensitivity", "\n".join(lines))
    print(f"wrote section 'sensitivity' of {args.out}")


if __name__ == "__main__":
    main()
