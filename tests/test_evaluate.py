"""pipeline.evaluate: metrics by hand, threshold edge cases, AUROC vs brute force, model evaluation, plots, report."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.decode import decode_file
from pipeline.data.folders import scan_image_folder
from pipeline.evaluate import (
    EvalOutputs,
    allowed_false_rejects,
    threshold_warning,
    binary_curve,
    choose_threshold,
    classification_metrics,
    evaluate_model,
    evaluate_to_dir,
    false_reject_rate,
    plot_confusion_matrix,
    plot_recall_vs_frr,
    plot_score_histogram,
    save_metrics,
    write_report,
)
from pipeline.runtime import OnnxModel
from tests.tiny_model import make_tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["good", "crack", "hole"]


def _rows(p_good: list[float], pred: list[int]) -> np.ndarray:
    """Probability rows with the given p(good) whose argmax is ``pred``."""
    out = []
    for pg, k in zip(p_good, pred):
        rest = 1.0 - pg
        row = [pg, 0.0, 0.0]
        if k == 0:
            row[1] = row[2] = rest / 2
        else:
            row[k] = rest * 0.9
            row[3 - k] = rest * 0.1
        assert int(np.argmax(row)) == k
        out.append(row)
    return np.array(out)


def _score(p_good: float) -> float:
    """A defect score as the runtime computes it (float32), for exact boundary checks."""
    return float(np.float32(1.0) - np.float32(p_good))


@pytest.fixture
def hand_case() -> tuple[np.ndarray, np.ndarray]:
    # true: 6 good, 3 crack, 1 hole. predicted: one good -> crack, one crack -> hole, the hole -> good.
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])
    pred = [0, 0, 0, 0, 0, 1, 1, 1, 2, 0]
    p_good = [0.9, 0.8, 0.7, 0.95, 0.6, 0.3, 0.1, 0.2, 0.1, 0.55]
    return y, _rows(p_good, pred)


# ---------------------------------------------------------------- classification metrics by hand

def test_hand_computed_metrics(hand_case):
    y, p = hand_case
    m = classification_metrics(y, p, CLASSES, "good", threshold=0.5)
    assert m["n_images"] == 10
    assert m["confusion_matrix"] == [[5, 1, 0], [0, 2, 1], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["balanced_accuracy"] == pytest.approx((5 / 6 + 2 / 3 + 0.0) / 3)
    pc = m["per_class"]
    assert pc["good"] == pytest.approx({"precision": 5 / 6, "recall": 5 / 6, "f1": 5 / 6, "support": 6})
    assert pc["crack"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert pc["hole"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # binary view at 0.5: good scores .1 .2 .3 .05 .4 .7 -> one false reject; defects .9 .8 .9 .45 -> 3 of 4
    assert m["false_reject_rate"] == pytest.approx(1 / 6)
    assert m["false_rejects"] == 1
    assert m["defect_recall_at_frr"] == pytest.approx(0.75)
    assert m["missed_defects"] == 1
    assert m["reject_rate_per_class"] == pytest.approx({"good": 1 / 6, "crack": 1.0, "hole": 0.0})
    assert m["threshold"] == 0.5 and m["threshold_source"] == "given"
    # 24 good/defect pairs, only (0.45 vs 0.7) ordered wrongly
    assert m["auroc"] == pytest.approx(23 / 24)
    # oracle at 2 % with 6 goods: no good may be rejected -> threshold just above 0.7 -> recall 3/4
    assert m["allowed_false_rejects"] == 0
    assert m["oracle_threshold"] > _score(0.3) and m["oracle_threshold"] == pytest.approx(0.7)
    assert m["defect_recall_at_target_frr_oracle"] == pytest.approx(0.75)
    assert "optimistic" in m["oracle_note"]
    json.dumps(m, allow_nan=False)


def test_threshold_chosen_on_data_when_none(hand_case):
    y, p = hand_case
    m = classification_metrics(y, p, CLASSES, "good", threshold=None, target_frr=0.2)
    # 6 goods at 20 %: floor(1.2) = 1 reject allowed -> accept the 2nd-highest good score 0.4
    assert m["threshold_source"] == "chosen_on_this_data"
    assert m["threshold"] == m["oracle_threshold"]
    assert _score(0.6) < m["threshold"] < 0.45
    assert m["false_reject_rate"] == pytest.approx(1 / 6)
    assert m["defect_recall_at_frr"] == 1.0


def test_balanced_accuracy_with_imbalance():
    y = np.array([0] * 9 + [1])
    p = np.array([[0.9, 0.1]] * 10)  # always "good"
    m = classification_metrics(y, p, ["good", "defect"], "good", threshold=0.5)
    assert m["accuracy"] == pytest.approx(0.9)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["per_class"]["defect"] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_class"]["good"]["precision"] == pytest.approx(0.9)
    assert m["defect_recall_at_frr"] == 0.0 and m["false_reject_rate"] == 0.0


def test_class_absent_from_y_true():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.8, 0.1, 0.1], [0.1, 0.2, 0.7], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])
    m = classification_metrics(y, p, CLASSES, "good")
    hole = m["per_class"]["hole"]
    assert hole == {"precision": 0.0, "recall": None, "f1": 0.0, "support": 0}  # predicted once, wrongly
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)  # over good and crack only
    assert m["reject_rate_per_class"]["hole"] is None
    json.dumps(m, allow_nan=False)


def test_single_class_present_is_null_not_nan():
    p = np.array([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4]])
    goods = classification_metrics(np.zeros(3, int), p, ["good", "defect"], "good")
    assert goods["auroc"] is None and goods["defect_recall_at_frr"] is None
    assert goods["false_reject_rate"] == 0.0 and goods["threshold"] > _score(0.6)
    assert goods["per_class"]["defect"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    defects = classification_metrics(np.ones(3, int), p, ["good", "defect"], "good")
    assert defects["threshold"] is None and defects["false_reject_rate"] is None
    assert defects["defect_recall_at_frr"] is None and defects["defect_recall_at_target_frr_oracle"] is None
    assert defects["balanced_accuracy"] == 0.0
    for m in (goods, defects):
        json.dumps(m, allow_nan=False)


def test_good_class_need_not_be_first():
    y = np.array([1, 1, 0])
    p = np.array([[0.2, 0.8], [0.4, 0.6], [0.9, 0.1]])  # classes defect, good
    m = classification_metrics(y, p, ["defect", "good"], "good", threshold=0.5)
    assert m["n_good"] == 2 and m["n_defect"] == 1
    assert m["false_reject_rate"] == 0.0 and m["defect_recall_at_frr"] == 1.0 and m["auroc"] == 1.0


@pytest.mark.parametrize("kwargs, match", [
    ({"good_class": "ok"}, "good_class"),
    ({"y_true": np.array([0, 1])}, "labels"),
    ({"y_true": np.array([0, 0, 5])}, "outside"),
    ({"y_true": np.array([0.5, 0, 1])}, "integer"),
    ({"probs": np.ones((3, 2))}, "shape"),
    ({"probs": np.array([[np.nan, 0, 1]] * 3)}, "NaN"),
    ({"target_frr": 1.5}, "target_frr"),
    ({"threshold": float("nan")}, "finite"),
    ({"y_true": np.array([], int), "probs": np.zeros((0, 3))}, "no images"),
])
def test_classification_metrics_rejects_bad_input(kwargs, match):
    args = {"y_true": np.array([0, 1, 2]), "probs": np.eye(3), "classes": CLASSES, "good_class": "good"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        classification_metrics(**args)


# ---------------------------------------------------------------- threshold selection

def test_threshold_exact_target_with_distinct_scores():
    goods = np.linspace(0.0, 0.99, 100)
    thr = choose_threshold(goods, 0.02)
    assert false_reject_rate(goods, thr) == pytest.approx(0.02)
    assert thr == np.nextafter(goods[-3], np.inf)  # the 3rd-highest good must be accepted
    # 0.29 * 100 is 28.999999999999996 in binary: still 29 rejects allowed
    assert false_reject_rate(goods, choose_threshold(goods, 0.29)) == pytest.approx(0.29)


def test_threshold_ties_are_never_split():
    goods = np.array([0.1, 0.5, 0.5, 0.5, 0.2])
    thr = choose_threshold(goods, 0.2)  # 1 reject allowed, but the top score is a 3-way tie
    assert 0.5 < thr < 0.5 + 1e-12
    assert false_reject_rate(goods, thr) == 0.0
    # 3 rejects allowed: the whole tie goes
    thr = choose_threshold(goods, 0.6)
    assert false_reject_rate(goods, thr) == pytest.approx(0.6) and 0.2 < thr <= 0.5


def test_threshold_target_zero_and_few_goods():
    goods = np.array([0.05, 0.3, 0.12])
    for target in (0.0, 0.02):
        thr = choose_threshold(goods, target)
        assert thr > 0.3 and false_reject_rate(goods, thr) == 0.0
    ten = np.linspace(0.1, 0.6, 10)
    assert allowed_false_rejects(10, 0.02) == 0
    assert false_reject_rate(ten, choose_threshold(ten, 0.02)) == 0.0  # 10 goods at 2 %: reject none
    assert false_reject_rate(ten, choose_threshold(ten, 0.1)) == pytest.approx(0.1)


def test_threshold_all_equal_scores():
    goods = np.full(100, 0.3)
    thr = choose_threshold(goods, 0.05)
    assert thr > 0.3 and false_reject_rate(goods, thr) == 0.0
    assert choose_threshold(goods, 1.0) == 0.0  # everything may be rejected
    assert false_reject_rate(goods, 0.0) == 1.0


def test_threshold_good_scored_one_is_clamped_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        thr = choose_threshold(np.array([0.1, 1.0]), 0.0)
    assert thr == 1.0
    assert "no threshold" in caplog.text


@pytest.mark.parametrize("scores, target", [
    (np.array([]), 0.02), (np.array([0.1, np.nan]), 0.02), (np.array([[0.1]]), 0.02),
    (np.array([0.1]), -0.01), (np.array([0.1]), 1.01), (np.array([0.1]), float("nan")),
])
def test_threshold_bad_input(scores, target):
    with pytest.raises(ValueError):
        choose_threshold(scores, target)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.01, 0.2, 0.2000001, 0.5, 0.7, 0.99]) | st.floats(0.0, 0.999),
                min_size=1, max_size=60),
       st.floats(0.0, 1.0))
def test_threshold_is_the_smallest_meeting_target(goods, target):
    g = np.array(goods)
    thr = choose_threshold(g, target)
    assert 0.0 <= thr <= 1.0
    assert false_reject_rate(g, thr) <= target + 1e-12
    below = g[g < thr]
    if thr > 0.0 and below.size:  # the next lower candidate (the highest accepted score) breaks the budget
        assert false_reject_rate(g, below.max()) > target


# ---------------------------------------------------------------- curve and AUROC

def _brute_auroc(scores: np.ndarray, is_defect: np.ndarray) -> float:
    d, g = scores[is_defect], scores[~is_defect]
    diff = d[:, None] - g[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


@pytest.mark.parametrize("seed", range(6))
def test_auroc_matches_pair_count(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    is_defect = rng.random(n) < rng.uniform(0.1, 0.9)
    is_defect[:2] = [True, False]
    scores = rng.integers(0, 25, n) / 25.0 + 0.2 * is_defect  # overlapping, with many ties
    curve = binary_curve(scores, is_defect)
    assert curve["auroc"] == pytest.approx(_brute_auroc(scores, is_defect), abs=1e-12)
    frr, rec, thr = curve["frr"], curve["defect_recall"], curve["thresholds"]
    assert (frr[0], rec[0], frr[-1], rec[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(frr) >= 0) and np.all(np.diff(rec) >= 0) and np.all(np.diff(thr) < 0)
    # every point is what thresholding at that value really gives
    for t, f, r in zip(thr, frr, rec):
        assert f == pytest.approx(np.mean(scores[~is_defect] >= t))
        assert r == pytest.approx(np.mean(scores[is_defect] >= t))


def test_curve_extremes_and_errors():
    assert binary_curve([0.1, 0.9], [False, True])["auroc"] == 1.0
    assert binary_curve([0.9, 0.1], [False, True])["auroc"] == 0.0
    assert binary_curve([0.5, 0.5], [False, True])["auroc"] == 0.5
    with pytest.raises(ValueError, match="good and defect"):
        binary_curve([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="shape"):
        binary_curve([0.1, 0.2], [True])


# ---------------------------------------------------------------- evaluate_model on a real ONNX artefact

def _write_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((20, 24, 3), value, np.uint8)
    img[5:9, 5:9] = min(value + 20, 255)  # not perfectly uniform
    assert cv2.imwrite(str(path), img)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for i, v in enumerate((10, 30, 50, 70, 115)):
        _write_png(root / "good" / f"g{i}.png", v)
    for i, v in enumerate((140, 180, 220)):
        _write_png(root / "defect" / f"d{i}.png", v)
    (root / "defect" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "good" / "empty.jpg").write_bytes(b"")
    return root


def test_evaluate_model_maps_classes_by_name_and_reports_skips(tiny_model, folder):
    model = OnnxModel(tiny_model)
    ds = scan_image_folder(folder)
    assert ds.classes == ["defect", "good"]  # sorted names: the opposite of the model's order
    calls: list[tuple[int, int]] = []
    metrics, out = evaluate_model(model, ds, batch_size=3, progress=lambda d, t: calls.append((d, t)))

    assert isinstance(out, EvalOutputs)
    assert calls[-1] == (10, 10) and [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert metrics["n_files"] == 10 and metrics["n_images"] == 8 and metrics["n_skipped"] == 2
    assert sorted(Path(s["path"]).name for s in metrics["skipped"]) == ["broken.png", "empty.jpg"]
    assert all(s["error"] for s in metrics["skipped"])
    assert len(out.paths) == 8 and out.probs.shape == (8, 2) and out.embeddings.shape == (8, 3)
    for path, label, emb in zip(out.paths, out.y_true, out.embeddings):
        assert model.classes[label] == path.parent.name  # label by name, in the model's order
        # rows stay aligned with their files: the tiny model's embedding is the input's channel means
        expected = model.preprocess([decode_file(path)]).mean(axis=(2, 3))[0]
        np.testing.assert_allclose(emb, expected, atol=1e-5)
    assert metrics["accuracy"] == 1.0 and metrics["balanced_accuracy"] == 1.0
    assert metrics["threshold"] == model.metadata.threshold and metrics["threshold_source"] == "given"
    # the evaluation's decisions are exactly the runtime's
    decisions = [p.decision for p in model.decide(out.probs)]
    assert metrics["false_rejects"] == sum(d == "defect" for d, y in zip(decisions, out.y_true) if y == 0)
    assert metrics["model"]["sha256"] == model.sha256
    json.dumps(metrics, allow_nan=False)


def test_threshold_on_the_boundary_agrees_with_runtime(tiny_model):
    """The threshold sits one float above a good part's score; evaluation and daemon must agree on it."""
    model = OnnxModel(tiny_model)
    rng = np.random.default_rng(3)
    p_good = rng.uniform(0.02, 0.5, 400).astype(np.float32)  # scores above 0.5: float32 rounding matters
    probs = np.stack([p_good, 1 - p_good], axis=1).astype(np.float32)
    y = np.zeros(400, int)
    for target in (0.0, 0.01, 0.02, 0.1, 0.33):
        m = classification_metrics(y, probs, model.classes, "good", target_frr=target)
        model.metadata = model.metadata.model_copy(update={"threshold": m["threshold"]})
        rejected = sum(p.decision == "defect" for p in model.decide(probs))
        assert rejected == m["false_rejects"] == allowed_false_rejects(400, target)


def test_evaluate_model_unknown_folder_class(tiny_model, folder):
    _write_png(folder / "scratch" / "s0.png", 200)
    with pytest.raises(ValueError, match="scratch"):
        evaluate_model(OnnxModel(tiny_model), scan_image_folder(folder))


def test_evaluate_model_subset_of_model_classes(tmp_path, folder):
    model = OnnxModel(make_tiny_model(tmp_path / "m3", classes=("good", "crack", "hole")))
    (folder / "defect").rename(folder / "crack")
    metrics, out = evaluate_model(model, scan_image_folder(folder))
    assert metrics["per_class"]["hole"]["support"] == 0 and metrics["per_class"]["hole"]["recall"] is None
    assert metrics["n_defect"] == 3 and out.probs.shape[1] == 3


def test_evaluate_model_nothing_readable(tiny_model, tmp_path):
    for cls in ("good", "defect"):
        (tmp_path / "bad" / cls).mkdir(parents=True)
        (tmp_path / "bad" / cls / "x.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of the 2 images"):
        evaluate_model(OnnxModel(tiny_model), scan_image_folder(tmp_path / "bad"))


# ---------------------------------------------------------------- plots and report

def test_evaluate_to_dir_writes_plots_metrics_and_escaped_report(tiny_model, folder, tmp_path):
    out_dir = tmp_path / "eval"
    title = 'Line <A> & "B"'
    metrics, _, report = evaluate_to_dir(OnnxModel(tiny_model), scan_image_folder(folder), out_dir, title=title,
                                         extra={"training wall time": "12.5 s", "note": "<b>x</b>"})
    for name in ("confusion_matrix.png", "recall_vs_frr.png", "score_histogram.png"):
        data = (out_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert json.loads((out_dir / "metrics.json").read_text())["n_images"] == metrics["n_images"]
    html_text = report.read_text(encoding="utf-8")
    assert report == out_dir / "report.html"
    assert html_text.count("data:image/png;base64,") == 3
    assert "Line &lt;A&gt; &amp; &quot;B&quot;" in html_text and "<A>" not in html_text
    assert "&lt;b&gt;x&lt;/b&gt;" in html_text and "12.5 s" in html_text
    assert "broken.png" in html_text and "Skipped files" in html_text
    assert "<script" not in html_text and "http://" not in html_text and "https://" not in html_text


def test_plots_edge_cases(tmp_path, hand_case):
    y, p = hand_case
    m = classification_metrics(y, p, CLASSES, "good", threshold=0.5)
    six = classification_metrics(np.arange(12) % 6, np.eye(6)[(np.arange(12) + (np.arange(12) % 4 == 0)) % 6],
                                 ["free", "blowhole", "break", "crack", "fray", "uneven"], "free")
    scores = 1 - p[:, 0]
    paths = [plot_confusion_matrix(m, tmp_path / "cm.png"),
             plot_confusion_matrix(six, tmp_path / "cm6.png"),
             plot_recall_vs_frr(scores, y != 0, tmp_path / "roc.png", threshold=0.5, target_frr=0.02),
             plot_recall_vs_frr(scores[:6], np.zeros(6, bool), tmp_path / "roc_single.png", threshold=0.5),
             plot_score_histogram(scores, y != 0, tmp_path / "hist.png", threshold=0.5)]
    for path in paths:
        assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 3000
    with pytest.raises(ValueError, match="shape"):
        plot_confusion_matrix({**m, "classes": ["a", "b"]}, tmp_path / "bad.png")


def test_write_report_without_images_and_missing_image(tmp_path, hand_case):
    y, p = hand_case
    m = classification_metrics(y, p, CLASSES, "good", threshold=0.5)
    report = write_report(tmp_path / "r", "plain", m, [])
    text = report.read_text(encoding="utf-8")
    assert "balanced accuracy" in text and "50.0%" in text and "0.5" in text
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "r2", "x", m, [tmp_path / "nope.png"])


def test_save_metrics_refuses_nan(tmp_path):
    save_metrics({"a": 1.0}, tmp_path / "ok.json")
    assert json.loads((tmp_path / "ok.json").read_text()) == {"a": 1.0}
    with pytest.raises(ValueError):
        save_metrics({"a": float("nan")}, tmp_path / "bad.json")


def test_import_is_light():
    code = ("import sys, pipeline.evaluate; "
            "bad = [m for m in ('torch', 'matplotlib', 'onnxruntime') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_evaluate_model_reads_every_real_image(magnetic_tile, tmp_path):
    """The real dataset goes through decode -> preprocess -> ORT with nothing skipped (tiny model: the
    numbers are meaningless, the plumbing is not)."""
    classes = ("free", "blowhole", "break", "crack", "fray", "uneven")
    model = OnnxModel(make_tiny_model(tmp_path / "m", classes=classes))
    ds = scan_image_folder(magnetic_tile)
    metrics, out = evaluate_model(model, ds)
    assert metrics["n_skipped"] == 0 and metrics["n_images"] == len(ds)
    assert metrics["n_good"] == ds.counts()["free"] and out.embeddings.shape == (len(ds), 3)
    json.dumps(metrics, allow_nan=False)


def test_threshold_warning_when_no_good_part_may_be_rejected():
    """Below 1 / target good parts the threshold is the highest good score: say so, and how many are needed."""
    for n, target, needed in ((25, 0.02, 50), (5, 0.02, 50), (9, 0.1, 10), (49, 0.02, 50)):
        text = threshold_warning(n, target)
        assert text and f"on {n} good images" in text and f"at least {needed} " in text
        assert allowed_false_rejects(needed, target) == 1 and allowed_false_rejects(needed - 1, target) == 0
    assert threshold_warning(50, 0.02) is None and threshold_warning(75, 0.02) is None
    assert threshold_warning(10, 0.0) is None  # a zero target asks for no rejects: nothing to warn about
