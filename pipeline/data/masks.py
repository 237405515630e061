"""Pixel masks of defect images: where in a labelled image the defect is.

Optional training input (``defect train --masks DIR``). With ~20 labelled images per class, a defect class
is a handful of physical parts (magnetic-tile: crack is 10 tiles, each photographed at 6 exposures), and an
image-level label lets the network learn those parts rather than the defect. A mask says which cells of the
image show the defect and which show good surface, which the per-cell head (``pipeline.train``) trains on.

Masks mirror the image folder (``MASKS/<class>/<same stem>.<any image extension>``), non-zero = defect.
They are resized with the image's own geometry (``PreprocessSpec``) so region and pixels line up.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pipeline.data.decode import IMAGE_EXTENSIONS, ImageDecodeError, decode_file
from pipeline.data.folders import ImageFolder
from pipeline.preprocess import PreprocessSpec, resize_image


def find_mask(image: Path, image_root: Path, mask_root: Path) -> Path | None:
    """The mask file for ``image``: same relative folder and stem under ``mask_root``, any image extension."""
    try:
        rel = image.relative_to(image_root)
    except ValueError:
        return None
    folder = mask_root / rel.parent
    for ext in (".png", *sorted(IMAGE_EXTENSIONS - {".png"})):
        for candidate in (folder / (rel.stem + ext), folder / (rel.stem + ext.upper())):
            if candidate.is_file():
                return candidate
    return None


def resize_mask(mask: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """HxW mask (any non-zero = defect) -> the spec's HxW geometry, float32 0..1 (area-averaged edges)."""
    binary = np.where(mask > 0, 255, 0).astype(np.uint8)
    geometry = spec.model_copy(update={"exposure": "none", "pad_value": 0})
    return resize_image(binary, geometry)[..., 0].astype(np.float32) / 255.0


def load_masks(ds: ImageFolder, mask_root: str | os.PathLike, spec: PreprocessSpec, good_class: str
               ) -> tuple[torch.Tensor, list[dict]]:
    """Masks of ``ds``'s defect images at model resolution: (N, H, W) float 0..1, zeros where there is none.

    Returns (masks, problems[{path, error}]): a mask that is missing is normal (that image trains on its label alone)
    and not listed; one that cannot be read, or has a different aspect than its image, is listed.
    """
    root = Path(mask_root)
    if not root.is_dir():
        raise FileNotFoundError(f"mask folder not found: {root}")
    good = ds.classes.index(good_class)
    out = torch.zeros((len(ds.samples), spec.height, spec.width), dtype=torch.float32)
    problems: list[dict] = []
    for i, s in enumerate(ds.samples):
        if s.label == good:
            continue
        path = find_mask(Path(s.path), Path(ds.root), root)
        if path is None:
            continue
        try:
            mask = decode_file(path)[..., 0]
            h, w = decode_file(s.path).shape[:2]
        except (ImageDecodeError, OSError) as exc:
            problems.append({"path": str(path), "error": str(exc)})
            continue
        if abs(mask.shape[0] / mask.shape[1] - h / w) > 0.02 * h / w:
            problems.append({"path": str(path), "error": f"mask is {mask.shape[1]}x{mask.shape[0]}, its image {w}x{h}"})
            continue
        out[i] = torch.from_numpy(resize_mask(mask, spec))
    return out, problems
