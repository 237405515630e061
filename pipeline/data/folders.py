"""Image-folder datasets: one sub-folder per class, labels from folder names only.

Splits are stratified and seeded so a run is reproducible; ``sample_shots`` draws K per
class for few-shot experiments. Nothing here decodes pixels, so scanning is cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.decode import IMAGE_EXTENSIONS

GOOD_CLASS_HINTS = ("good", "ok", "free", "normal", "pass", "defect_free", "defect-free", "nodefect", "no_defect")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class ImageFolder:
    """Labelled image files under ``root``; ``classes`` sorted by name, ``label`` indexes into it."""

    root: Path
    classes: list[str]
    samples: list[Sample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def counts(self) -> dict[str, int]:
        out = {c: 0 for c in self.classes}
        for s in self.samples:
            out[self.classes[s.label]] += 1
        return out

    def subset(self, samples: list[Sample]) -> "ImageFolder":
        return ImageFolder(self.root, self.classes, list(samples))

    def manifest(self) -> list[dict]:
        """File list with sizes and content hashes: what exactly a model was trained on."""
        rows = []
        for s in self.samples:
            data = s.path.read_bytes()
            rows.append({"path": str(s.path.relative_to(self.root)) if s.path.is_relative_to(self.root) else str(s.path),
                         "class": self.classes[s.label], "bytes": len(data),
                         "sha256": hashlib.sha256(data).hexdigest()})
        return rows


def manifest_sha256(rows: list[dict]) -> str:
    """Order-independent hash of a manifest."""
    canon = json.dumps(sorted(rows, key=lambda r: (r["class"], r["path"])), sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()


def scan_image_folder(root: str | os.PathLike, classes: list[str] | None = None) -> ImageFolder:
    """List images under ``root/<class>/`` (recursively, symlinks followed).

    ``classes`` fixes the class list and order (e.g. a model's classes); folders not in it are
    ignored and a listed class without a folder simply has no samples.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
    if len(classes) < 2:
        raise ValueError(f"{root}: need at least two class folders, found {found or 'none'}")
    samples = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        seen = {os.path.realpath(folder)}  # a symlink loop would otherwise list the same files dozens of times
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            keep = []
            for d in sorted(dirnames):
                real = os.path.realpath(os.path.join(dirpath, d))
                if not d.startswith(".") and real not in seen:
                    seen.add(real)
                    keep.append(d)
            dirnames[:] = keep
            for fn in sorted(filenames):
                if not fn.startswith(".") and Path(fn).suffix.lower() in IMAGE_EXTENSIONS:
                    samples.append(Sample(Path(dirpath) / fn, label))
    if not samples:
        raise ValueError(f"{root}: no image files found in class folders {classes}")
    return ImageFolder(root, list(classes), samples)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` at any depth (class folders optional, symlinks followed), hidden entries
    skipped, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / fn for fn in sorted(filenames)
                if not fn.startswith(".") and Path(fn).suffix.lower() in IMAGE_EXTENSIONS]
    return out


def guess_good_class(classes: list[str]) -> str:
    """The defect-free class by name, or a clear error asking for ``--good-class``."""
    norm = {c: c.lower().replace(" ", "_") for c in classes}
    hits = [c for c, n in norm.items() if n in GOOD_CLASS_HINTS]
    if len(hits) == 1:
        return hits[0]
    raise ValueError(f"cannot tell which class is defect-free among {classes}; pass --good-class NAME")


def stratified_split(ds: ImageFolder, fraction: float, seed: int, min_per_class: int = 1
                     ) -> tuple[ImageFolder, ImageFolder]:
    """Split into (rest, held_out) with ``fraction`` of each class held out (at least ``min_per_class``
    where the class has two or more images)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    rng = random.Random(seed)
    rest, held = [], []
    for label in range(len(ds.classes)):
        items = [s for s in ds.samples if s.label == label]
        rng.shuffle(items)
        k = round(len(items) * fraction)
        if len(items) >= 2:
            k = min(max(k, min_per_class), len(items) - 1)
        else:
            k = 0
        held += items[:k]
        rest += items[k:]
    return ds.subset(rest), ds.subset(held)


def sample_shots(ds: ImageFolder, shots: int, seed: int,
                 per_class: dict[str, int] | None = None) -> tuple[ImageFolder, ImageFolder]:
    """K images per class for training (``per_class`` overrides K by class name, e.g. more good parts);
    everything else is returned as the remainder."""
    counts = {c: (per_class or {}).get(c, shots) for c in ds.classes}
    unknown = sorted(set(per_class or {}) - set(ds.classes))
    if unknown:
        raise ValueError(f"shots given for classes {unknown} that are not class folders of {ds.root}")
    if min(counts.values()) < 1:
        raise ValueError(f"shots must be at least 1, got {counts}")
    rng = random.Random(seed)
    picked, rest = [], []
    for label, name in enumerate(ds.classes):
        items = [s for s in ds.samples if s.label == label]
        rng.shuffle(items)
        picked += items[:counts[name]]
        rest += items[counts[name]:]
    return ds.subset(picked), ds.subset(rest)
