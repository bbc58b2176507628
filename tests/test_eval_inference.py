"""Evaluation on a tiny real model: whole vs sliding-window inference, compute figures."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.common.model import build_model
from pipelines.evaluate.evaluator import EvalOptions, evaluate_model
from pipelines.evaluate.inference import predict


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = {"backbone": "vit_tiny_patch16_384", "num_classes": 4,
           "policy": {"pretrained": False, "levels": [2, 4]}, "exits": {"blocks": [2, 4]}}
    return build_model(cfg, {"policy_mode": "oracle", "exit_thresholds": [0.3], "top_k": 1}).eval()


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
    result = evaluate_model(model, loader, num_classes=4,
                            options=EvalOptions(count_flops=True, latency_samples=1))
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
    result = evaluate_model(model, loader, num_classes=4,
                            options=EvalOptions(max_samples=2, count_flops=False))
    assert result.num_images == 2 and result.gflops is None


def test_no_data_gives_empty_figures_of_the_model_shapes(model) -> None:
    """A rank without images (more ranks than images) still reduces fixed-shape tensors;
    alone, it reports nothing rather than failing."""
    result = evaluate_model(model, [], num_classes=4, options=EvalOptions(
        count_flops=True, latency_samples=1, progress=False))
    assert result.num_images == 0 and result.gflops is None and result.latency_ms is None
    assert result.tokens_per_block == [] and result.supertokens_per_level == {}
    assert result.per_class_halting == {} and math.isnan(result.miou)


def test_levels_and_exits_come_from_the_model(model) -> None:
    result = evaluate_model(model, [_batch(0)], num_classes=4,
                            options=EvalOptions(count_flops=False, progress=False))
    assert set(result.supertokens_per_level) == {"1", "2", "4"}  # 1 + policy.levels [2, 4]
    assert set(result.halted_per_exit) == {"exit_2", "exit_4"}


def test_progress_is_plain_lines_on_stderr_when_not_a_tty(model, capsys) -> None:
    loader = [_batch(i) for i in range(3)]
    evaluate_model(model, loader, num_classes=4, options=EvalOptions(
        max_samples=2, count_flops=False, progress=True, progress_every_s=0))
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert "\r" not in captured.err
    assert lines[0] == "eval: 2 images"
    assert lines[1].startswith("eval: 1/2 images (50%), ") and "images/s" in lines[1]
    assert lines[2].startswith("eval: 2/2 images (100%), ")
    assert lines[-1].startswith("eval: done, 2 images in ")
    evaluate_model(model, loader[:1], num_classes=4,
                   options=EvalOptions(count_flops=False))  # default: rank 0
    assert capsys.readouterr().err.startswith("eval: images until the data ends")
    evaluate_model(model, loader[:1], num_classes=4,
                   options=EvalOptions(count_flops=False, progress=False))
    assert capsys.readouterr().err == ""
