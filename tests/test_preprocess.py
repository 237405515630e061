"""The shared preprocessing spec: numpy (runtime) and torch (training) must agree exactly; augmentation
stays in range, is seeded, and is the identity when switched off; load_images reports what it skips."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.data.augment import AugmentConfig, augment, load_images, to_float_nchw, torch_normalize
from pipeline.data.decode import decode_file
from pipeline.data.folders import scan_image_folder
from pipeline.preprocess import PreprocessSpec, normalize, normalize_exposure, preprocess, resize_image

SPECS = [
    PreprocessSpec(height=32, width=32),  # EfficientNet-Lite default (x - 127) / 128
    PreprocessSpec(height=24, width=40, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)),  # ImageNet
    PreprocessSpec(height=17, width=16, resize="letterbox", pad_value=114, interpolation="linear",
                   mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0)),
    PreprocessSpec(height=20, width=30, resize="letterbox", interpolation="cubic", mean=(10.5, 200.0, 0.25),
                   std=(0.7, 3.0, 1000.0)),
    # per-image exposure normalisation: numpy/OpenCV on uint8, so both paths must still agree bit for bit
    PreprocessSpec(height=32, width=32, exposure="gain"),
    PreprocessSpec(height=24, width=40, resize="letterbox", pad_value=10, exposure="standardize"),
    PreprocessSpec(height=33, width=31, exposure="clahe"),
]


def images(seed: int, n: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(37, 53), (64, 20), (16, 16), (100, 101), (5, 90)]
    return [rng.integers(0, 256, (*shapes[i % len(shapes)], 3), dtype=np.uint8) for i in range(n)]


# -- normalisation parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.height}x{s.width}-{s.resize}-{s.mean[0]}")
def test_numpy_normalize_equals_torch_normalize(spec: PreprocessSpec):
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (3, spec.height, spec.width, 3), dtype=np.uint8)
    ours = normalize(batch, spec)
    theirs = torch_normalize(torch.from_numpy(batch).permute(0, 3, 1, 2).float(), spec).numpy()
    assert ours.dtype == np.float32 and ours.shape == (3, 3, spec.height, spec.width) and ours.flags.c_contiguous
    assert np.abs(ours - theirs).max() < 1e-6
    # and both are the formula: channel c is (x[..., c] - mean[c]) / std[c]
    for c in range(3):
        expect = (batch[..., c].astype(np.float64) - spec.mean[c]) / spec.std[c]
        np.testing.assert_allclose(ours[:, c], expect, rtol=1e-5, atol=1e-5)


def test_torch_normalize_accepts_uint8_like_numpy():
    spec = SPECS[0]
    batch = np.array([[[[0, 127, 255]]]], np.uint8)  # 1x1x1x3, values below the mean would wrap in uint8
    got = torch_normalize(torch.from_numpy(batch).permute(0, 3, 1, 2), spec)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), normalize(batch, spec), atol=0)
    assert got[0, 0, 0, 0] == pytest.approx(-127 / 128)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.height}x{s.width}-{s.resize}")
def test_train_path_equals_runtime_path(spec: PreprocessSpec):
    ims = images(1, 5)
    runtime = preprocess(ims, spec)
    u8 = torch.from_numpy(np.stack([resize_image(im, spec) for im in ims]))
    train = torch_normalize(to_float_nchw(u8), spec).numpy()
    assert runtime.shape == train.shape == (5, 3, spec.height, spec.width)
    np.testing.assert_array_equal(runtime, train)


def test_train_loader_equals_runtime_on_files(tmp_path: Path):
    spec = SPECS[1]
    ims = images(2, 6)
    for i, im in enumerate(ims):
        cls = "good" if i % 2 else "bad"
        (tmp_path / cls).mkdir(exist_ok=True)
        ext = ".png" if i % 3 else ".jpg"
        assert cv2.imwrite(str(tmp_path / cls / f"{i}{ext}"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
    ds = scan_image_folder(tmp_path)
    x_u8, labels, skipped = load_images(ds, spec)
    assert not skipped and x_u8.dtype == torch.uint8 and x_u8.shape == (6, spec.height, spec.width, 3)
    assert labels.tolist() == [s.label for s in ds.samples]
    train = torch_normalize(to_float_nchw(x_u8), spec).numpy()
    runtime = preprocess([decode_file(s.path) for s in ds.samples], spec)
    np.testing.assert_array_equal(train, runtime)


# -- geometry --------------------------------------------------------------------------------------------


def test_stretch_geometry():
    spec = PreprocessSpec(height=20, width=30, interpolation="area")
    im = images(3, 1)[0]
    out = resize_image(im, spec)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, cv2.resize(im, (30, 20), interpolation=cv2.INTER_AREA))
    same = np.zeros((20, 30, 3), np.uint8)
    np.testing.assert_array_equal(resize_image(same, spec), same)
    # a vertical split stays where it is relative to the width: stretch, not crop
    half = np.zeros((50, 100, 3), np.uint8)
    half[:, 50:] = 255
    out = resize_image(half, spec)
    assert (out[:, :15] == 0).all() and (out[:, 15:] == 255).all()


@pytest.mark.parametrize("h,w", [(100, 50), (50, 100), (33, 77), (64, 64), (1, 500)])
def test_letterbox_keeps_aspect_pads_and_centres(h, w):
    spec = PreprocessSpec(height=32, width=48, resize="letterbox", pad_value=77)
    im = np.full((h, w, 3), 200, np.uint8)
    out = resize_image(im, spec)
    assert out.shape == (32, 48, 3)
    content = np.argwhere((out != 77).all(axis=2))
    (top, left), (bottom, right) = content.min(0), content.max(0) + 1
    nh, nw = bottom - top, right - left
    scale = min(32 / h, 48 / w)
    assert (nh, nw) == (max(1, round(h * scale)), max(1, round(w * scale)))
    assert nh == 32 or nw == 48  # fills one dimension
    assert abs(nh / nw - h / w) <= max(1 / nw, 1 / nh) * (h / w + 1)  # aspect kept up to rounding
    assert (out[top:bottom, left:right] == 200).all()
    assert top == (32 - nh) // 2 and left == (48 - nw) // 2  # centred
    assert abs(top - (32 - bottom)) <= 1 and abs(left - (48 - right)) <= 1
    assert (out == 77).sum() == 3 * (32 * 48 - nh * nw)


def test_letterbox_content_is_the_resized_image():
    spec = PreprocessSpec(height=40, width=40, resize="letterbox", pad_value=0, interpolation="area")
    im = np.random.default_rng(4).integers(0, 256, (30, 60, 3), dtype=np.uint8)
    out = resize_image(im, spec)
    np.testing.assert_array_equal(out[10:30], cv2.resize(im, (40, 20), interpolation=cv2.INTER_AREA))
    assert (out[:10] == 0).all() and (out[30:] == 0).all()


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
@pytest.mark.parametrize("interpolation", ["area", "linear", "cubic"])
@pytest.mark.parametrize("exposure", ["none", "gain", "standardize", "clahe"])
def test_grey_image_resizes_exactly_like_its_rgb_copy(resize, interpolation, exposure):
    """Grey images are resized as one channel (a third of the work) and must give the very same pixels."""
    rng = np.random.default_rng(5)
    for h, w in ((257, 607), (322, 358), (224, 224), (100, 50), (31, 333), (480, 640)):
        grey = cv2.GaussianBlur(rng.integers(0, 256, (h, w), dtype=np.uint8), (3, 3), 0)
        for size in ((224, 224), (96, 160)):
            spec = PreprocessSpec(height=size[0], width=size[1], resize=resize, interpolation=interpolation,
                                  exposure=exposure, pad_value=7)
            want = resize_image(np.repeat(grey[:, :, None], 3, axis=2), spec)
            got = resize_image(grey, spec)
            assert got.shape == want.shape and got.flags["C_CONTIGUOUS"]
            np.testing.assert_array_equal(got, want, err_msg=f"{h}x{w} -> {size}")
    np.testing.assert_array_equal(preprocess([grey], spec), preprocess([np.dstack([grey] * 3)], spec))


def test_preprocess_empty_and_bad_input():
    spec = SPECS[0]
    empty = preprocess([], spec)
    assert empty.shape == (0, 3, 32, 32) and empty.dtype == np.float32
    good = np.zeros((10, 10, 3), np.uint8)
    bad = [np.zeros((10, 10, 4), np.uint8), np.zeros((10, 10, 3), np.float32),
           np.zeros((10, 10, 3), np.uint16), np.zeros((0, 10, 3), np.uint8), np.zeros((10, 10, 1), np.uint8),
           np.zeros((2, 10, 10, 3), np.uint8)]
    for b in bad:
        with pytest.raises(ValueError, match="HxWx3 uint8"):
            preprocess([good, b], spec)
    for r in ("stretch", "letterbox"):
        with pytest.raises(ValueError):
            resize_image(np.zeros((0, 5, 3), np.uint8), PreprocessSpec(height=16, width=16, resize=r))
    with pytest.raises(ValueError, match="NHWC"):
        normalize(np.zeros((4, 4, 3), np.uint8), spec)
    with pytest.raises(ValueError, match="NHWC"):
        normalize(np.zeros((1, 3, 4, 4), np.uint8), spec)


def test_spec_validation():
    for bad in ({"std": (0.0, 1.0, 1.0)}, {"std": (-1.0, 1.0, 1.0)}, {"std": (float("inf"),) * 3},
                {"mean": (float("nan"), 0.0, 0.0)}, {"height": 8}, {"resize": "crop"}, {"pad_value": 256}):
        with pytest.raises(ValidationError):
            PreprocessSpec(**bad)
    spec = PreprocessSpec(height=64, width=48, resize="letterbox")
    assert PreprocessSpec.model_validate_json(spec.model_dump_json()) == spec
    with pytest.raises(ValidationError):
        spec.height = 10  # frozen: a model's spec cannot drift in memory


# -- exposure normalisation -----------------------------------------------------------------------------


def tile(seed: int, h: int = 48, w: int = 64, level: float = 100.0) -> np.ndarray:
    """A grey textured image (all channels equal, like the line images) around ``level``."""
    rng = np.random.default_rng(seed)
    g = np.clip(level + rng.normal(0, 12, (h, w)), 0, 255)
    g[h // 3:h // 3 + 4, 5:w - 5] *= 0.5  # a dark scratch
    return np.repeat(g.astype(np.uint8)[..., None], 3, axis=2)


def test_exposure_none_is_the_identity_and_the_default():
    im = tile(0)
    assert PreprocessSpec().exposure == "none"
    assert normalize_exposure(im, PreprocessSpec()) is im
    spec = PreprocessSpec(height=48, width=64)
    np.testing.assert_array_equal(resize_image(im, spec), im)


def test_exposure_gain_undoes_a_global_exposure_change():
    spec = PreprocessSpec(height=48, width=64, exposure="gain", exposure_mean=120)
    bright = tile(1, level=160)
    dark = (bright.astype(np.float32) * 0.5).round().astype(np.uint8)  # same scene, half the exposure
    a, b = resize_image(bright, spec), resize_image(dark, spec)
    assert a.dtype == np.uint8 and abs(a.mean() - 120) < 1 and abs(b.mean() - 120) < 1
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.5  # rounding of the darker image only
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()  # grey stays grey
    # contrast is scaled with the gain, not stretched: the scratch keeps its relative depth
    assert a[16:20, 5:-5].mean() / a.mean() == pytest.approx(bright[16:20, 5:-5].mean() / bright.mean(), rel=0.03)


def test_exposure_standardize_sets_mean_and_std():
    spec = PreprocessSpec(height=48, width=64, exposure="standardize", exposure_mean=110, exposure_std=30)
    for level in (60, 150):
        out = resize_image(tile(2, level=level), spec).astype(np.float64)
        assert abs(out.mean() - 110) < 1 and abs(out.std() - 30) < 1


@pytest.mark.parametrize("mode", ["gain", "standardize", "clahe"])
def test_exposure_is_bounded_on_flat_and_black_images(mode: str):
    spec = PreprocessSpec(height=16, width=16, exposure=mode)
    for level in (0, 3):
        flat = np.full((16, 16, 3), level, np.uint8)
        out = resize_image(flat, spec)
        assert out.dtype == np.uint8 and len(np.unique(out)) == 1  # no division by zero, no invented texture
        if mode != "clahe":  # (histogram equalisation maps any flat image to one mid level by design)
            assert out.max() <= level * 8  # capped gain: black stays black, near-black is not made mid-grey


def test_exposure_clahe_equalises_dark_and_bright_versions():
    spec = PreprocessSpec(height=48, width=64, exposure="clahe", clahe_clip=2.0)
    dark, bright = tile(3, level=60), tile(3, level=170)
    a, b = resize_image(dark, spec), resize_image(bright, spec)
    assert (a[..., 0] == a[..., 2]).all()  # grey in, grey out
    assert abs(a.mean() - b.mean()) < 0.5 * abs(dark.mean() - bright.mean())
    assert a.std() > dark.std()  # local contrast raised


def test_exposure_letterbox_pads_after_normalising():
    spec = PreprocessSpec(height=48, width=48, resize="letterbox", pad_value=0, exposure="gain", exposure_mean=127)
    out = resize_image(tile(4, h=24, w=48, level=50), spec)
    assert (out[:12] == 0).all() and (out[36:] == 0).all()  # padding untouched
    assert abs(out[12:36].mean() - 127) < 1  # statistics from the content, not the padding


def test_exposure_spec_validation_and_round_trip():
    for bad in ({"exposure": "hist"}, {"exposure_mean": 0}, {"exposure_std": 0}, {"clahe_clip": 0}):
        with pytest.raises(ValidationError):
            PreprocessSpec(**bad)
    spec = PreprocessSpec(exposure="standardize", exposure_mean=100, exposure_std=40)
    assert PreprocessSpec.model_validate_json(spec.model_dump_json()) == spec
    old = PreprocessSpec.model_validate({"height": 224, "width": 224})  # metadata written before the field
    assert old.exposure == "none"


# -- augmentation ----------------------------------------------------------------------------------------

OFF = AugmentConfig(hflip=False, vflip=False, rotate_deg=0, shift=0, scale=0, gain=0, contrast=0, gamma=0,
                    blur_p=0, noise_std=0)
STRONG = AugmentConfig(rotate_deg=30, shift=0.2, scale=0.2, gain=0.8, contrast=0.8, gamma=0.8, blur_p=1.0,
                       noise_std=40)


def batch_f(seed: int = 0, n: int = 6, h: int = 24, w: int = 28) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float()


@pytest.mark.parametrize("cfg", [AugmentConfig(), STRONG], ids=["default", "strong"])
def test_augment_shape_range_and_determinism(cfg: AugmentConfig):
    x = batch_f()
    a = augment(x, cfg, torch.Generator().manual_seed(5))
    b = augment(x, cfg, torch.Generator().manual_seed(5))
    c = augment(x, cfg, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 255 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)
    assert torch.equal(x, batch_f())  # input not modified in place


def test_augment_identity_when_off():
    x = batch_f(1)
    assert torch.equal(augment(x, OFF, torch.Generator().manual_seed(0)), x)


def test_augment_flips_only_are_exact_flips():
    x = batch_f(2, n=32)
    out = augment(x, OFF.model_copy(update={"hflip": True, "vflip": True}), torch.Generator().manual_seed(0))
    kinds = set()
    for i in range(len(x)):
        for kind, t in {"id": x[i], "h": x[i].flip(2), "v": x[i].flip(1), "hv": x[i].flip(1).flip(2)}.items():
            if torch.equal(out[i], t):
                kinds.add(kind)
                break
        else:
            pytest.fail(f"image {i} is not a flip of its input")
    assert kinds == {"id", "h", "v", "hv"}  # 32 draws cover all four with overwhelming probability


def test_augment_photometric_changes_brightness_not_geometry():
    x = torch.full((8, 3, 16, 16), 100.0)
    out = augment(x, OFF.model_copy(update={"gain": 0.5}), torch.Generator().manual_seed(0))
    per_image = out.view(8, -1)
    assert (per_image.std(1) < 1e-4).all()  # flat images stay flat
    levels = per_image[:, 0]
    assert levels.min() >= 50 - 1e-3 and levels.max() <= 150 + 1e-3 and levels.std() > 1


def test_augment_on_a_single_image_and_uint8_range_input():
    x = torch.full((1, 3, 8, 8), 255.0)
    out = augment(x, STRONG, torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 8, 8) and out.max() <= 255 and out.min() >= 0


# -- load_images -----------------------------------------------------------------------------------------


def test_load_images_reports_unreadable_files(tmp_path: Path):
    spec = PreprocessSpec(height=16, width=16)
    for cls in ("bad", "good"):
        (tmp_path / cls).mkdir()
    ok = cv2.imencode(".png", np.full((20, 20, 3), 9, np.uint8))[1].tobytes()
    (tmp_path / "good" / "a.png").write_bytes(ok)
    (tmp_path / "good" / "half.png").write_bytes(ok[: len(ok) // 2])
    (tmp_path / "bad" / "text.jpg").write_text("not an image")
    (tmp_path / "bad" / "b.png").write_bytes(ok)
    (tmp_path / "bad" / "dangling.png").symlink_to(tmp_path / "gone.png")  # OSError when read
    ds = scan_image_folder(tmp_path)
    calls: list[tuple[int, int]] = []
    x, y, skipped = load_images(ds, spec, progress=lambda i, n: calls.append((i, n)))
    assert x.shape == (2, 16, 16, 3) and x.dtype == torch.uint8 and (x == 9).all()
    assert y.tolist() == [ds.classes.index("bad"), ds.classes.index("good")]
    assert {Path(s["path"]).name for s in skipped} == {"half.png", "text.jpg", "dangling.png"}
    assert all(s["error"] for s in skipped)
    assert calls == [(i, 5) for i in range(1, 6)]


def test_load_images_all_unreadable(tmp_path: Path):
    spec = PreprocessSpec(height=16, width=24)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    x, y, skipped = load_images(scan_image_folder(tmp_path), spec)
    assert x.shape == (0, 16, 24, 3) and x.dtype == torch.uint8 and y.shape == (0,) and len(skipped) == 2
