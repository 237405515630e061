"""Drift and re-adaptation on real data: magnetic-tile exposure sessions (issue 5).

    python bench/drift_magnetic_tile.py --workdir runs/drift-mt [--sessions 3 4 5 6] [--seed 0]

Magnetic-tile file names are ``exp<E>_num_<ID>.jpg``; E = 1..6 is the capture session (lighting /
exposure rises with E). Every (session, class) is split in two, seeded: an *evaluation* half, never
trained or adapted on, and a *pool* half.

1. **Base model**: ``run_training`` on the exp1-2 pool (labelled), default recipe; its drift reference
   is the one stored at export, as for any model.
2. **Alarm delay**: a ``DriftMonitor`` built exactly as the daemon builds it (``DriftObserver``: the model's
   stored reference, the default detector and window) is fed ONNX embeddings + full-image statistics
   (``pipeline.drift.compute_features``, what the daemon computes) of ``--warmup`` held-out exp1-2 images,
   then of session E's images in random order; the delay is the number of session-E images until an alarm
   episode opens. Repeated ``--repeats`` times per session (features are computed once per image).
3. **False alarms**: alarm episodes per 10,000 images over a stream of ``--null-images`` images resampled
   (with replacement) from the held-out exp1-2 evaluation half.
4. **Accuracy on session E's evaluation half**: the base model before adaptation; after label-free
   adaptation (``pipeline.adapt.adapt_label_free`` on session E's pool without labels, what the readapt
   flow runs without labels); after supervised adaptation on up to ``--labelled`` labelled pool images per
   class (``pipeline.supervised_adapt.adapt_supervised``, what the readapt flow runs with labels: warm start
   from the base checkpoint, replaying the base model's training data); and a model trained on session E's
   whole pool with the base model's protocol. The supervised - session-model difference gets a 90 % paired
   bootstrap interval (evaluation images resampled within each class).

Every step's result is cached in ``--workdir`` (models, features, JSON), so a re-run resumes where a crash
stopped. Writes the ``drift-mt`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.mdsection import machine_line, update_section  # noqa: E402

SESSION = re.compile(r"^exp(\d+)_num_")
BASE_SESSIONS = (1, 2)
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/datasets/magnetic-tile/images"
RECIPES: dict[str, dict[str, Any]] = {
    # name -> SupervisedAdaptConfig overrides (+ "train": TrainConfig overrides)
    "replay": {},                      # the readapt flow's recipe
    "new-only": {"replay": False},     # the recipe before: fine-tune on the new images alone
}


# ----------------------------------------------------------------------------------------------- data


def session_of(path: Path) -> int | None:
    m = SESSION.match(path.name)
    return int(m.group(1)) if m else None


def split_sessions(ds, eval_fraction: float, seed: int) -> dict[int, dict[str, list]]:
    """{session: {"eval": samples, "pool": samples}}, split per (session, class), seeded."""
    out: dict[int, dict[str, list]] = {}
    groups: dict[tuple[int, int], list] = {}
    for s in ds.samples:
        e = session_of(s.path)
        if e is not None and e >= 1:
            groups.setdefault((e, s.label), []).append(s)
    for (e, label), items in sorted(groups.items()):
        items = sorted(items, key=lambda s: s.path.name)
        random.Random(f"{seed}-{e}-{label}").shuffle(items)
        k = int(round(len(items) * eval_fraction)) if len(items) > 1 else 0
        k = min(max(k, 1), len(items) - 1) if len(items) > 1 else 0
        d = out.setdefault(e, {"eval": [], "pool": []})
        d["eval"] += items[:k]
        d["pool"] += items[k:]
    return out


def labelled_subset(pool: list, per_class: int, seed: int) -> list:
    by: dict[int, list] = {}
    for s in sorted(pool, key=lambda s: s.path.name):
        by.setdefault(s.label, []).append(s)
    out = []
    for label, items in sorted(by.items()):
        random.Random(f"{seed}-labelled-{label}").shuffle(items)
        out += items[:per_class]
    return out


def link_folder(dst: Path, samples: list, classes: list[str], flat: bool = False) -> Path:
    """A folder of symlinks: ``dst/<class>/<file>`` (labelled) or ``dst/<n>.jpg`` (unlabelled, shuffled)."""
    if dst.is_dir():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    order = list(samples)
    if flat:
        random.Random(str(dst)).shuffle(order)
    for i, s in enumerate(order):
        target = tmp / (f"{i:05d}{s.path.suffix}" if flat else f"{classes[s.label]}/{s.path.name}")
        target.parent.mkdir(exist_ok=True)
        target.symlink_to(s.path.resolve())
    tmp.rename(dst)
    return dst


# ----------------------------------------------------------------------------------------------- caching


class Steps:
    """JSON results per step in ``workdir/steps``; a finished step is never recomputed."""

    def __init__(self, root: Path):
        self.root = root / "steps"
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, fn: Callable[[], Any]) -> Any:
        p = self.root / f"{name}.json"
        if p.is_file():
            return json.loads(p.read_text())
        t = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        value = fn()
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, indent=1, default=float))
        tmp.replace(p)
        print(f"[{time.strftime('%H:%M:%S')}] {name} done in {time.perf_counter() - t:.0f} s", flush=True)
        return value


def features(model_path: Path, folder: Path, cache: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, image statistics, probs) of every image under ``folder``, as the daemon computes them."""
    if cache.is_file():
        with np.load(cache) as z:
            return z["embeddings"], z["image_stats"], z["probs"]
    from pipeline.data.decode import decode_file
    from pipeline.drift import compute_features, list_images
    from pipeline.runtime import OnnxModel

    model = OnnxModel(model_path)
    paths = list_images(folder)
    parts = [compute_features(model, [decode_file(p) for p in paths[i:i + 32]]) for i in range(0, len(paths), 32)]
    e, s, p = (np.concatenate([x[j] for x in parts]) for j in range(3))
    np.savez(cache, embeddings=e, image_stats=s, probs=p)
    return e, s, p


# ----------------------------------------------------------------------------------------------- drift


def daemon_monitor(model_path: Path):
    """The monitor the daemon runs for this model (``DriftObserver`` with the daemon's default options)."""
    from pipeline.drift import DEFAULT_DETECTOR, DriftMonitor, load_model_reference
    from pipeline.runtime import OnnxModel

    return DriftMonitor(load_model_reference(OnnxModel(model_path)), detector=DEFAULT_DETECTOR)


def stream(monitor, feats: tuple[np.ndarray, ...], order: np.ndarray, batch: int,
           trackers: dict | None = None) -> list[tuple[int, bool, dict[str, bool]]]:
    """Feed images ``order`` of ``feats`` in batches; returns (n_seen, episode started, per-detector starts)."""
    out = []
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        for st in monitor.update(feats[0][idx], feats[1][idx], feats[2][idx]):
            per = {}
            if trackers is not None:
                for d, tr in trackers.items():
                    per[d] = tr.step(bool(st.scores[d] > st.thresholds[d]))[0]
            out.append((st.n_seen, st.alarm_started, per))
    return out


def false_alarms(model_path: Path, in_domain: tuple[np.ndarray, ...], n_images: int, seed: int) -> dict:
    from pipeline.drift import DETECTORS, EpisodeTracker

    mon = daemon_monitor(model_path)
    rng = np.random.default_rng([seed, 1])
    order = rng.integers(0, len(in_domain[0]), n_images)
    trackers = {d: EpisodeTracker(cooldown=mon.episodes.cooldown) for d in DETECTORS}
    t = time.perf_counter()
    ev = stream(mon, in_domain, order, 32, trackers)
    secs = time.perf_counter() - t
    per = {d: sum(e[2][d] for e in ev) * 10_000 / n_images for d in DETECTORS}
    return {"images": n_images, "episodes": int(sum(e[1] for e in ev)),
            "per_10k": sum(e[1] for e in ev) * 10_000 / n_images, "per_detector_per_10k": per,
            "detector": mon.detector, "window": mon.window, "stride": mon.stride,
            "budget_per_10k": mon.calibration.false_alarms_per_10k, "monitor_us_per_image": secs / n_images * 1e6}


def alarm_delays(model_path: Path, in_domain: tuple[np.ndarray, ...], shifted: tuple[np.ndarray, ...], *,
                 repeats: int, warmup: int, horizon: int, seed: int) -> dict:
    from pipeline.drift import DETECTORS, EpisodeTracker

    mon = daemon_monitor(model_path)
    rng = np.random.default_rng([seed, 2])
    n_shift = len(shifted[0])
    both = tuple(np.concatenate([a, b]) for a, b in zip(in_domain, shifted))
    delays: list[float] = []
    per: dict[str, list[float]] = {d: [] for d in DETECTORS}
    warm_false: list[bool] = []  # an episode opened during the warm-up (a false alarm before the switch)
    for _ in range(repeats):
        mon.reset()
        trackers = {d: EpisodeTracker(cooldown=mon.episodes.cooldown) for d in DETECTORS}
        shift_order = np.concatenate([rng.permutation(n_shift) for _ in range(-(-horizon // n_shift))])[:horizon]
        order = np.concatenate([rng.integers(0, len(in_domain[0]), warmup), len(in_domain[0]) + shift_order])
        ev = stream(mon, both, order, 8, trackers)
        warm_false.append(any(started for n, started, _ in ev if n <= warmup))
        hit = [n - warmup for n, started, _ in ev if started and n > warmup]
        delays.append(float(hit[0]) if hit else float("inf"))
        for d in DETECTORS:
            h = [n - warmup for n, _, p in ev if p[d] and n > warmup]
            per[d].append(float(h[0]) if h else float("inf"))
    return {"delays": delays, "per_detector": per, "warmup_false_alarm": warm_false, "repeats": repeats,
            "warmup": warmup, "horizon": horizon, "shifted_images": n_shift}


def _q(v: list[float], q: float) -> float:
    a = np.sort(np.asarray(v, dtype=float))
    return float(a[min(len(a) - 1, int(np.ceil(q * len(a))) - 1)]) if len(a) else float("nan")


# ----------------------------------------------------------------------------------------------- accuracy


def evaluate(model_path: Path, folder: Path) -> dict:
    from pipeline.data.folders import scan_image_folder
    from pipeline.evaluate import evaluate_model
    from pipeline.runtime import OnnxModel

    model = OnnxModel(model_path)
    m, out = evaluate_model(model, scan_image_folder(folder, classes=list(model.classes)))
    return {"balanced_accuracy": m["balanced_accuracy"], "defect_recall_at_frr": m["defect_recall_at_frr"],
            "false_reject_rate": m["false_reject_rate"], "n_images": m["n_images"],
            "per_class_recall": {k: v["recall"] for k, v in m["per_class"].items()},
            "y_true": out.y_true.tolist(), "pred": out.probs.argmax(1).tolist()}


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def paired_interval(a: dict, b: dict, seed: int, n_boot: int = 2000, level: float = 0.90) -> tuple[float, float]:
    """Bootstrap interval of bacc(a) - bacc(b) on the same images (resampled within each class)."""
    y = np.asarray(a["y_true"])
    assert y.tolist() == b["y_true"], "paired comparison needs the same evaluation images in the same order"
    pa, pb = np.asarray(a["pred"]), np.asarray(b["pred"])
    rng = np.random.default_rng([seed, 3])
    by = [np.nonzero(y == c)[0] for c in np.unique(y)]
    diffs = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(ix, len(ix)) for ix in by])
        diffs.append(balanced_accuracy(y[idx], pa[idx]) - balanced_accuracy(y[idx], pb[idx]))
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--workdir", type=Path, default=Path("runs/drift-mt"))
    ap.add_argument("--sessions", type=int, nargs="+", default=[3, 4, 5, 6])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-fraction", type=float, default=0.5)
    ap.add_argument("--labelled", type=int, default=10, help="labelled new-session images per class")
    ap.add_argument("--recipes", nargs="+", default=["replay"], choices=sorted(RECIPES),
                    help="supervised re-adaptation recipes to measure (the first is the table's)")
    ap.add_argument("--recipe-sessions", type=int, nargs="+", default=None,
                    help="sessions for recipes after the first (default: all)")
    ap.add_argument("--null-images", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=256)
    ap.add_argument("--horizon", type=int, default=512)
    ap.add_argument("--train-config", type=json.loads, default={}, help="TrainConfig overrides (JSON)")
    ap.add_argument("--only", choices=["drift", "accuracy"], help="run one part")
    ap.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    ap.add_argument("--no-write", action="store_true", help="print, do not update BENCHMARKS.md")
    args = ap.parse_args(argv)

    from pipeline.data.folders import scan_image_folder
    from pipeline.run import RunConfig, run_training
    from pipeline.train import TrainConfig

    wd = args.workdir.resolve()
    steps = Steps(wd)
    ds = scan_image_folder(args.data)
    classes = ds.classes
    split = split_sessions(ds, args.eval_fraction, args.seed)
    data = wd / "data"
    base_pool = [s for e in BASE_SESSIONS for s in split[e]["pool"]]
    base_eval = [s for e in BASE_SESSIONS for s in split[e]["eval"]]
    folders = {"base_train": link_folder(data / "base_train", base_pool, classes),
               "base_eval": link_folder(data / "base_eval", base_eval, classes)}
    for e in args.sessions:
        sp = split[e]
        folders[f"s{e}_eval"] = link_folder(data / f"s{e}_eval", sp["eval"], classes)
        folders[f"s{e}_pool"] = link_folder(data / f"s{e}_pool", sp["pool"], classes)
        folders[f"s{e}_all"] = link_folder(data / f"s{e}_all", sp["eval"] + sp["pool"], classes)
        folders[f"s{e}_unlabelled"] = link_folder(data / f"s{e}_unlabelled", sp["pool"], classes, flat=True)
        folders[f"s{e}_labelled"] = link_folder(data / f"s{e}_labelled",
                                                labelled_subset(sp["pool"], args.labelled, args.seed), classes)
    counts = {name: scan_image_folder(f).counts() if "unlabelled" not in name else None
              for name, f in folders.items()}
    train_cfg = TrainConfig(seed=args.seed, **args.train_config)
    models = wd / "models"

    def train(name: str, folder: Path) -> dict:
        out = models / name
        t = time.perf_counter()
        s = run_training(RunConfig(data_dir=folder, out_dir=out, good_class="free", train=train_cfg))
        return {"onnx": str(s.onnx_path), "train_s": time.perf_counter() - t, "timings": s.timings,
                "counts": s.counts}

    base = steps.get("model_base", lambda: train("base", folders["base_train"]))
    base_onnx = Path(base["onnx"])
    feats = wd / "features"
    feats.mkdir(exist_ok=True)
    in_domain = features(base_onnx, folders["base_eval"], feats / "base_eval.npz")
    results: dict[str, Any] = {"counts": counts, "base": base}

    if args.only != "accuracy":
        results["false_alarms"] = steps.get(
            f"false_alarms_{args.null_images}", lambda: false_alarms(base_onnx, in_domain, args.null_images, args.seed))
        for e in args.sessions:
            shifted = features(base_onnx, folders[f"s{e}_all"], feats / f"s{e}_all.npz")
            results[f"delay_{e}"] = steps.get(
                f"delay2_s{e}_{args.repeats}_{args.warmup}_{args.horizon}",
                lambda: alarm_delays(base_onnx, in_domain, shifted, repeats=args.repeats, warmup=args.warmup,
                                     horizon=args.horizon, seed=args.seed))

    if args.only != "drift":
        from pipeline.adapt import adapt_label_free
        from pipeline.supervised_adapt import SupervisedAdaptConfig, adapt_supervised

        results["in_domain"] = steps.get("eval_base_on_base", lambda: evaluate(base_onnx, folders["base_eval"]))
        for e in args.sessions:
            ev = folders[f"s{e}_eval"]
            results[f"before_{e}"] = steps.get(f"eval_base_on_s{e}", lambda: evaluate(base_onnx, ev))

            def label_free() -> dict:
                r = adapt_label_free(Path(base["onnx"]).parent, folders[f"s{e}_unlabelled"], models / f"lf_s{e}")
                return {"onnx": str(r.onnx_path), "checks": r.checks, "passed": r.passed, "timings": r.timings}

            lf = steps.get(f"model_lf_s{e}", label_free)
            results[f"label_free_{e}"] = {**steps.get(f"eval_lf_s{e}", lambda: evaluate(Path(lf["onnx"]), ev)),
                                          "checks_passed": lf["passed"]}
            for i, recipe in enumerate(args.recipes):
                if i > 0 and args.recipe_sessions and e not in args.recipe_sessions:
                    continue
                opts = dict(RECIPES[recipe])
                rcfg = train_cfg.model_copy(update=opts.pop("train", {}))

                def supervised() -> dict:
                    from pipeline.data.folders import scan_image_folder as scan

                    out = models / f"sup_{recipe}_s{e}"
                    t = time.perf_counter()
                    s, info = adapt_supervised(
                        Path(base["onnx"]).parent, scan(folders[f"s{e}_labelled"], classes=classes),
                        RunConfig(data_dir=folders[f"s{e}_labelled"], out_dir=out, good_class="free", train=rcfg),
                        SupervisedAdaptConfig(seed=args.seed, **opts))
                    return {"onnx": str(s.onnx_path), "train_s": time.perf_counter() - t, "adaptation": info,
                            "counts": s.counts}

                sup = steps.get(f"model_sup_{recipe}_s{e}", supervised)
                results[f"sup_{recipe}_{e}"] = {**steps.get(f"eval_sup_{recipe}_s{e}",
                                                            lambda: evaluate(Path(sup["onnx"]), ev)),
                                                "train_s": sup["train_s"], "replayed": sup["adaptation"]["replay"]["replayed"]}
            own = steps.get(f"model_session_s{e}", lambda: train(f"session_s{e}", folders[f"s{e}_pool"]))
            results[f"session_{e}"] = {**steps.get(f"eval_session_s{e}", lambda: evaluate(Path(own["onnx"]), ev)),
                                       "train_s": own["train_s"]}

    (wd / "results.json").write_text(json.dumps(results, indent=1, default=float))
    body = render(results, args)
    print(body)
    if not args.no_write:
        update_section(args.out, "drift-mt", body)


def render(r: dict, args: argparse.Namespace) -> str:
    cmd = "python bench/drift_magnetic_tile.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:]))
    n = lambda name: sum((r["counts"].get(name) or {}).values())  # noqa: E731
    lines = ["## Drift and re-adaptation on magnetic-tile exposure sessions (issue 5)", "",
             f"Command: `{cmd}`  ", f"Machine: {machine_line()}", "",
             f"Base model: trained on the exp1-2 pool ({n('base_train')} images; default recipe, "
             f"{r['base']['train_s']:.0f} s). Each session's images are split per class into an evaluation half "
             f"(never trained or adapted on) and a pool; exp1-2 evaluation half: {n('base_eval')} images."]
    fa = r.get("false_alarms")
    if fa:
        lines += ["", f"**Drift alarm** (the daemon's monitor: `{fa['detector']}` detector, window {fa['window']}, "
                  f"stride {fa['stride']}, budget {fa['budget_per_10k']:g} false alarms per 10k, the model's stored "
                  f"reference; ONNX embeddings + full-image statistics). In-domain stream: {fa['images']:,} images "
                  f"resampled from the exp1-2 evaluation half: **{fa['per_10k']:.2f} false alarm episodes per 10,000 "
                  f"images** ({fa['episodes']} episodes; monitor cost {fa['monitor_us_per_image']:.0f} µs/image). "
                  f"Delay: {args.warmup} in-domain images, then session E in random order ({args.repeats} repeats); "
                  "images from the switch until an alarm episode opens (the daemon's event), over the repeats "
                  "without a false alarm during the warm-up (a repeat with one has its episode already open "
                  "at the switch).", "",
                  "| switch | shifted images | median delay | 90th pct | max | missed | false alarm in warm-up |",
                  "|---|---|---|---|---|---|---|"]
        for e in args.sessions:
            d = r.get(f"delay_{e}")
            if not d:
                continue
            clean = [x for x, w in zip(d["delays"], d["warmup_false_alarm"]) if not w]
            fmt = lambda x: "-" if np.isinf(x) else f"{x:.0f}"  # noqa: E731
            lines.append(f"| exp1-2 → exp{e} | {d['shifted_images']} | {fmt(_q(clean, 0.5))} | {fmt(_q(clean, 0.9))} | "
                         f"{fmt(max(clean))} | {sum(np.isinf(clean))}/{len(clean)} | "
                         f"{sum(d['warmup_false_alarm'])}/{d['repeats']} |")
        dets = list(fa["per_detector_per_10k"])
        lines += ["", "Every detector on the same streams (median delay in images per session; false episodes per 10k "
                  "in-domain images):", "",
                  "| detector | FA/10k | " + " | ".join(f"exp{e}" for e in args.sessions) + " |",
                  "|---|---|" + "---|" * len(args.sessions)]
        for det in dets:
            cells = []
            for e in args.sessions:
                d = r.get(f"delay_{e}")
                v = [x for x, w in zip(d["per_detector"][det], d["warmup_false_alarm"]) if not w] if d else []
                med = _q(v, 0.5) if v else float("nan")
                cells.append("-" if np.isinf(med) else f"{med:.0f}")
            lines.append(f"| {det}{' (daemon)' if det == fa['detector'] else ''} | "
                         f"{fa['per_detector_per_10k'][det]:.2f} | " + " | ".join(cells) + " |")
    if "in_domain" in r:
        recipe = args.recipes[0]
        ind = r["in_domain"]
        lines += ["", f"**Balanced accuracy on each session's evaluation half** (base model on exp1-2's own evaluation "
                  f"half: {ind['balanced_accuracy']:.3f}). Label-free: AdaBN alignment on the session's pool images "
                  f"without labels (`adapt_label_free`, the readapt flow's unlabelled path). Supervised: "
                  f"`adapt_supervised` (the readapt flow's labelled path, recipe `{recipe}`) on up to {args.labelled} "
                  "labelled pool images per class. Session model: the base protocol on the session's whole pool. "
                  "Interval: 90 % paired bootstrap of supervised - session model.", "",
                  "| session | eval images | before | label-free (checks) | supervised 10/class | session model | "
                  "supervised - session [90 % CI] | labelled images |", "|---|---|---|---|---|---|---|---|"]
        for e in args.sessions:
            if f"session_{e}" not in r:
                continue
            b, lf, sup, own = r[f"before_{e}"], r[f"label_free_{e}"], r[f"sup_{recipe}_{e}"], r[f"session_{e}"]
            lo, hi = paired_interval(sup, own, args.seed)
            diff = sup["balanced_accuracy"] - own["balanced_accuracy"]
            lines.append(f"| exp{e} | {b['n_images']} | {b['balanced_accuracy']:.3f} | {lf['balanced_accuracy']:.3f} "
                         f"({'pass' if lf['checks_passed'] else 'fail'}) | {sup['balanced_accuracy']:.3f} | "
                         f"{own['balanced_accuracy']:.3f} | {diff:+.3f} [{lo:+.3f}, {hi:+.3f}] | {n(f's{e}_labelled')} |")
        extra = [x for x in args.recipes[1:]]
        if extra:
            lines += ["", "Other supervised recipes (balanced accuracy on the same evaluation halves):", "",
                      "| recipe | " + " | ".join(f"exp{e}" for e in args.sessions) + " |",
                      "|---|" + "---|" * len(args.sessions)]
            for x in args.recipes:
                cells = [f"{r[f'sup_{x}_{e}']['balanced_accuracy']:.3f}" if f"sup_{x}_{e}" in r else "-"
                         for e in args.sessions]
                lines.append(f"| {x} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
