"""The daemon benchmark runs end to end (tiny model, a few images): its table and summary keep their shape,
real image folders are read, and bad folders are refused. Numbers are the benchmark's business, not a test's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "bench_daemon.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_bench_daemon_on_a_folder_of_grey_line_images(tmp_path):
    model = make_tiny_model(tmp_path / "run")
    images = tmp_path / "line" / "good"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(7):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 256, (40 + i, 50), dtype=np.uint8))
    proc = run_bench("--model", str(model), "--images", "20", "--rounds", "2", "--http-clients", "2",
                     "--images-from", str(images.parent), "--streams", "2", "--threads", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    header, sep, row, _, summary = proc.stdout.strip().splitlines()[-5:]
    assert header.count("|") == row.count("|") == sep.count("|") == 15
    assert "7 grey png files" in row and "| 20 x 2 |" in row and "| 2 x 1," in row
    assert "2 x 1 threads" in row  # the daemon's own plan is among the bare configurations
    ratio = float(summary.split("= ")[1].split()[0])
    assert ratio > 0 and "peak RSS" in summary


@pytest.mark.parametrize("files, message", [((), "no images"), (("a.png", "b.jpg"), "mixes image formats")])
def test_bench_daemon_refuses_unusable_image_folders(tmp_path, files, message):
    model = make_tiny_model(tmp_path / "run")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in files:
        cv2.imwrite(str(folder / name), np.zeros((8, 8), np.uint8))
    proc = run_bench("--model", str(model), "--images", "4", "--images-from", str(folder))
    assert proc.returncode != 0 and message in proc.stderr
