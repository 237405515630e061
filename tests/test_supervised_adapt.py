"""The supervised re-adaptation recipe's data side: which of the champion's files are replayed.

Fast (no training): a champion folder is just a ``manifest.json`` here. The training side runs in the
slow demo test (``tests/test_demo.py``), which checks that the recipe gets promoted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipeline.data.folders import scan_image_folder
from pipeline.supervised_adapt import SupervisedAdaptConfig, replay_samples, training_set

CLASSES = ["good", "spot"]


def _write(path: Path, data: bytes) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.fixture
def champion(tmp_path: Path) -> Path:
    """A champion trained on old/{good,spot}/*.png: 4 good + 2 spot in train, 1 + 1 in val."""
    old = tmp_path / "old"
    rows: dict[str, list[dict]] = {"train": [], "val": []}
    for split, cls, n in (("train", "good", 4), ("train", "spot", 2), ("val", "good", 1), ("val", "spot", 1)):
        for i in range(n):
            rel = f"{cls}/{split}_{i}.png"
            rows[split].append({"path": rel, "class": cls, **_write(old / rel, f"{split}{cls}{i}".encode())})
    ch = tmp_path / "champion"
    ch.mkdir()
    (ch / "manifest.json").write_text(json.dumps({"data_dir": str(old), **rows}))
    return ch


def test_replays_every_file_of_the_champions_train_and_val(champion: Path) -> None:
    samples, report = replay_samples(champion, CLASSES)
    assert report.replayed == len(samples) == 8
    assert sorted(CLASSES[s.label] for s in samples).count("spot") == 3
    assert all(s.path.is_file() and s.path.is_absolute() for s in samples)
    assert report.missing == report.changed == report.excluded == 0


def test_missing_changed_and_excluded_files_are_skipped_and_counted(champion: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    (old / "good/train_0.png").unlink()
    (old / "good/train_1.png").write_bytes(b"edited")
    gate_file = old / "spot/val_0.png"
    samples, report = replay_samples(champion, CLASSES, exclude=[gate_file])
    kept = {s.path.relative_to(old).as_posix() for s in samples}
    assert (report.missing, report.changed, report.excluded, report.replayed) == (1, 1, 1, 5)
    assert kept == {"good/train_2.png", "good/train_3.png", "good/val_0.png", "spot/train_0.png", "spot/train_1.png"}


def test_exclusion_matches_through_symlinks(champion: Path, tmp_path: Path) -> None:
    link = tmp_path / "gate" / "spot" / "x.png"
    link.parent.mkdir(parents=True)
    link.symlink_to(tmp_path / "old/spot/train_1.png")
    _, report = replay_samples(champion, CLASSES, exclude=[link])
    assert report.excluded == 1 and report.replayed == 7


def test_cap_per_class_and_unknown_classes(champion: Path) -> None:
    samples, report = replay_samples(champion, ["spot", "good", "scratch"],
                                     cfg=SupervisedAdaptConfig(max_replay_per_class=2))
    assert report.replayed == 4 and report.capped == 3 + 1
    assert {s.label for s in samples} == {0, 1}  # labels index the given class order
    _, only_good = replay_samples(champion, ["good", "other"])
    assert only_good.unknown_class == 3 and only_good.replayed == 5


def test_training_set_adds_replay_to_the_new_images_and_never_the_new_ones_twice(champion: Path,
                                                                                  tmp_path: Path) -> None:
    new = tmp_path / "new"
    _write(new / "good/n0.png", b"n0")
    _write(new / "spot/n1.png", b"n1")
    (new / "good/dup.png").symlink_to(tmp_path / "old/good/train_2.png")  # the operator reused an old image
    ds = scan_image_folder(new, classes=CLASSES)
    merged, report = training_set(ds, champion, SupervisedAdaptConfig())
    paths = [str(s.path) for s in merged.samples]
    assert len(paths) == 3 + 7 and report.excluded == 1
    assert merged.classes == CLASSES and merged.root == new
    alone, none = training_set(ds, champion, SupervisedAdaptConfig(replay=False))
    assert alone is ds and none.replayed == 0


def test_a_champion_without_a_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="replay"):
        replay_samples(tmp_path, CLASSES)
