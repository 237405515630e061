from __future__ import annotations

from collections.abc import Iterator
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


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """One temporary Prefect server (SQLite in a temp folder) for the whole test session.

    Starting one takes 20-45 s here, so every Prefect test shares it. Analytics are off (air-gapped).
    Yields the API URL; flows, clients and CLI commands in the test process all talk to it.
    """
    pytest.importorskip("prefect")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.setenv("DO_NOT_TRACK", "1")
        from prefect.settings import PREFECT_API_URL
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=180):
            yield PREFECT_API_URL.value()
