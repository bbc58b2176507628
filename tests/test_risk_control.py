"""Exit thresholds by conformal risk control (pipelines/evaluate/risk_control.py): the rule,
the loss it controls, its guarantee on exchangeable images, and ``step eval
--fit-exit-thresholds``."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines.evaluate.risk_control import (
    GRID,
    ExitTokens,
    ImageTokens,
    crc_threshold,
    image_losses,
    image_tokens,
    realised_risk,
)

MODEL = {"backbone": "vit_tiny_patch16_384", "num_classes": 7, "decoder": "linear",
         "policy": {"pretrained": False, "levels": [2, 4, 8]}, "exits": {"blocks": [4, 8]}}


def _image(scores: list[list[float]], costs: list[list[float]], pixels: int = 100) -> ImageTokens:
    return ImageTokens(pixels, [ExitTokens(torch.tensor(s, dtype=torch.float64),
                                           torch.tensor(c, dtype=torch.float64))
                                for s, c in zip(scores, costs, strict=True)])


def test_the_threshold_is_the_smallest_whose_conformal_bound_is_within_alpha():
    # 9 images; loss 0.5 below threshold 0.3, 0.05 from 0.3 to 0.6, 0 from 0.6 on
    losses = torch.where(GRID < 0.3, 0.5, torch.where(GRID < 0.6, 0.05, 0.0)).expand(9, -1)
    # (9 * 0.05 + 1) / 10 = 0.145; (9 * 0 + 1) / 10 = 0.1
    assert crc_threshold(losses, 0.15)[0] == pytest.approx(0.3)
    assert crc_threshold(losses, 0.12)[0] == pytest.approx(0.6)
    # 1 / (n + 1) > alpha: no number of calibration images this small can promise it
    assert crc_threshold(losses, 0.09) == (None, -1)
    assert crc_threshold(torch.zeros(99, len(GRID)), 0.01)[0] == 0.0


def test_an_image_s_loss_counts_the_tokens_that_halt_at_the_exit_and_reach_it():
    im = _image(scores=[[0.9, 0.5, 0.2], [0.95, 0.95, 0.95]],
                costs=[[10.0, 20.0, 40.0], [1.0, 2.0, 4.0]])
    first = image_losses([im], 0, [])[0]
    at = {t: float(first[int(round(t * 100))]) for t in (0.1, 0.3, 0.6, 0.95)}
    assert at == {0.1: 0.7, 0.3: 0.3, 0.6: 0.1, 0.95: 0.0}
    # exit 2 with exit 1 at 0.4: the first two tokens have halted already
    second = image_losses([im], 1, [0.4])[0]
    assert float(second[50]) == pytest.approx(0.04)
    assert float(second[96]) == 0.0
    assert bool((first[1:] <= first[:-1]).all())  # never increases with the threshold


def test_the_expected_loss_stays_within_alpha_on_exchangeable_images():
    """The guarantee itself: over many calibration / test draws from one distribution,
    the mean realised loss at the chosen threshold is at most alpha."""
    gen = torch.Generator().manual_seed(0)

    def draw(n: int) -> list[ImageTokens]:
        out = []
        for _ in range(n):
            score = torch.rand(50, generator=gen, dtype=torch.float64)
            # unsure tokens are the costly ones, with noise
            cost = (torch.rand(50, generator=gen, dtype=torch.float64) < (1 - score) ** 2) * 30.0
            out.append(ImageTokens(2000, [ExitTokens(score, cost)]))
        return out

    alpha, realised, chosen = 0.05, [], []
    for _ in range(200):
        losses = image_losses(draw(30), 0, [])
        t, _ = crc_threshold(losses, alpha)
        chosen.append(t)
        realised.append(realised_risk(draw(10), [t])[0])
    assert sum(realised) / len(realised) <= alpha
    # it does halt: the expected loss is 0.25 (1 - t)^3, within alpha from t = 0.54 on
    assert max(chosen) < 0.8


def test_the_cost_is_what_halting_every_token_at_the_exit_takes_from_the_pixels(tiny_shards):
    """On a real image: the tokens' costs at the first exit sum to at least what a forward
    that halts every token there loses against one that halts none (exactly that much,
    unless some token's exit prediction gains)."""
    from pipelines.common.data import batch_to_device, eval_loader
    from pipelines.common.model import build_model

    torch.manual_seed(0)
    model = build_model(MODEL).eval()
    model.set_inference({"policy_mode": "threshold", "merge_thresholds": 0.5})
    images, labels = batch_to_device(*next(iter(eval_loader(tiny_shards["val"],
                                                            num_workers=0))), "cpu")
    (im,) = image_tokens(model, images, labels)
    labelled = labels != 255
    assert im.pixels == int(labelled.sum())
    cost = im.exits[0].cost
    assert bool((cost >= 0).all()) and len(cost) == len(im.exits[0].score)
    with torch.no_grad():
        with model.inference_scope(halting=False):
            none = _mask(model, images)
        with model.inference_scope(halting=True, exit_thresholds=[0.0], top_k=0):
            all_halt = _mask(model, images)
    lost = int(((none == labels) & labelled).sum()) - int(((all_halt == labels) & labelled).sum())
    assert float(cost.sum()) >= lost
    assert float(cost.sum()) > 0  # random heads: the exit is worse than the decoder somewhere


def _mask(model, images: torch.Tensor) -> torch.Tensor:
    tokens = model.forward_tokens(images)
    encoded = model.forward_encoder(tokens)
    logits, _ = model.forward_head(tokens, encoded)
    return logits.argmax(1)


def test_step_eval_fits_exit_thresholds_on_shards(tiny_shards, tmp_path, capsys):
    from pipelines.cli import main
    from pipelines.common.checkpoint import save_checkpoint
    from pipelines.common.model import build_model

    torch.manual_seed(0)
    ckpt = str(save_checkpoint(tmp_path / "ckpt", build_model(MODEL)))
    out = tmp_path / "thresholds.json"
    assert main(["eval", "--checkpoint", ckpt, "--data", tiny_shards["val"],
                 "--fit-exit-thresholds", "--halting-risk", "0.5", "--policy-mode", "none",
                 "--json", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["images"] == 3 and [e["block"] for e in doc["exits"]] == [4, 8]
    assert [e["alpha"] for e in doc["exits"]] == [0.25, 0.25]
    for e in doc["exits"]:
        assert e["feasible"] and e["bound"] <= e["alpha"] + 1e-12
    thresholds = [float(t) for t in doc["exit_thresholds"].split(",")]
    assert thresholds == [e["threshold"] for e in doc["exits"]]
    assert doc["inference"]["exit_thresholds"] == thresholds
    assert f"pass --thresholds {doc['exit_thresholds']}" in printed
    # 3 images cannot promise 1 %: said, and halting is all but off at that exit
    assert main(["eval", "--checkpoint", ckpt, "--data", tiny_shards["val"],
                 "--fit-exit-thresholds", "--halting-risk", "0.01", "--policy-mode", "none",
                 "--json", str(out)]) == 0
    assert "no threshold keeps" in capsys.readouterr().out
    assert [e["threshold"] for e in json.loads(out.read_text())["exits"]] == [1.0, 1.0]


@pytest.mark.parametrize(("args", "message"), [
    (["--halting-risk", "1.5"], "halting_risk"),
    (["--fit-exit-temperature"], "one at a time"),
])
def test_bad_fit_settings_are_named(args, message, capsys):
    from pipelines.cli import main

    assert main(["eval", "--checkpoint", "c", "--data", "d", "--fit-exit-thresholds", *args,
                 "--no-mlflow"]) == 2
    assert message in capsys.readouterr().err


def test_a_risk_without_the_fit_is_refused(capsys):
    from pipelines.cli import main

    assert main(["eval", "--checkpoint", "c", "--data", "d", "--halting-risk", "0.02",
                 "--no-mlflow"]) == 2
    assert "--halting-risk: only with --fit-exit-thresholds" in capsys.readouterr().err
