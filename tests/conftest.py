from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_model import make_tiny_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MAGNETIC_TILE = SHARED / "datasets" / "magnetic-tile" / "images"


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """Path to a small valid ONNX artefact (model.onnx + model.json) that needs no torch."""
    return make_tiny_model(tmp_path / "tiny")


@pytest.fixture
def magnetic_tile() -> Path:
    if not MAGNETIC_TILE.is_dir():
        pytest.skip(f"magnetic-tile dataset not found at {MAGNETIC_TILE} (expected ../shared beside the checkout)")
    return MAGNETIC_TILE
