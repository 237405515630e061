"""Opt-in recipe options of TrainConfig: class shares in the balanced batches, exposure in the spec."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.train import AUTO_GOOD_WEIGHT_MAX, AUTO_STEPS, TrainConfig, _balanced_batches, resolve_sampling


def labels() -> torch.Tensor:
    # class 0: 2 images, class 1: 10, class 2: 3 (the good class here is 1)
    return torch.tensor([0, 0] + [1] * 10 + [2] * 3)


def class_counts(batches: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return torch.bincount(y[torch.cat(batches)], minlength=3).float()


def test_balanced_batches_draw_every_class_equally_by_default():
    y = labels()
    batches = _balanced_batches(y, 3, batch=30, steps=200, gen=torch.Generator().manual_seed(0))
    assert all(b.shape == (30,) for b in batches)
    share = class_counts(batches, y) / (30 * 200)
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.02)  # not 2:10:3 as in the data


def test_balanced_batches_follow_class_share():
    y = labels()
    share = torch.tensor([1.0, 4.0, 1.0])
    batches = _balanced_batches(y, 3, batch=30, steps=200, gen=torch.Generator().manual_seed(0), class_share=share)
    got = class_counts(batches, y) / (30 * 200)
    assert torch.allclose(got, share / share.sum(), atol=0.02)
    # deterministic for a seed, and a missing class is never drawn
    again = _balanced_batches(y, 3, batch=30, steps=200, gen=torch.Generator().manual_seed(0), class_share=share)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    y_missing = torch.tensor([1] * 5 + [2] * 5)
    drawn = torch.cat(_balanced_batches(y_missing, 3, 16, 20, torch.Generator().manual_seed(1), share))
    assert set(y_missing[drawn].tolist()) == {1, 2}


def test_good_weight_and_exposure_options():
    assert TrainConfig().good_weight == "auto" and TrainConfig().exposure == "none"
    assert TrainConfig().preprocess_spec().exposure == "none"  # default models unchanged
    spec = TrainConfig(exposure="standardize", img_size=96).preprocess_spec()
    assert spec.exposure == "standardize" and spec.height == 96
    for bad in ({"good_weight": 0}, {"good_weight": "most"}, {"steps_per_epoch": 0}, {"exposure": "hist"}):
        with pytest.raises(ValidationError):
            TrainConfig(**bad)


def test_auto_sampling_scales_with_the_good_images():
    """20 shots keep the balanced recipe; a good-heavy set draws goods more often and runs longer epochs."""
    few = np.array([0] * 20 + [1] * 15 + [2] * 20)  # good = 1: fewer goods than defects
    assert resolve_sampling(TrainConfig(), few, good=1) == (1.0, AUTO_STEPS[0])
    many = np.array([0] * 20 + [1] * 225 + [2] * 20)
    weight, steps = resolve_sampling(TrainConfig(), many, good=1)
    assert weight == pytest.approx((225 / 20) ** 0.5) and steps == AUTO_STEPS[1]  # 10 x 3.35, capped
    some = np.array([0] * 20 + [1] * 45 + [2] * 20)  # 1.5 x as many goods: 15 steps
    assert resolve_sampling(TrainConfig(), some, good=1) == (pytest.approx(1.5), 15)
    balanced = np.array([0] * 200 + [1] * 200)  # a big balanced set keeps the measured recipe
    assert resolve_sampling(TrainConfig(), balanced, good=1) == (1.0, AUTO_STEPS[0])
    huge = np.array([0] * 5 + [1] * 5000)
    assert resolve_sampling(TrainConfig(), huge, good=1) == (AUTO_GOOD_WEIGHT_MAX, AUTO_STEPS[1])
    # explicit numbers are taken as given; None is one pass over the set
    assert resolve_sampling(TrainConfig(good_weight=2.5, steps_per_epoch=7), many, good=1) == (2.5, 7)
    assert resolve_sampling(TrainConfig(good_weight=0.5), many, good=1) == (0.5, AUTO_STEPS[0])
    assert resolve_sampling(TrainConfig(steps_per_epoch=None), huge, good=1)[1] == -(-5005 // 16)
    # a defect class with no training image does not dilute the mean
    assert resolve_sampling(TrainConfig(), np.array([1] * 80 + [2] * 20), good=1)[0] == 2.0
