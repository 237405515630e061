"""Detection delay vs false-alarm rate for every drift detector.

Synthetic mode (default) draws embeddings from a known model of a pooled CNN embedding
(low-rank latent factors with decaying variance + isotropic noise, two classes), image
statistics driven partly by the same latents, and class probabilities, then:

1. fits a reference (``fit_reference``) on in-domain samples;
2. streams fresh in-domain images through ``DriftMonitor`` and counts alarm *episodes* per
   10k images for each detector (the false-alarm rate the daemon would see);
3. streams ``--warmup`` in-domain images followed by shifted ones and records, per detector,
   how many shifted images it takes to open an episode (the detection delay).

Real mode: ``--model M.onnx --in-domain DIR --shifted DIR`` (with optional ``--in-glob`` /
``--shift-glob`` filename filters, e.g. ``'exp[12]_*'`` and ``'exp[56]_*'`` for magnetic-tile)
computes features with the model; two thirds of the in-domain images fit the reference, the
remaining third (never seen by the reference) is resampled with replacement into the
in-domain streams, and shifted streams are resampled from the shifted folder. Features can
also be given as ``.npz`` files with arrays ``embeddings``, ``image_stats``, ``probs``
(``--in-npz``, ``--shift-npz``).

    python bench/drift_synthetic.py                 # ~1-2 minutes on 2 cores
    python bench/drift_synthetic.py --quick         # smaller, for a smoke run

Reading real-mode false-alarm numbers: the in-domain stream resamples a finite held-out set,
whose own sampling error makes windows look a little more shifted than fresh images would,
so the measured rate is pessimistic (most for ``mean_shift``; see pipeline/drift/reference.py).
Use as many held-out in-domain images as you can.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.drift import DETECTORS, DriftMonitor, DriftReference, EpisodeTracker, fit_reference  # noqa: E402
from pipeline.drift.stats import IMAGE_STAT_NAMES  # noqa: E402

Source = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


# ------------------------------------------------------------------------------ synthetic world


@dataclass
class SyntheticWorld:
    """Embeddings e = A f + noise, f latent (L dims, decaying sd); class 1 (defect) shifts f.

    Image statistics are an affine function of a 'brightness' latent b (which also moves
    embedding factor 0, as brightness does in a real CNN) plus independent noise. Probabilities
    come from a logistic model of the latents, so predictions follow the class mix.
    """

    dim: int = 1280
    latent: int = 32
    noise: float = 0.15
    defect_rate: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        q, _ = np.linalg.qr(rng.normal(size=(self.dim, self.latent + 8)))
        self.mix = q[:, : self.latent].T * 1.0                # (L, D) orthonormal rows
        self.outside = q[:, self.latent:].T                    # directions no latent uses
        self.sd = np.geomspace(3.0, 0.3, self.latent)
        self.defect_shift = np.zeros(self.latent)
        self.defect_shift[[1, 5, 9]] = [2.0, -1.5, 1.0]
        self.stat_load = rng.normal(size=len(IMAGE_STAT_NAMES)) * 0.8
        self.stat_noise = 0.5 + rng.random(len(IMAGE_STAT_NAMES))

    def sample(self, rng: np.random.Generator, n: int, *, mean_shift: np.ndarray | None = None,
               scale: float = 1.0, outside: float = 0.0, brightness: float = 0.0,
               defect_rate: float | None = None, stats_only_brightness: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rate = self.defect_rate if defect_rate is None else defect_rate
        y = rng.random(n) < rate
        f = rng.normal(size=(n, self.latent)) * self.sd * scale
        f += y[:, None] * self.defect_shift
        b = rng.normal(size=n) + brightness
        if not stats_only_brightness:
            f[:, 0] += 0.8 * (b - 0.0)
        if mean_shift is not None:
            f += mean_shift * self.sd
        e = f @ self.mix + rng.normal(size=(n, self.dim)) * self.noise
        if outside:
            e += outside * self.outside[0]
        stats = b[:, None] * self.stat_load + rng.normal(size=(n, len(IMAGE_STAT_NAMES))) * self.stat_noise
        logit = 1.2 * (f[:, 1] - 1.5 * f[:, 5]) / 3.0 - 2.0
        p1 = 1.0 / (1.0 + np.exp(-logit))
        probs = np.stack([1 - p1, p1], axis=1)
        return e.astype(np.float32), stats, probs


def synthetic_scenarios(world: SyntheticWorld) -> dict[str, Source]:
    def shift(idx: list[int], size: float) -> np.ndarray:
        v = np.zeros(world.latent)
        v[idx] = size
        return v

    return {
        "mean 1sd x3 top": lambda r, n: world.sample(r, n, mean_shift=shift([2, 3, 4], 1.0)),
        "mean 0.5sd x3 top": lambda r, n: world.sample(r, n, mean_shift=shift([2, 3, 4], 0.5)),
        "mean 1sd x3 minor": lambda r, n: world.sample(r, n, mean_shift=shift([20, 25, 30], 1.0)),
        "scale x1.5": lambda r, n: world.sample(r, n, scale=1.5),
        "new direction": lambda r, n: world.sample(r, n, outside=world.noise * 12),
        "brightness +1sd": lambda r, n: world.sample(r, n, brightness=1.0),
        "stats-only bright +1sd": lambda r, n: world.sample(r, n, brightness=1.0, stats_only_brightness=True),
        "defect rate 10->40%": lambda r, n: world.sample(r, n, defect_rate=0.4),
    }


# ------------------------------------------------------------------------------ real features


def resample_source(emb: np.ndarray, stats: np.ndarray, probs: np.ndarray) -> Source:
    def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        i = rng.integers(0, len(emb), n)
        return emb[i], stats[i], probs[i]
    return draw


def features_from_folder(model_path: str, folder: str, pattern: str | None) -> tuple[np.ndarray, ...]:
    from pipeline.data.decode import ImageDecodeError, decode_file
    from pipeline.drift import compute_features, list_images
    from pipeline.runtime import OnnxModel

    model = OnnxModel(model_path)
    paths = [p for p in list_images(folder) if pattern is None or p.match(pattern)]
    if not paths:
        raise SystemExit(f"no images under {folder} matching {pattern!r}")
    out: list[tuple[np.ndarray, ...]] = []
    for i in range(0, len(paths), 32):
        imgs = []
        for p in paths[i:i + 32]:
            try:
                imgs.append(decode_file(p))
            except (ImageDecodeError, OSError):
                continue
        if imgs:
            out.append(compute_features(model, imgs))
    print(f"  {len(paths)} images from {folder} ({pattern or 'all'})", flush=True)
    return tuple(np.concatenate([o[j] for o in out]) for j in range(3))


def load_npz(path: str) -> tuple[np.ndarray, ...]:
    with np.load(path, allow_pickle=False) as z:
        return z["embeddings"], z["image_stats"], z["probs"]


# ------------------------------------------------------------------------------ measurement


def run_stream(monitor: DriftMonitor, chunks: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, np.ndarray]:
    """Feed chunks; returns (n_seen per evaluation, alarm matrix evaluations x detectors)."""
    n_seen, alarms = [], []
    for e, s, p in chunks:
        for st in monitor.update(e, s, p):
            n_seen.append(st.n_seen)
            alarms.append([st.scores[d] > st.thresholds[d] for d in DETECTORS])
    return np.asarray(n_seen), np.asarray(alarms, dtype=bool).reshape(-1, len(DETECTORS))


def false_alarms(ref: DriftReference, source: Source, n_images: int, rng: np.random.Generator, *,
                 window: int, stride: int, budget: float, cooldown: int) -> dict[str, tuple[float, float]]:
    """Per detector: (alarm episodes per 10k images, fraction of alarmed evaluations) on in-domain data."""
    mon = DriftMonitor(ref, window=window, stride=stride, false_alarms_per_10k=budget, cooldown=cooldown)
    chunks = [source(rng, 256) for _ in range(n_images // 256)]
    _, alarms = run_stream(mon, chunks)
    out = {}
    for j, d in enumerate(DETECTORS):
        tr = EpisodeTracker(cooldown=cooldown)
        for a in alarms[:, j]:
            tr.step(bool(a))
        out[d] = (tr.episodes * 10_000.0 / (len(chunks) * 256), float(alarms[:, j].mean()))
    return out


def delays(ref: DriftReference, normal: Source, shifted: Source, rng: np.random.Generator, *, repeats: int,
           warmup: int, horizon: int, window: int, stride: int, budget: float, cooldown: int
           ) -> dict[str, list[float]]:
    """Per detector: images after the change until the first alarm (inf when none within horizon)."""
    mon = DriftMonitor(ref, window=window, stride=stride, false_alarms_per_10k=budget, cooldown=cooldown)
    out: dict[str, list[float]] = {d: [] for d in DETECTORS}
    for _ in range(repeats):
        mon.reset()
        chunks = [normal(rng, warmup)] + [shifted(rng, 32) for _ in range(horizon // 32)]
        n_seen, alarms = run_stream(mon, chunks)
        after = n_seen > warmup
        for j, d in enumerate(DETECTORS):
            hit = np.nonzero(after & alarms[:, j])[0]
            out[d].append(float(n_seen[hit[0]] - warmup) if len(hit) else float("inf"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run (smoke test)")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--budget", type=float, default=1.0, help="false alarms per 10k in-domain images")
    ap.add_argument("--cooldown", type=int, default=4, help="evaluations below threshold that end an episode")
    ap.add_argument("--fit-images", type=int, default=600, help="synthetic in-domain images for the reference")
    ap.add_argument("--null-images", type=int, default=200_000, help="in-domain images streamed for false alarms")
    ap.add_argument("--repeats", type=int, default=30, help="shifted streams per scenario")
    ap.add_argument("--warmup", type=int, default=64)
    ap.add_argument("--horizon", type=int, default=256, help="shifted images per stream")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="ONNX model (real mode)")
    ap.add_argument("--in-domain", help="folder of in-domain images (real mode)")
    ap.add_argument("--shifted", help="folder of shifted images (real mode)")
    ap.add_argument("--in-glob", help="filename pattern for in-domain images, e.g. 'exp[12]_*'")
    ap.add_argument("--shift-glob", help="filename pattern for shifted images, e.g. 'exp[56]_*'")
    ap.add_argument("--in-npz", help="in-domain features .npz (embeddings, image_stats, probs)")
    ap.add_argument("--shift-npz", help="shifted features .npz")
    args = ap.parse_args(argv)
    if args.quick:
        args.null_images, args.repeats = 20_000, 8
    rng = np.random.default_rng(args.seed)

    if args.model or args.in_npz:
        if args.in_npz:
            ind, shf = load_npz(args.in_npz), load_npz(args.shift_npz)
        else:
            if not (args.in_domain and args.shifted):
                raise SystemExit("--model needs --in-domain and --shifted")
            ind = features_from_folder(args.model, args.in_domain, args.in_glob)
            shf = features_from_folder(args.model, args.shifted, args.shift_glob)
        perm = rng.permutation(len(ind[0]))
        n_test = len(perm) // 3
        test, fit = perm[:n_test], perm[n_test:]
        fit_data = tuple(a[fit] for a in ind)
        normal = resample_source(*(a[test] for a in ind))
        scenarios = {"shifted": resample_source(*shf)}
        print(f"real features: {len(fit)} fit the reference, {n_test} held out for in-domain streams, "
              f"{len(shf[0])} shifted; D={ind[0].shape[1]}")
    else:
        world = SyntheticWorld(seed=args.seed)
        fit_data = world.sample(rng, args.fit_images)
        normal = lambda r, n: world.sample(r, n)  # noqa: E731
        scenarios = synthetic_scenarios(world)
        print(f"synthetic: D={world.dim}, {world.latent} latent factors, {args.fit_images} in-domain images "
              f"for the reference")

    t0 = time.perf_counter()
    ref = fit_reference(*fit_data, window=args.window, stride=args.stride, false_alarms_per_10k=args.budget,
                        seed=args.seed)
    print(f"fit_reference: {time.perf_counter() - t0:.2f} s ({ref.n_fit} fit + {ref.n_pool} calibration pool)")
    kw = dict(window=args.window, stride=args.stride, budget=args.budget, cooldown=args.cooldown)

    t0 = time.perf_counter()
    fa = false_alarms(ref, normal, args.null_images, rng, **kw)
    dt = time.perf_counter() - t0
    print(f"in-domain stream: {args.null_images} images in {dt:.1f} s "
          f"({dt / (args.null_images / 32) * 1e3:.2f} ms per 32-image update incl. data generation)")

    res = {name: delays(ref, normal, src, rng, repeats=args.repeats, warmup=args.warmup, horizon=args.horizon, **kw)
           for name, src in scenarios.items()}

    print(f"\nbudget {args.budget:g} false alarms / 10k images, window {args.window}, stride {args.stride}, "
          f"cooldown {args.cooldown}; delay = shifted images until the first alarm "
          f"(median [90th pct], '-' = none within {args.horizon}; misses in parentheses)\n")
    names = list(scenarios)
    head = f"{'detector':<13}{'FA/10k':>8}{'win%':>7}  " + "".join(f"{n[:17]:>19}" for n in names)
    print(head)
    print("-" * len(head))
    for d in DETECTORS:
        cells = []
        for n in names:
            v = np.asarray(res[n][d])
            miss = int(np.isinf(v).sum())
            if miss == len(v):
                cells.append(f"{'-':>19}")
                continue
            v = np.sort(v)  # inf (missed) sorts last, so order statistics stay meaningful
            med, p90 = v[(len(v) - 1) // 2], v[int(np.ceil(0.9 * len(v))) - 1]
            fmt = lambda x: "-" if np.isinf(x) else f"{x:.0f}"  # noqa: E731
            txt = f"{fmt(med)} [{fmt(p90)}]" + (f" ({miss})" if miss else "")
            cells.append(f"{txt:>19}")
        print(f"{d:<13}{fa[d][0]:>8.2f}{100 * fa[d][1]:>7.3f}  " + "".join(cells))


if __name__ == "__main__":
    main()
