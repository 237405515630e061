"""Pixel masks and the per-cell head: units, then a tiny end-to-end run with ONNX parity."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.data.augment import AugmentConfig, augment
from pipeline.data.folders import scan_image_folder
from pipeline.data.masks import find_mask, load_masks
from pipeline.preprocess import PreprocessSpec
from pipeline.synth import generate_dataset
from pipeline.train import IGNORE, DefectClassifier, cell_targets

SPEC = PreprocessSpec(height=64, width=64)


class _FlatBackbone(torch.nn.Module):
    """A stand-in feature extractor: 4 channels, stride 16, for testing the head's arithmetic."""

    num_features = 4

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(torch.cat([x, x[:, :1] * 0 + 1], 1), 16)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_map(x).mean(dim=(2, 3))


def test_cell_probs_are_a_distribution_decided_by_the_most_defective_cell():
    clf = DefectClassifier(_FlatBackbone(), 3, head="cells", good_index=1)
    logits = torch.zeros(2, 3, 2, 2)
    logits[:, 1] = 5.0  # every cell confidently good ...
    logits[1, 0, 1, 1] = 10.0  # ... except one cell of image 1, confidently class 0
    p = clf.cell_probs(logits)
    assert torch.allclose(p.sum(1), torch.ones(2), atol=1e-6)
    cell = torch.softmax(logits, 1)
    assert torch.allclose(p[:, 1], cell[:, 1].flatten(1).amin(1))  # P(good) = the least good cell's
    assert p[0].argmax() == 1 and p[1].argmax() == 0
    # the defect share goes to the class whose best cell is strongest
    assert p[1, 0] > 0.99 * (1 - p[1, 1])


def test_cell_head_uses_the_linear_head_weights_per_cell():
    clf = DefectClassifier(_FlatBackbone(), 3, head="cells", good_index=0)
    x = torch.rand(2, 3, 32, 32)
    fmap = clf.backbone.forward_map(x)
    per_cell = clf.head(fmap.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.allclose(clf.cell_logits(fmap), per_cell, atol=1e-6)
    probs, emb = clf.predict(x)
    assert probs.shape == (2, 3) and torch.allclose(emb, fmap.mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="good class"):
        DefectClassifier(_FlatBackbone(), 3, head="cells")
    with pytest.raises(ValueError, match="pooled"):
        DefectClassifier(_FlatBackbone(), 3, head="avg")


def test_cell_dropout_on_the_head_weights_equals_dropout_on_the_features():
    """The stage-1 loss drops channels through the weights (no copy of the cache): same loss, same gradient."""
    from pipeline.train import TrainConfig, _cell_loss

    cfg = TrainConfig(dropout=0.3)
    clf = DefectClassifier(_FlatBackbone(), 3, head="cells", good_index=0)
    torch.nn.init.normal_(clf.head.weight)
    cells, y = torch.randn(5, 4, 4), torch.tensor([0, 1, 2, 1, 0])
    targets = torch.randint(0, 3, (5, 4))
    clf.dropout.train()
    torch.manual_seed(7)
    loss = _cell_loss(clf, cells, y, targets, cfg)
    (grad,) = torch.autograd.grad(loss, clf.head.weight)

    torch.manual_seed(7)  # the reference: the features themselves dropped, image by image
    keep = torch.rand(5, 1, 4) >= cfg.dropout
    clf.dropout.eval()
    ref = _cell_loss(clf, cells * keep / (1 - cfg.dropout), y, targets, cfg)
    (ref_grad,) = torch.autograd.grad(ref, clf.head.weight)
    assert keep.float().mean() < 1  # something was dropped
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_cell_targets_label_defect_cells_ignore_their_ring_and_unmasked_defects():
    masks = torch.zeros(3, 64, 64)
    masks[0, 0:8, 0:8] = 1.0  # defect in the top-left cell of image 0
    labels = torch.tensor([2, 1, 2])  # good class 1; image 2 is a defect without a mask
    t = cell_targets(masks, torch.tensor([True, False, False]), labels, good=1, grid=(4, 4))
    assert t.shape == (3, 4, 4)
    assert t[0, 0, 0] == 2
    assert t[0, 0, 1] == IGNORE and t[0, 1, 0] == IGNORE and t[0, 1, 1] == IGNORE
    assert (t[0, 2:, :] == 1).all() and (t[0, :, 2:] == 1).all()
    assert (t[1] == 1).all()  # a good image: every cell good
    assert (t[2] == IGNORE).all()  # no mask: no per-cell claim
    # a defect too small to reach a quarter of any cell after resizing still marks its strongest cell
    faint = torch.zeros(1, 64, 64)
    faint[0, 40, 40] = 0.1
    t = cell_targets(faint, torch.tensor([True]), torch.tensor([0]), good=1, grid=(4, 4))
    assert t[0, 2, 2] == 0 and (t == 0).sum() == 1


def test_augment_moves_masks_with_their_images():
    x = torch.zeros(4, 3, 32, 32)
    x[:, :, 2:6, 20:30] = 200.0
    masks = (x[:, 0] > 0).float()
    cfg = AugmentConfig(gain=0, contrast=0, gamma=0, blur_p=0, noise_std=0)
    out, m = augment(x, cfg, torch.Generator().manual_seed(3), masks=masks)
    assert m.shape == masks.shape
    bright = out[:, 0] > 100
    assert ((m > 0.5) == bright).float().mean() > 0.97  # same flips and warps
    # photometric jitter leaves the masks alone
    out2, m2 = augment(x, AugmentConfig(), torch.Generator().manual_seed(3), masks=masks)
    assert float(m2.max()) <= 1.0 + 1e-6


def test_masks_are_found_by_stem_and_checked_against_their_image(tmp_path):
    data, masks = tmp_path / "images", tmp_path / "masks"
    generate_dataset(data, n=2, size=64, seed=0, masks_dir=masks, good_multiplier=1)
    ds = scan_image_folder(data)
    crack = next(s.path for s in ds.samples if ds.classes[s.label] == "crack")
    assert find_mask(crack, data, masks) == masks / "crack" / crack.name
    assert find_mask(crack, data, tmp_path / "elsewhere") is None
    # a mask saved in another format is found by its stem
    other = next(s.path for s in ds.samples if ds.classes[s.label] == "spot")
    png = masks / "spot" / other.name
    cv2.imwrite(str(png.with_suffix(".bmp")), cv2.imread(str(png)))
    png.unlink()
    # a mask whose shape does not fit its image is reported, not silently stretched
    wrong = masks / "scratch" / next(s.path.name for s in ds.samples if ds.classes[s.label] == "scratch")
    cv2.imwrite(str(wrong), np.full((10, 80), 255, np.uint8))
    m, problems = load_masks(ds, masks, SPEC, "good")
    assert m.shape == (len(ds.samples), 64, 64)
    assert [Path(p["path"]).name for p in problems] == [wrong.name]
    good = [i for i, s in enumerate(ds.samples) if ds.classes[s.label] == "good"]
    assert float(m[good].abs().sum()) == 0
    defects_with_masks = int((m.flatten(1).amax(1) > 0).sum())
    assert defects_with_masks == 2 * 4 - 1  # every defect image but the mismatched one
    with pytest.raises(FileNotFoundError):
        load_masks(ds, tmp_path / "missing", SPEC, "good")


FAST = {"img_size": 64, "feature_views": 2, "head_steps": 40, "finetune_epochs": 1, "steps_per_epoch": 2,
        "batch_size": 8, "unfreeze_blocks": 1}


def test_train_with_masks_and_the_cell_head_exports_a_checked_model(tmp_path):
    from pipeline.cli import main
    from pipeline.metadata import load_metadata
    from pipeline.train import classifier_for, load_checkpoint

    data, masks = tmp_path / "data", tmp_path / "masks"
    generate_dataset(data, n=4, size=64, seed=0, masks_dir=masks, good_multiplier=2)
    cfg = tmp_path / "fast.yaml"
    cfg.write_text(yaml.safe_dump(FAST))
    res = CliRunner().invoke(main, ["train", str(data), "--out", str(tmp_path / "run"), "--config", str(cfg),
                                    "--masks", str(masks)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "head       cells (16 defect training images with a mask)" in res.output
    meta = load_metadata(tmp_path / "run" / "model.onnx")
    assert meta.head == "cells" and meta.extra["train_config"]["head"] == "auto"  # auto: masks -> cells
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["parity"]["top1_agreement"] == 1.0 and metrics["parity"]["max_abs_prob_diff"] <= 1e-4
    assert metrics["masks_dir"] == str(masks) and metrics["head"] == "cells"
    # the checkpoint rebuilds from the metadata alone (what re-adaptation does)
    clf = classifier_for(meta)
    clf.load_state_dict(load_checkpoint(tmp_path / "run" / "checkpoint.npz"))
    assert metrics["masked_defect_images"] == 4 * 4  # every defect image of the synthetic set has its mask

    # a mask folder that matches nothing is a mistake to report, not a silent no-op
    res = CliRunner().invoke(main, ["train", str(data), "--out", str(tmp_path / "run2"), "--config", str(cfg),
                                    "--masks", str(tmp_path)])
    assert res.exit_code == 2 and "no mask with a defect" in res.output


def test_int8_keeps_the_per_cell_head_in_float(tmp_path):
    """The INT8 exporter's head exclusion finds the per-cell head (which reads the feature map, not the
    pooled embedding) as it finds the pooled one."""
    import onnx

    from pipeline.export.quantize import head_node_names
    from pipeline.export.torch_export import export_onnx

    spec = PreprocessSpec(height=32, width=32)
    ops = {}
    for head in ("pooled", "cells"):
        clf = DefectClassifier(_FlatBackbone(), 3, head=head, good_index=1).eval()
        path = export_onnx(clf, spec, tmp_path / f"{head}.onnx")
        by_name = {n.name: n.op_type for n in onnx.load(str(path)).graph.node}
        ops[head] = [by_name[n] for n in head_node_names(path)]
        assert "AveragePool" not in ops[head]  # the backbone stays quantisable
    assert ops["pooled"] == ["ReduceMean", "Gemm", "Softmax"]
    assert {"Conv", "Softmax", "ReduceMax", "ReduceMean"} <= set(ops["cells"])


def test_synth_cli_writes_masks_beside_not_inside_the_dataset(tmp_path):
    from pipeline.cli import main

    res = CliRunner().invoke(main, ["synth", str(tmp_path / "data"), "--n", "2", "--size", "64",
                                    "--masks", str(tmp_path / "masks")])
    assert res.exit_code == 0, res.output
    for kind in ("scratch", "spot", "crack", "edge_chip"):
        images = sorted(p.name for p in (tmp_path / "data" / kind).iterdir())
        assert sorted(p.name for p in (tmp_path / "masks" / kind).iterdir()) == images
        for name in images:
            mask = cv2.imread(str(tmp_path / "masks" / kind / name), cv2.IMREAD_GRAYSCALE)
            image = cv2.imread(str(tmp_path / "data" / kind / name))
            assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 255} and mask.max() == 255
    assert not (tmp_path / "masks" / "good").exists()
    res = CliRunner().invoke(main, ["synth", str(tmp_path / "d2"), "--n", "1", "--masks", str(tmp_path / "d2" / "m")])
    assert res.exit_code == 2 and "outside OUT_DIR" in res.output
