"""Evaluation on a tiny real model: whole vs sliding-window inference, compute figures."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.evaluate import evaluate_model, predict
from pipelines.model_config import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = {"backbone": "vit_tiny_patch16_384", "num_classes": 4,
           "policy": {"mode": "oracle", "pretrained": False, "levels": [2, 4]},
           "exits": {"blocks": [2, 4], "thresholds": [0.3], "top_k": 1}}
    return build_model(cfg).eval()


def _batch(seed: int, h: int = 64, w: int = 96):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(1, 3, h, w, generator=g)
    labels = torch.zeros(1, h, w, dtype=torch.long)
    labels[:, :, w // 2:] = 1  # two flat regions: the oracle shares them
    labels[:, : h // 4] = 255
    return images, labels


def test_slide_with_one_window_equals_whole(model) -> None:
    images, labels = _batch(0)
    with torch.no_grad():
        whole, _ = predict(model, images, labels, mode="whole")
        slide, outs = predict(model, images, labels, mode="slide", crop_size=96, stride=64)
    assert len(outs) == 1
    torch.testing.assert_close(slide, whole)


def test_slide_covers_every_pixel_at_any_resolution(model) -> None:
    images, labels = _batch(1, h=80, w=120)  # not a multiple of the window or of 16
    with torch.no_grad():
        logits, outs = predict(model, images, labels, mode="slide", crop_size=64, stride=48)
    assert logits.shape == (1, 4, 80, 120)
    assert torch.isfinite(logits).all()
    assert len(outs) == 2 * 3  # rows: 0, 16; cols: 0, 48, 56


def test_compute_figures_add_up(model) -> None:
    loader = [_batch(i) for i in range(3)]
    result = evaluate_model(model, loader, num_classes=4, count_flops=True, latency_samples=1)
    d = result.to_dict()
    assert d["num_images"] == 3
    assert 0 < d["tokens_mean"] < d["tokens_in"] == 24  # 4 x 6 grid, oracle sharing
    assert len(d["tokens_per_block"]) == 12
    assert d["tokens_per_block"][0] == pytest.approx(d["tokens_mean"])
    # halting removes tokens after exit blocks 2 and 4 (1-based), never before
    assert d["tokens_per_block"][4] <= d["tokens_per_block"][2] <= d["tokens_per_block"][1]
    assert d["halted_fraction"] == pytest.approx(sum(d["halted_per_exit"].values()))
    assert set(d["halted_per_exit"]) == {"exit_2", "exit_4"}
    for rates in d["per_class_halting"].values():
        assert sum(rates.values()) == pytest.approx(1.0)
    split = d["gflops_split"]
    assert split["exits"] > 0 and split["decoder"] > 0 and split["encoder"] > 0
    assert d["gflops"] == pytest.approx(sum(split.values()))
    assert d["latency_ms"] > 0
    assert 0 <= d["miou"] <= 1 and not math.isnan(d["pixel_accuracy"])
    assert set(result.headline()) >= {"miou", "gflops", "tokens_mean", "halted_fraction"}


def test_max_samples_caps_the_evaluation(model) -> None:
    loader = [_batch(i) for i in range(4)]
    result = evaluate_model(model, loader, num_classes=4, max_samples=2, count_flops=False)
    assert result.num_images == 2 and result.gflops is None
