"""Real line images for INT8 calibration and precision checks, found through a run folder's manifest.

A run folder's ``manifest.json`` lists the training and validation files (relative to ``data_dir``) of
the model beside it: calibration uses the training images (what the model was fitted on, i.e. the line's
own distribution), the accuracy check every image of that folder the model was not trained on.
No torch: this runs on inference hosts.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np

from pipeline.data.decode import ImageDecodeError, decode_file
from pipeline.data.folders import ImageFolder, Sample, list_images
from pipeline.preprocess import PreprocessSpec, preprocess

MANIFEST_FILE = "manifest.json"


class CalibrationDataError(ValueError):
    """No usable images for calibration or checks (missing manifest, moved data, unreadable files)."""


def read_manifest(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibrationDataError(f"{path} not found: give the images with --calib / --data") from None
    except (OSError, ValueError) as exc:
        raise CalibrationDataError(f"{path}: unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("train"), list):
        raise CalibrationDataError(f"{path}: not a training manifest (no 'train' file list)")
    return manifest


def manifest_split(run_dir: str | os.PathLike, split: str, classes: list[str],
                   data_root: str | os.PathLike | None = None) -> ImageFolder:
    """The ``train`` or ``val`` files of a run as an ImageFolder labelled with the model's ``classes``.

    ``data_root`` replaces the manifest's ``data_dir`` (the data moved, or the run came from another host).
    Raises :class:`CalibrationDataError` when the files cannot be found there.
    """
    manifest = read_manifest(run_dir)
    root = Path(data_root) if data_root is not None else Path(str(manifest.get("data_dir", "")))
    rows = manifest.get(split) or []
    unknown = sorted({r.get("class") for r in rows} - set(classes))
    if unknown:
        raise CalibrationDataError(f"{run_dir}: manifest classes {unknown} are not classes of the model {classes}")
    samples = [Sample(root / r["path"], classes.index(r["class"])) for r in rows]
    if not samples:
        raise CalibrationDataError(f"{run_dir}: the manifest lists no {split!r} images")
    present = [s for s in samples if s.path.is_file()]
    if not present:
        raise CalibrationDataError(
            f"none of the {len(samples)} {split!r} images of {run_dir} exist under {root} "
            f"(e.g. {samples[0].path}); point --data at the folder the run was trained on")
    return ImageFolder(root, list(classes), present)


def unseen_split(run_dir: str | os.PathLike, classes: list[str], data_root: str | os.PathLike | None = None,
                 max_per_class: int = 500, seed: int = 0) -> ImageFolder:
    """Every labelled image of the run's data folder that the model was not trained on: the validation
    split plus, for a few-shot run, all the images left out of its shots (at most ``max_per_class`` per
    class, a deterministic sample; balanced accuracy averages per-class recall, so capping is unbiased).

    With 20 shots the validation split alone has 5 images per class, where one flip moves balanced
    accuracy by 3.3 points: too coarse to check a 1-point limit. Raises :class:`CalibrationDataError`.
    """
    from pipeline.data.folders import scan_image_folder

    val = manifest_split(run_dir, "val", classes, data_root)
    manifest = read_manifest(run_dir)
    root = val.root
    trained = {(r["class"], os.path.normpath(r["path"])) for r in manifest["train"]}
    try:
        everything = scan_image_folder(root, classes=list(classes))
    except (FileNotFoundError, ValueError):
        return val
    keep = [s for s in everything.samples
            if (classes[s.label], os.path.normpath(str(s.path.relative_to(root)))) not in trained]
    rng = random.Random(seed)
    out = []
    for label in range(len(classes)):
        items = [s for s in keep if s.label == label]
        if len(items) > max_per_class:
            items = sorted(rng.sample(items, max_per_class), key=lambda s: str(s.path))
        out += items
    return ImageFolder(root, list(classes), out) if out else val


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Every image file under ``folder`` (recursively, sorted; hidden files and folders skipped)."""
    root = Path(folder)
    if not root.is_dir():
        raise CalibrationDataError(f"calibration folder not found: {root}")
    out = list_images(root)
    if not out:
        raise CalibrationDataError(f"no image files under {root}")
    return out


def balanced_pick(dataset: ImageFolder, limit: int, seed: int = 0) -> list[Path]:
    """Up to ``limit`` files taken round-robin over classes (shuffled with ``seed``), so the many good
    parts of a line do not crowd the few defect images out of the calibration set."""
    rng = random.Random(seed)
    per_class = []
    for label in range(len(dataset.classes)):
        items = [s.path for s in dataset.samples if s.label == label]
        rng.shuffle(items)
        per_class.append(items)
    out: list[Path] = []
    while len(out) < limit and any(per_class):
        for items in per_class:
            if items and len(out) < limit:
                out.append(items.pop())
    return out


def load_batch(paths: list[Path], spec: PreprocessSpec) -> tuple[np.ndarray, list[Path], list[dict[str, str]]]:
    """Decode + the shared preprocessing: (N, 3, H, W) float32, the paths used, the files skipped (with why)."""
    images, used, skipped = [], [], []
    for p in paths:
        try:
            images.append(decode_file(p, spec=spec))
            used.append(p)
        except (ImageDecodeError, OSError) as exc:
            skipped.append({"path": str(p), "error": f"{getattr(exc, 'kind', type(exc).__name__)}: {exc}"})
    return preprocess(images, spec), used, skipped


def calibration_batch(paths: list[Path], spec: PreprocessSpec, limit: int, seed: int = 0) -> np.ndarray:
    """Up to ``limit`` preprocessed calibration images from ``paths`` (a deterministic sample when more)."""
    if len(paths) > limit:
        paths = sorted(random.Random(seed).sample(list(paths), limit))
    batch, used, skipped = load_batch(list(paths), spec)
    if not used:
        first = f" (first error: {skipped[0]['path']}: {skipped[0]['error']})" if skipped else ""
        raise CalibrationDataError(f"none of the {len(paths)} calibration images could be read{first}")
    return batch
