"""The synthetic line dataset: deterministic, imbalanced, exposure-shifted, with real, local defects."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli.synth_cmd import synth
from pipeline.data.decode import decode_file
from pipeline.synth import (
    DEFECT_KINDS,
    KINDS,
    generate_dataset,
    image_rng,
    render_image,
    render_sample,
    save_png,
)

SIZE = 96  # small and fast; defects scale with size


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _grey(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64).mean(axis=2)


def test_generate_is_deterministic_per_seed_and_differs_across_seeds(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "a", n=2, seed=7, size=SIZE)
    generate_dataset(tmp_path / "b", n=2, seed=7, size=SIZE)
    generate_dataset(tmp_path / "c", n=2, seed=8, size=SIZE)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b
    c = _files(tmp_path / "c")
    assert len(c) == len(a)
    a_images = [decode_file(tmp_path / "a" / k) for k in a]
    c_images = [decode_file(tmp_path / "c" / k) for k in c]
    for x, y in zip(a_images, c_images):
        assert x.shape != y.shape or not np.array_equal(x, y)
    # Within one dataset no two images are the same either.
    flat = {x.tobytes() + str(x.shape).encode() for x in a_images}
    assert len(flat) == len(a_images)


def test_counts_imbalance_and_layout(tmp_path: Path) -> None:
    counts = generate_dataset(tmp_path, n=3, seed=1, size=SIZE, good_multiplier=4)
    assert counts == {"good": 12, "scratch": 3, "spot": 3, "crack": 3, "edge_chip": 3}
    for kind, count in counts.items():
        files = sorted((tmp_path / kind).iterdir())
        assert [f.name for f in files] == sorted(f"{kind}_1_{i}.png" for i in range(count))
    assert not list(tmp_path.rglob(".*")), "atomic writes must not leave temp files"


def test_classes_subset_and_image_independent_of_n(tmp_path: Path) -> None:
    counts = generate_dataset(tmp_path / "small", n=1, seed=3, size=SIZE, classes=("good", "crack"))
    assert counts == {"good": 3, "crack": 1}
    assert sorted(p.name for p in (tmp_path / "small").iterdir()) == ["crack", "good"]
    generate_dataset(tmp_path / "big", n=2, seed=3, size=SIZE, classes=("crack",))
    assert (tmp_path / "small/crack/crack_3_0.png").read_bytes() == (tmp_path / "big/crack/crack_3_0.png").read_bytes()


def test_files_decode_to_exactly_the_rendered_image(tmp_path: Path) -> None:
    generate_dataset(tmp_path, n=1, seed=5, size=SIZE, exposure=1.3)
    for kind in KINDS:
        img = decode_file(tmp_path / kind / f"{kind}_5_0.png")
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        np.testing.assert_array_equal(img, render_image(kind, image_rng(5, kind, 0), SIZE, 1.3))


def test_size_and_aspect_vary_within_bounds() -> None:
    shapes = [render_image("good", np.random.default_rng(s), 160, 1.0).shape for s in range(40)]
    aspects = [w / h for h, w, _ in shapes]
    assert all(0.84 <= a <= 1.16 for a in aspects)
    assert max(aspects) - min(aspects) > 0.1, "aspect should vary between images"
    assert all(abs(np.sqrt(h * w) - 160) <= 2 for h, w, _ in shapes)


def test_render_image_streams_fresh_images_from_one_generator() -> None:
    rng = np.random.default_rng(0)
    first, second = render_image("spot", rng, SIZE, 1.0), render_image("spot", rng, SIZE, 1.0)
    assert first.shape != second.shape or not np.array_equal(first, second)


@pytest.mark.parametrize("kind", KINDS)
def test_mean_grey_increases_with_exposure(kind: str) -> None:
    exposures = [0.4, 0.6, 0.8, 1.0, 1.3, 1.6, 2.5]
    for seed in range(3):
        means = [float(render_image(kind, np.random.default_rng(seed), SIZE, e).mean()) for e in exposures]
        assert all(b > a for a, b in zip(means, means[1:])), means
        nominal, bright, dark = means[3], means[5], means[1]
        assert bright - nominal > 15 and nominal - dark > 15, "the exposure shift must be a real domain shift"


def test_nominal_and_bright_exposures_do_not_saturate_the_part() -> None:
    for seed in range(5):
        img = render_image("good", np.random.default_rng(seed), 160, 1.6)
        assert (img >= 254).mean() < 0.02
        assert 60 < render_image("good", np.random.default_rng(seed), 160, 1.0).mean() < 180


@pytest.mark.parametrize("kind", DEFECT_KINDS)
@pytest.mark.parametrize("exposure", [0.6, 1.0, 1.6])
def test_defect_is_visible_and_only_where_its_mask_says(kind: str, exposure: float) -> None:
    """Same generator state as good and as a defect: same part, and the difference is the defect."""
    for seed in range(6):
        good = render_sample("good", np.random.default_rng(seed), 160, exposure)
        bad = render_sample(kind, np.random.default_rng(seed), 160, exposure)
        assert good.defect_mask.max() == 0.0
        assert bad.image.shape == good.image.shape
        diff = _grey(bad.image) - _grey(good.image)
        core = bad.defect_mask > 0.5
        assert 4 <= core.sum() <= 0.05 * core.size, f"{kind} seed {seed}: defect area {core.sum()} px"
        near = cv2.dilate((bad.defect_mask > 0.01).astype(np.uint8), np.ones((25, 25), np.uint8)) > 0
        assert np.array_equal(bad.image[~near], good.image[~near]), "defect leaked outside its neighbourhood"
        assert np.abs(diff[core]).max() >= 6, f"{kind} seed {seed} exposure {exposure}: defect too faint"
        if kind in ("crack", "edge_chip"):  # dark fissures; the belt showing through a notch
            assert diff[core].mean() < -10


def _elongation(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    ev = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(np.float64)))
    return float(np.sqrt(ev[1] / max(ev[0], 1e-6)))


def test_defect_kinds_have_their_own_shapes() -> None:
    """Scratches are long and thin, spots compact, chips sit on the part's outline."""
    scratch, spot = [], []
    for seed in range(12):
        rng_seed = 100 + seed
        m = render_sample("scratch", np.random.default_rng(rng_seed), 160, 1.0).defect_mask > 0.3
        scratch.append(_elongation(m))
        m = render_sample("spot", np.random.default_rng(rng_seed), 160, 1.0).defect_mask > 0.3
        ys, xs = np.nonzero(m)
        spot.append(max(np.ptp(xs), np.ptp(ys)))
        chip = render_sample("edge_chip", np.random.default_rng(rng_seed), 160, 1.0)
        good = render_sample("good", np.random.default_rng(rng_seed), 160, 1.0)
        removed = chip.defect_mask > 0.9
        # Where the part was removed the image is now as dark as the belt around the part.
        border = np.concatenate([good.image[:4].reshape(-1, 3), good.image[-4:].reshape(-1, 3)])
        assert _grey(chip.image)[removed].mean() < border.mean() + 25
    assert np.median(scratch) > 6
    assert max(spot) < 40


@pytest.mark.parametrize("kwargs, error", [
    ({"n": 0}, ValueError), ({"seed": -1}, ValueError), ({"good_multiplier": 0}, ValueError),
    ({"classes": ("good", "dent")}, ValueError), ({"classes": ("good", "good")}, ValueError),
    ({"classes": ()}, ValueError), ({"size": 8}, ValueError), ({"exposure": float("nan")}, ValueError),
    ({"exposure": 0.0}, ValueError), ({"n": 2.5}, TypeError),
])
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        generate_dataset(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir()), "nothing is written for refused arguments"


def test_render_refuses_unknown_kind() -> None:
    with pytest.raises(ValueError, match="known classes"):
        render_image("dent", np.random.default_rng(0), 160, 1.0)


def test_save_png_refuses_non_rgb(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        save_png(tmp_path / "x.png", np.zeros((4, 4), np.uint8))


def test_cli_writes_and_prints_counts(tmp_path: Path) -> None:
    out = tmp_path / "line"
    result = CliRunner().invoke(synth, [str(out), "--n", "2", "--exposure", "1.6", "--seed", "4", "--size", "64"])
    assert result.exit_code == 0, result.output
    for kind, count in {"good": 6, "scratch": 2, "spot": 2, "crack": 2, "edge_chip": 2}.items():
        assert any(line.split() == [kind, str(count)] for line in result.output.splitlines()), result.output
        assert len(list((out / kind).glob(f"{kind}_4_*.png"))) == count
    assert "total" in result.output and "14" in result.output
    img = decode_file(out / "good" / "good_4_0.png")
    np.testing.assert_array_equal(img, render_image("good", image_rng(4, "good", 0), 64, 1.6))


def test_cli_rejects_bad_exposure(tmp_path: Path) -> None:
    result = CliRunner().invoke(synth, [str(tmp_path / "x"), "--exposure", "-1"])
    assert result.exit_code == 2
    assert "exposure" in result.output
    assert not (tmp_path / "x").exists()


def test_synth_needs_neither_torch_nor_pil() -> None:
    code = ("import sys, pipeline.synth, pipeline.cli.synth_cmd; "
            "bad = [m for m in ('torch', 'PIL') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
