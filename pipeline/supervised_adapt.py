"""Supervised re-adaptation: an operator labelled a few current-domain images; fine-tune the champion on them.

The recipe (``SupervisedAdaptConfig``): warm-start from the champion's checkpoint and fine-tune on the new
labelled images *plus a replay of the champion's own labelled data* (the train + validation files of its
``manifest.json``, still on disk and unchanged). Fine-tuning on the few new images alone forgets what the
champion knew: on the demo's new lamp it reached 0.723 balanced accuracy where the champion it started
from scored 0.817, so the gate rightly refused it; with the replay it reached 0.870 and was promoted.
Measured on magnetic-tile exposure sessions in BENCHMARKS.md (``drift-mt``).

The adapted model serves the new domain, so its drift reference is fitted on current-domain images only
(``domain_reference``): a reference of the replayed mixture would make a pure new-domain stream look like
drift right after the swap.

Training-side (imports torch through ``pipeline.run``); the runtime never imports this.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from pipeline.data.folders import ImageFolder, Sample
from pipeline.metadata import load_metadata
from pipeline.run import DRIFT_REFERENCE_FILE, RunConfig, RunSummary

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MIN_DOMAIN_IMAGES = 32  # a drift reference needs 16 images to fit and 16 to calibrate


class SupervisedAdaptConfig(BaseModel):
    """How labelled current-domain images re-adapt a champion (always a warm start from its weights)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent default

    replay: bool = True  # also train on the champion's own labelled data (its manifest's train + val files)
    max_replay_per_class: int | None = Field(None, ge=1)  # None: replay all of it
    verify_replay: bool = True  # skip replayed files whose bytes no longer match the manifest's sha256
    domain_reference: bool = True  # fit the drift reference on current-domain images only
    seed: int = 0


@dataclass
class ReplayReport:
    """What the replay added, and what it had to leave out (nothing is dropped silently)."""

    replayed: int = 0
    missing: int = 0          # listed in the manifest, not on disk any more
    changed: int = 0          # on disk, but the bytes differ from the manifest's hash
    excluded: int = 0         # also in the new data or the gate set
    unknown_class: int = 0    # a class the new model does not have
    capped: int = 0           # beyond max_replay_per_class

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def replay_samples(champion_dir: str | os.PathLike, classes: list[str], *, exclude: Iterable[str | os.PathLike] = (),
                   cfg: SupervisedAdaptConfig | None = None) -> tuple[list[Sample], ReplayReport]:
    """The champion's labelled training files (train + val of its manifest) as samples of ``classes``.

    ``exclude``: files never to replay (the new data and the gate set: a gate image in training would
    inflate the challenger's gate score), matched by resolved path. Files that vanished or changed are
    skipped and counted. Order is deterministic; ``max_replay_per_class`` keeps a seeded random subset.
    """
    cfg = cfg or SupervisedAdaptConfig()
    path = Path(champion_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the champion's training data cannot be replayed "
                                "(set replay=False to fine-tune on the new images alone)")
    manifest = json.loads(path.read_text())
    root = Path(manifest.get("data_dir") or Path(champion_dir))
    skip = {os.path.realpath(p) for p in exclude}
    report = ReplayReport()
    by_class: dict[str, list[Sample]] = {c: [] for c in classes}
    seen: set[str] = set()
    for row in list(manifest.get("train", [])) + list(manifest.get("val", [])):
        cls = row.get("class")
        if cls not in by_class:
            report.unknown_class += 1
            continue
        p = root / row["path"]  # absolute paths (an earlier replay) stay absolute
        real = os.path.realpath(p)
        if real in seen:
            continue
        if real in skip:
            report.excluded += 1
            continue
        if not p.is_file():
            report.missing += 1
            continue
        if cfg.verify_replay and row.get("sha256") and _sha256(p) != row["sha256"]:
            report.changed += 1
            continue
        seen.add(real)
        by_class[cls].append(Sample(p, classes.index(cls)))
    rng = random.Random(cfg.seed)
    out: list[Sample] = []
    for cls, items in by_class.items():
        if cfg.max_replay_per_class is not None and len(items) > cfg.max_replay_per_class:
            report.capped += len(items) - cfg.max_replay_per_class
            items = sorted(rng.sample(items, cfg.max_replay_per_class), key=lambda s: str(s.path))
        out += items
    report.replayed = len(out)
    if report.missing or report.changed:
        log.warning("replay of %s: %d files missing, %d changed since training; replaying %d", champion_dir,
                    report.missing, report.changed, report.replayed)
    return out, report


def training_set(new: ImageFolder, champion_dir: str | os.PathLike, cfg: SupervisedAdaptConfig,
                 exclude: Iterable[str | os.PathLike] = ()) -> tuple[ImageFolder, ReplayReport]:
    """The new labelled images plus (with ``cfg.replay``) the champion's replayed data, in ``new``'s classes."""
    if not cfg.replay:
        return new, ReplayReport()
    skip = [str(s.path) for s in new.samples] + [str(p) for p in exclude]
    old, report = replay_samples(champion_dir, list(new.classes), exclude=skip, cfg=cfg)
    return ImageFolder(new.root, list(new.classes), list(new.samples) + old), report


def fit_domain_reference(onnx_path: str | os.PathLike, image_paths: list[Path], out_path: str | os.PathLike,
                         seed: int = 0, batch_size: int = 32) -> int:
    """Refit a model's drift reference on current-domain images, with the served (ONNX) embeddings.

    Returns the number of images used; unreadable files are skipped (and logged).
    """
    import numpy as np

    from pipeline.data.decode import ImageDecodeError, decode_file
    from pipeline.drift import compute_features, fit_reference
    from pipeline.runtime import OnnxModel

    model = OnnxModel(onnx_path)
    parts: list[tuple] = []
    for i in range(0, len(image_paths), batch_size):
        images = []
        for p in image_paths[i:i + batch_size]:
            try:
                images.append(decode_file(p))
            except (ImageDecodeError, OSError) as exc:
                log.warning("drift reference: skipped unreadable %s: %s", p, exc)
        if images:
            parts.append(compute_features(model, images))
    if not parts:
        raise ValueError("no readable current-domain images for the drift reference")
    emb, stats, probs = (np.concatenate([p[j] for p in parts]) for j in range(3))
    ref = fit_reference(emb, stats, probs, classes=list(model.metadata.classes), seed=seed)
    ref.save(out_path)
    return len(emb)


def adapt_supervised(champion_dir: str | os.PathLike, new: ImageFolder, run_cfg: RunConfig,
                     cfg: SupervisedAdaptConfig | None = None, *, exclude: Iterable[str | os.PathLike] = (),
                     domain_images: list[Path] | None = None) -> tuple[RunSummary, dict]:
    """Fine-tune the champion in ``champion_dir`` on ``new`` (+ replay) into ``run_cfg.out_dir``.

    ``exclude``: files that must not be trained on (the gate set). ``domain_images``: current-domain images
    for the drift reference (default: ``new``'s); with fewer than 32 the training-set reference is kept.
    Returns the run summary and what the adaptation did (replay counts, reference source), which is also
    written to ``adaptation.json`` in the run folder.
    """
    from pipeline.metadata import write_json_atomic
    from pipeline.run import run_training
    from pipeline.train import CHECKPOINT_FILE

    cfg = cfg or SupervisedAdaptConfig()
    champion_dir = Path(champion_dir)
    ckpt = champion_dir / CHECKPOINT_FILE
    if not ckpt.is_file():
        raise FileNotFoundError(f"{champion_dir} has no {CHECKPOINT_FILE}: supervised adaptation warm-starts from it")
    exclude = list(exclude)
    head = load_metadata(champion_dir / "model.onnx").head  # the warm start keeps the champion's classifier
    if run_cfg.train.head != head:
        run_cfg = run_cfg.model_copy(update={"train": run_cfg.train.model_copy(update={"head": head})})
    data, replay = training_set(new, champion_dir, cfg, exclude)
    summary = run_training(run_cfg, dataset=data, init_checkpoint=ckpt)
    info: dict = {"recipe": cfg.model_dump(mode="json"), "adapted_from": str(champion_dir),
                  "new_images": len(new.samples), "replay": replay.as_dict(), "drift_reference": "training set"}
    domain = list(domain_images) if domain_images is not None else [s.path for s in new.samples]
    if cfg.domain_reference:
        if len(domain) >= MIN_DOMAIN_IMAGES:
            n = fit_domain_reference(summary.onnx_path, domain, summary.out_dir / DRIFT_REFERENCE_FILE, seed=cfg.seed)
            info["drift_reference"] = f"current domain ({n} images)"
        else:
            log.warning("only %d current-domain images (< %d): the drift reference stays the training set's",
                        len(domain), MIN_DOMAIN_IMAGES)
    write_json_atomic(summary.out_dir / "adaptation.json", json.dumps(info, indent=2))
    return summary, info
