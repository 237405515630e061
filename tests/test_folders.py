"""Image-folder scanning, good-class guessing, seeded stratified splits, few-shot sampling, manifests."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from pipeline.data.folders import (ImageFolder, Sample, guess_good_class, manifest_sha256, sample_shots,
                                   scan_image_folder, stratified_split)


def touch(path: Path, data: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if data is not None else path.name.encode())
    return path


def rel(ds: ImageFolder) -> list[tuple[str, str]]:
    return [(ds.classes[s.label], s.path.relative_to(ds.root).as_posix()) for s in ds.samples]


def make_dataset(root: Path, counts: dict[str, int]) -> ImageFolder:
    for cls, n in counts.items():
        for i in range(n):
            touch(root / cls / f"{cls}_{i:03d}.png")
    return scan_image_folder(root)


# -- scanning --------------------------------------------------------------------------------------------


def test_scan_labels_from_folder_names_sorted(tmp_path: Path):
    touch(tmp_path / "good" / "a.png")
    touch(tmp_path / "good" / "B.JPG")  # extension match is case-insensitive
    touch(tmp_path / "crack" / "c.tif")
    touch(tmp_path / "crack" / "deep" / "deeper" / "d.bmp")  # nested subfolders are scanned
    ds = scan_image_folder(tmp_path)
    assert ds.classes == ["crack", "good"]
    assert sorted(rel(ds)) == [("crack", "crack/c.tif"), ("crack", "crack/deep/deeper/d.bmp"),
                               ("good", "good/B.JPG"), ("good", "good/a.png")]
    assert ds.counts() == {"crack": 2, "good": 2} and len(ds) == 4
    assert all(isinstance(s, Sample) and s.path.is_file() for s in ds.samples)


def test_scan_ignores_hidden_and_non_images(tmp_path: Path):
    touch(tmp_path / "good" / "a.png")
    touch(tmp_path / "good" / ".hidden.png")
    touch(tmp_path / "good" / ".thumbs" / "t.png")  # hidden subfolder
    touch(tmp_path / "good" / "notes.txt")
    touch(tmp_path / "good" / "labels.csv")
    touch(tmp_path / "good" / "noext")
    touch(tmp_path / "good" / "png")  # a name, not an extension
    touch(tmp_path / "bad" / "b.jpeg")
    touch(tmp_path / ".cache" / "x.png")  # hidden class folder
    touch(tmp_path / "readme.png")  # loose file in the root: not a class
    ds = scan_image_folder(tmp_path)
    assert ds.classes == ["bad", "good"]
    assert sorted(rel(ds)) == [("bad", "bad/b.jpeg"), ("good", "good/a.png")]


def test_scan_follows_symlinked_class_folders_and_files(tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    touch(elsewhere / "scratch" / "s1.png")
    touch(elsewhere / "scratch" / "sub" / "s2.png")
    target = touch(elsewhere / "golden.png")
    root = tmp_path / "data"
    touch(root / "good" / "g1.png")
    (root / "good" / "linked.png").symlink_to(target)
    (root / "scratch").symlink_to(elsewhere / "scratch", target_is_directory=True)
    ds = scan_image_folder(root)
    assert ds.classes == ["good", "scratch"]
    assert sorted(rel(ds)) == [("good", "good/g1.png"), ("good", "good/linked.png"),
                               ("scratch", "scratch/s1.png"), ("scratch", "scratch/sub/s2.png")]
    # paths stay under the root (not resolved), so the manifest records them relative to it
    assert {r["path"] for r in ds.manifest()} == {"good/g1.png", "good/linked.png", "scratch/s1.png",
                                                   "scratch/sub/s2.png"}


def test_scan_symlink_loop_lists_each_file_once(tmp_path: Path):
    touch(tmp_path / "good" / "sub" / "g.png")
    (tmp_path / "good" / "alias").symlink_to(tmp_path / "good" / "sub", target_is_directory=True)  # same dir twice
    touch(tmp_path / "bad" / "sub" / "b.png")
    (tmp_path / "bad" / "sub" / "loop").symlink_to(tmp_path / "bad", target_is_directory=True)  # a cycle
    ds = scan_image_folder(tmp_path)
    assert ds.counts() == {"bad": 1, "good": 1}
    assert sorted(rel(ds)) == [("bad", "bad/sub/b.png"), ("good", "good/alias/g.png")]


def test_scan_fixed_classes_order(tmp_path: Path):
    for cls in ("good", "crack", "extra"):
        touch(tmp_path / cls / f"{cls}.png")
    ds = scan_image_folder(tmp_path, classes=["good", "crack", "missing"])
    assert ds.classes == ["good", "crack", "missing"]  # order kept, not sorted
    assert sorted(rel(ds)) == [("crack", "crack/crack.png"), ("good", "good/good.png")]
    assert ds.counts() == {"good": 1, "crack": 1, "missing": 0}
    assert {s.label for s in ds.samples} == {0, 1}


def test_scan_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="not found"):
        scan_image_folder(tmp_path / "nope")
    touch(tmp_path / "only" / "a.png")
    with pytest.raises(ValueError, match="at least two class folders"):
        scan_image_folder(tmp_path)
    with pytest.raises(ValueError, match="at least two"):
        scan_image_folder(tmp_path, classes=["only"])
    empty = tmp_path / "empty"
    touch(empty / "a" / "notes.txt")
    (empty / "b").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        scan_image_folder(empty)
    file_root = touch(tmp_path / "file.png")
    with pytest.raises(FileNotFoundError):
        scan_image_folder(file_root)


# -- good class ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("classes,good", [
    (["crack", "good"], "good"), (["OK", "scratch"], "OK"), (["blowhole", "free", "fray"], "free"),
    (["Normal", "dent"], "Normal"), (["Defect Free", "dent"], "Defect Free"), (["pass", "fail"], "pass"),
])
def test_guess_good_class(classes, good):
    assert guess_good_class(classes) == good


@pytest.mark.parametrize("classes", [["good", "ok", "crack"], ["crack", "scratch"], ["goodish", "bad"]])
def test_guess_good_class_ambiguous_or_missing(classes):
    with pytest.raises(ValueError, match="--good-class"):
        guess_good_class(classes)


# -- splits ----------------------------------------------------------------------------------------------


COUNTS = {"good": 40, "crack": 12, "dent": 5, "single": 1}


@pytest.fixture
def ds(tmp_path: Path) -> ImageFolder:
    return make_dataset(tmp_path / "data", COUNTS)


def test_stratified_split_disjoint_covering_stratified(ds: ImageFolder):
    rest, held = stratified_split(ds, 0.25, seed=7)
    assert set(rest.samples).isdisjoint(held.samples)
    assert Counter(rest.samples + held.samples) == Counter(ds.samples)
    assert held.classes == rest.classes == ds.classes
    hc = held.counts()
    assert hc == {"good": 10, "crack": 3, "dent": 1, "single": 0}  # round(n/4), >=1 where n>=2, never all
    assert rest.counts() == {c: COUNTS[c] - hc[c] for c in COUNTS}


def test_stratified_split_seeded(ds: ImageFolder):
    a = stratified_split(ds, 0.3, seed=1)
    b = stratified_split(ds, 0.3, seed=1)
    c = stratified_split(ds, 0.3, seed=2)
    assert a[1].samples == b[1].samples and a[0].samples == b[0].samples
    assert set(a[1].samples) != set(c[1].samples)


def test_stratified_split_min_per_class_and_bounds(ds: ImageFolder):
    rest, held = stratified_split(ds, 0.01, seed=0, min_per_class=2)
    assert held.counts() == {"good": 2, "crack": 2, "dent": 2, "single": 0}
    rest, held = stratified_split(ds, 0.99, seed=0)
    assert rest.counts() == {"good": 1, "crack": 1, "dent": 1, "single": 1}  # never empties a class
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            stratified_split(ds, bad, seed=0)


def test_sample_shots(ds: ImageFolder):
    picked, rest = sample_shots(ds, 5, seed=3)
    assert picked.counts() == {"good": 5, "crack": 5, "dent": 5, "single": 1}  # all where fewer than K
    assert rest.counts() == {"good": 35, "crack": 7, "dent": 0, "single": 0}
    assert set(picked.samples).isdisjoint(rest.samples)
    assert Counter(picked.samples + rest.samples) == Counter(ds.samples)
    assert sample_shots(ds, 5, seed=3)[0].samples == picked.samples
    assert set(sample_shots(ds, 5, seed=4)[0].samples) != set(picked.samples)
    # the K picked for a class are a random draw, not the first K in file order
    good = ds.classes.index("good")
    firsts = [s for s in ds.samples if s.label == good][:5]
    assert {s for s in picked.samples if s.label == good} != set(firsts)
    with pytest.raises(ValueError, match="shots"):
        sample_shots(ds, 0, seed=0)


def test_sample_shots_more_good_parts(ds: ImageFolder):
    picked, rest = sample_shots(ds, 5, seed=3, per_class={"good": 20})
    assert picked.counts() == {"good": 20, "crack": 5, "dent": 5, "single": 1}
    assert rest.counts() == {"good": 20, "crack": 7, "dent": 0, "single": 0}
    # the defect classes get the same K images as without the override (same seeded draw per class)
    plain, _ = sample_shots(ds, 5, seed=3)
    good = ds.classes.index("good")
    assert {s for s in picked.samples if s.label != good} == {s for s in plain.samples if s.label != good}
    with pytest.raises(ValueError, match="goood"):
        sample_shots(ds, 5, seed=3, per_class={"goood": 20})
    with pytest.raises(ValueError, match="at least 1"):
        sample_shots(ds, 5, seed=3, per_class={"good": 0})


def test_good_shots_needs_shots(ds: ImageFolder, tmp_path):
    from pipeline.run import RunConfig, split_dataset

    with pytest.raises(ValueError, match="give shots too"):
        RunConfig(data_dir=ds.root, out_dir=tmp_path / "run", good_shots=10)
    cfg = RunConfig(data_dir=ds.root, out_dir=tmp_path / "run", shots=5, good_shots=10)
    train_set, val_set, rest = split_dataset(ds, cfg, "good")
    assert train_set.counts()["good"] + val_set.counts()["good"] == 10 and rest.counts()["good"] == 30


# -- manifest --------------------------------------------------------------------------------------------


def test_manifest_rows(ds: ImageFolder):
    rows = ds.manifest()
    assert len(rows) == len(ds)
    row = next(r for r in rows if r["path"] == "crack/crack_000.png")
    assert row["class"] == "crack" and row["bytes"] == len(b"crack_000.png") and len(row["sha256"]) == 64


def test_manifest_sha256_order_independent_and_content_sensitive(ds: ImageFolder):
    rows = ds.manifest()
    h = manifest_sha256(rows)
    assert manifest_sha256(list(reversed(rows))) == h
    assert manifest_sha256(ds.subset(list(reversed(ds.samples))).manifest()) == h
    # same file name, new bytes -> new hash
    victim = ds.samples[3].path
    victim.write_bytes(b"different pixels")
    assert manifest_sha256(ds.manifest()) != h
    # relabelling a file (moving it between classes) changes the hash
    relabelled = [dict(r) for r in rows]
    relabelled[0]["class"] = "single" if relabelled[0]["class"] != "single" else "good"
    assert manifest_sha256(relabelled) != h
    # dropping a file changes the hash
    assert manifest_sha256(rows[1:]) != h


def test_manifest_symlinked_files_hash_target_content(tmp_path: Path):
    target = touch(tmp_path / "real.png", b"abc")
    touch(tmp_path / "d" / "good" / "a.png", b"abc")
    touch(tmp_path / "d" / "bad" / "b.png", b"xyz")
    (tmp_path / "d" / "bad" / "link.png").symlink_to(target)
    rows = {r["path"]: r for r in scan_image_folder(tmp_path / "d").manifest()}
    assert rows["bad/link.png"]["sha256"] == rows["good/a.png"]["sha256"]
    assert os.path.islink(tmp_path / "d" / "bad" / "link.png")


@pytest.mark.parametrize("mode, defects_validate", [("all", True), ("good", False), ("auto", False)])
def test_validation_split_keeps_scarce_defect_images_for_training(ds: ImageFolder, mode: str, defects_validate: bool):
    """"good": only good parts are held back (the threshold needs nothing else), every defect image trains;
    "auto" does that when a defect class has fewer than 40 images (here 12, 5 and 1)."""
    from pipeline.run import RunConfig, split_dataset

    cfg = RunConfig(data_dir=ds.root, out_dir=ds.root / "run", validation_split=mode)
    train, val, remainder = split_dataset(ds, cfg, "good")
    assert remainder is None and set(train.samples).isdisjoint(val.samples)
    assert sorted(train.samples + val.samples, key=str) == sorted(ds.samples, key=str)
    assert val.counts()["good"] == 10 and train.counts()["good"] == 30  # the good split is the same in every mode
    if defects_validate:
        assert val.counts()["crack"] == 3 and train.counts()["crack"] == 9
    else:
        assert all(val.counts()[c] == 0 and train.counts()[c] == n for c, n in COUNTS.items() if c != "good")


def test_validation_split_auto_validates_every_class_when_defects_are_plentiful(tmp_path: Path):
    from pipeline.run import RunConfig, split_dataset, validation_classes

    ds = make_dataset(tmp_path / "data", {"good": 80, "crack": 40, "dent": 44})
    cfg = RunConfig(data_dir=ds.root, out_dir=tmp_path / "run")
    assert validation_classes(ds.counts(), "good", cfg) == "all"
    _, val, _ = split_dataset(ds, cfg, "good")
    assert val.counts() == {"crack": 10, "dent": 11, "good": 20}
    few = RunConfig(data_dir=ds.root, out_dir=tmp_path / "run", shots=20)  # 20 labelled per class: scarce
    train, val, rest = split_dataset(ds, few, "good")
    assert val.counts() == {"crack": 0, "dent": 0, "good": 5} and train.counts() == {"crack": 20, "dent": 20, "good": 15}
    assert sum(rest.counts().values()) == 164 - 60
