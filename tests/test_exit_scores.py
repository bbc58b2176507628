"""Exit scores and temperatures: which tokens each score halts on hand-made probabilities,
agreement between consecutive exits in the model, the settings everywhere (validation,
registry, checkpoint, search space), and temperature fitting, also through `step eval`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from step_model.config import InferenceConfig, SettingsMismatch, parse_exit_temperatures
from step_model.exits import exit_scores, halting_mask

from helpers import tiny

# Four tokens, three classes, given as probabilities (logits = log p, so softmax gives
# them back): every score is checkable by hand.
PROBS = torch.tensor([
    [0.60, 0.40, 0.00],   # sure of class 0, but torn between two classes: margin 0.20
    [0.25, 0.50, 0.25],   # class 1, spread out: low entropy score
    [0.90, 0.05, 0.05],   # sure
    [0.46, 0.44, 0.10],   # a coin toss between 0 and 1: margin 0.02
])


def _logits() -> torch.Tensor:
    return PROBS.clamp_min(1e-12).log()[None]  # (1, 4, 3)


def _entropy_score(p: list[float]) -> float:
    return 1.0 - -sum(x * math.log(x) for x in p if x > 0) / math.log(3)


def test_each_score_is_the_one_documented():
    logits = _logits()
    conf, pred, ok = exit_scores(logits, "confidence")
    assert pred[0].tolist() == [0, 1, 0, 0] and ok.all()
    assert conf[0].tolist() == pytest.approx([0.60, 0.50, 0.90, 0.46], abs=1e-6)
    margin, _, _ = exit_scores(logits, "margin")
    assert margin[0].tolist() == pytest.approx([0.20, 0.25, 0.85, 0.02], abs=1e-6)
    entropy, _, _ = exit_scores(logits, "entropy")
    assert entropy[0].tolist() == pytest.approx([_entropy_score(p) for p in PROBS.tolist()],
                                                abs=1e-5)
    # agreement: the confidence where the previous exit predicted the same class, else 0
    agree, _, ok = exit_scores(logits, "agreement", previous=torch.tensor([[1, 1, 0, 0]]))
    assert ok[0].tolist() == [False, True, True, True]
    assert agree[0].tolist() == pytest.approx([0.0, 0.50, 0.90, 0.46], abs=1e-6)
    _, _, none = exit_scores(logits, "agreement")  # the first exit: no previous one
    assert not none.any()
    with pytest.raises(ValueError, match="exit_score: unknown exit score 'greedy'; expected "
                                         "one of confidence, margin, entropy, agreement"):
        exit_scores(logits, "greedy")


@pytest.mark.parametrize("score, previous, halted", [
    ("confidence", None, [True, True, True, True]),
    ("margin", None, [False, True, True, False]),
    ("entropy", None, [True, False, True, False]),  # 0.387, 0.054, 0.641, 0.137
    ("agreement", [1, 1, 0, 0], [False, True, True, True]),
    ("agreement", [0, 0, 2, 0], [True, False, False, True]),
    ("agreement", None, [False, False, False, False]),  # the first exit halts nothing
])
def test_each_score_halts_the_tokens_it_should(score, previous, halted):
    valid = torch.ones(1, 4, dtype=torch.bool)
    prev = None if previous is None else torch.tensor([previous])
    got = halting_mask(_logits(), valid, 0.22, 0, "confidence", score=score, previous=prev)
    assert got[0].tolist() == halted
    # padding never halts, whatever the score
    valid[0, 2] = False
    assert not halting_mask(_logits(), valid, 0.22, 0, "confidence", score=score,
                            previous=prev)[0, 2]


def test_top_k_keeps_the_highest_scored_tokens_of_each_class():
    # two class-0 tokens: A is the more confident, B has the wider margin
    probs = torch.tensor([[0.70, 0.30, 0.00], [0.65, 0.175, 0.175]])
    logits = probs.clamp_min(1e-12).log()[None]
    valid = torch.ones(1, 2, dtype=torch.bool)
    by_conf = halting_mask(logits, valid, 0.0, 1, "confidence", score="confidence")
    by_margin = halting_mask(logits, valid, 0.0, 1, "confidence", score="margin")
    assert by_conf[0].tolist() == [False, True]  # A kept active, B halts
    assert by_margin[0].tolist() == [True, False]  # B kept active, A halts


def test_temperature_changes_which_tokens_halt():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])  # p1 = 0.787, 0.576
    valid = torch.ones(1, 2, dtype=torch.bool)
    assert halting_mask(logits, valid, 0.7, 0)[0].tolist() == [True, False]
    # T = 2: the first token's logits become the second's, p1 = 0.576 < 0.7
    assert halting_mask(logits, valid, 0.7, 0, temperature=2.0)[0].tolist() == [False, False]
    # T = 0.5: sharper, p1 of the second token = e^2 / (e^2 + 2) = 0.787
    assert halting_mask(logits, valid, 0.7, 0, temperature=0.5)[0].tolist() == [True, True]


@pytest.mark.parametrize("score", ["margin", "entropy"])
def test_the_ablation_matches_the_counts_of_the_chosen_score(score):
    torch.manual_seed(0)
    logits = torch.randn(2, 60, 4) * 3
    valid = torch.ones(2, 60, dtype=torch.bool)
    ref = halting_mask(logits, valid, 0.5, 1, "confidence", score=score)
    plain = halting_mask(logits, valid, 0.5, 1, "confidence")
    assert ref.sum(1).tolist() != plain.sum(1).tolist()  # the score makes a difference
    for policy in ("random", "uniform"):
        other = halting_mask(logits, valid, 0.5, 1, policy, torch.Generator().manual_seed(1),
                             score=score)
        assert other.sum(1).tolist() == ref.sum(1).tolist()


# ---- in the model ---------------------------------------------------------------------------


def test_agreement_halts_where_the_two_exits_predict_the_same_class():
    model = tiny("none", exits=[2, 4], inference={
        "exit_thresholds": [0.0], "top_k": 0, "exit_score": "agreement"})
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 96, 96))
    assert out.flow.halted_per_exit[:, 0].tolist() == [0, 0]  # nothing at the first exit
    agree = out.exit_logits[0].argmax(-1) == out.exit_logits[1].argmax(-1)  # tokens == cells
    assert 0 < int(agree.sum()) < agree.numel()  # a test that can tell
    depth = out.flow.cell_exit_depth.flatten(1)
    assert torch.equal(depth == 4, agree)
    assert out.flow.halted_per_exit[:, 1].tolist() == agree.sum(1).tolist()


def test_exit_temperatures_reach_each_exit():
    model = tiny("none", exits=[2, 4], inference={"exit_thresholds": [0.5], "top_k": 0})
    x = torch.rand(1, 3, 64, 64)  # 16 tokens
    with torch.no_grad():
        model.set_inference(exit_temperature=[0.001, 1.0])  # one-hot at the first exit
        sharp = model(x).flow.halted_per_exit[0].tolist()
        model.set_inference(exit_temperature=[1000.0, 0.001])  # uniform there: p1 ~ 0.2
        flat = model(x).flow.halted_per_exit[0].tolist()
    assert sharp[0] == 16
    assert flat == [0, 16]


def test_per_exit_settings_must_fit_the_model():
    model = tiny("none", exits=[2, 4])
    with pytest.raises(SettingsMismatch, match="exit_temperature has 3 values for 2 exits; "
                                              "give one value \\(every exit\\) or 2"):
        model.set_inference(exit_temperature="1,2,3")
    assert model.inference.exit_temperature is None  # nothing changed
    assert model.inference.temperatures_per_exit(2) == [1.0, 1.0]
    model.set_inference(exit_temperature=1.5)
    assert model.inference.temperatures_per_exit(2) == [1.5, 1.5]


# ---- the settings everywhere -----------------------------------------------------------------


@pytest.mark.parametrize("given, expected", [
    (1.5, [1.5]), ("1.5", [1.5]), ("1.5,2", [1.5, 2.0]), ("1.5 2", [1.5, 2.0]),
    ([1.5, 2], [1.5, 2.0]), (None, None),
])
def test_exit_temperature_syntax(given, expected):
    assert parse_exit_temperatures(given) == expected
    assert InferenceConfig(exit_temperature=given).exit_temperature == expected


@pytest.mark.parametrize("field, given, message", [
    ("exit_score", "greedy",
     "Input should be 'confidence', 'margin', 'entropy' or 'agreement'"),
    ("exit_temperature", "0", "temperature: 0 is not > 0; expected 1.5 (every exit) or "
                              "1.5,1.2 (one per exit), each > 0"),
    ("exit_temperature", "1,-2", "exit 2: -2 is not > 0"),
    ("exit_temperature", "warm", "temperature: expected a number > 0, got 'warm'"),
    ("exit_temperature", "2=1.5", "exit temperatures have no levels"),
    ("exit_temperature", "inf", "temperature: inf is not > 0"),
])
def test_bad_values_name_the_field_and_what_is_allowed(field, given, message, capsys):
    from pydantic import ValidationError

    from pipelines.cli import main

    with pytest.raises(ValidationError) as err:
        InferenceConfig.model_validate({field: given})
    assert field in str(err.value) and message in str(err.value)
    flag = "--" + field.replace("_", "-")
    assert main(["eval", "--checkpoint", "c", "--data", "d", flag, given,
                 "--print-config"]) == 2
    line = capsys.readouterr().err
    assert line.startswith("step eval: error: ") and f"inference.{field}" in line
    assert message in line


def test_the_settings_round_trip_through_the_registry_and_a_checkpoint(tmp_path):
    from pipelines.common.checkpoint import INFERENCE_FILE, load_model, save_checkpoint
    from pipelines.tracking.registry import inference_from_tags, inference_tags

    chosen = InferenceConfig(exit_score="agreement", exit_temperature=[1.5, 2.25],
                             exit_thresholds=[0.7, 0.6])
    tags = inference_tags(chosen)
    assert json.loads(tags["step.inference"])["exit_temperature"] == [1.5, 2.25]
    assert tags["exit_score"] == "agreement" and tags["exit_temperature"] == "[1.5, 2.25]"
    assert InferenceConfig().apply(inference_from_tags(tags)) == chosen
    # a version registered before these settings existed: the confidence score it was
    # measured with, not today's default (the margin)
    assert InferenceConfig().exit_score == "margin"
    old = json.loads(tags["step.inference"])
    del old["exit_score"], old["exit_temperature"]
    back = InferenceConfig().apply(inference_from_tags({"step.inference": json.dumps(old)}))
    assert back.exit_score == "confidence" and back.exit_temperature is None

    model = tiny("none", exits=[2, 4], inference=chosen.to_dict())
    ckpt = save_checkpoint(tmp_path / "new", model)
    assert load_model(ckpt)[0].inference == chosen
    # a checkpoint written before: its inference.yaml lacks them
    written = yaml.safe_load((ckpt / INFERENCE_FILE).read_text())
    del written["exit_score"], written["exit_temperature"]
    (ckpt / INFERENCE_FILE).write_text(yaml.safe_dump(written))
    loaded = load_model(ckpt)[0].inference
    assert loaded.to_dict() == {**chosen.to_dict(), "exit_score": "confidence",
                                "exit_temperature": None}


def test_a_search_space_takes_the_score(tmp_path):
    from pipelines.common.settings import ConfigError
    from pipelines.tune.space import load_space

    space = load_space("halting_scores")
    assert "exit_score" in space.searched
    assert space.dims["exit_score"].grid() == ["confidence", "margin", "entropy", "agreement"]
    changes = space.to_inference({"exit_threshold": 0.5, "exit_score": "margin",
                                  "exit_policy": "confidence"}, num_exits=2).given()
    assert changes == {"exit_thresholds": [0.5], "exit_score": "margin",
                       "exit_policy": "confidence"}
    f = tmp_path / "space.yaml"
    f.write_text("name: s\nexit_score: {type: choice, values: [confidence, surprise]}\n"
                 "exit_temperature: {type: fixed, value: 2.0}\n")
    with pytest.raises(ConfigError, match="exit_score: 'surprise' is not a valid exit_score"):
        load_space(f)
    f.write_text("name: s\nexit_temperature: {type: uniform, low: 0.0, high: 3.0}\n")
    with pytest.raises(ConfigError, match="exit_temperature: 0.0 is not a valid "
                                          "exit_temperature"):
        load_space(f)


# ---- temperature fitting -------------------------------------------------------------------


def test_fitting_undoes_a_known_overconfidence():
    """Labels drawn from softmax(z) and the logits 3 z: the calibrated temperature is 3."""
    from pipelines.evaluate.temperature import calibration_error, fit_temperature, nll

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(40000, 6, generator=gen) * 1.5
    target = torch.multinomial(z.softmax(-1), 1, generator=gen).squeeze(1)
    logits = 3.0 * z
    t = fit_temperature(logits, target)
    assert t == pytest.approx(3.0, rel=0.05)
    assert nll(logits, target, t) < nll(logits, target) - 0.1
    assert calibration_error(logits, target, t) < 0.02 < calibration_error(logits, target)


def test_calibration_error_is_torchmetrics_ece():
    from torchmetrics.functional.classification import multiclass_calibration_error

    from pipelines.evaluate.temperature import calibration_error

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5000, 7, generator=gen) * 2
    target = torch.randint(0, 7, (5000,), generator=gen)
    for t in (1.0, 0.5, 3.0):
        ours = calibration_error(logits, target, t)
        ref = multiclass_calibration_error((logits / t).softmax(-1), target, num_classes=7,
                                           n_bins=15, norm="l1")
        assert ours == pytest.approx(float(ref), abs=1e-4)


def test_every_labelled_token_reaches_every_exit_while_fitting():
    """The fit sees every token at every exit, even where the settings would halt them
    all, and only the tokens with a labelled pixel; the model's settings are kept."""
    from pipelines.evaluate.temperature import exit_token_logits, fit_exit_temperatures

    model = tiny("none", exits=[2, 4], inference={"exit_thresholds": [0.0], "top_k": 0})
    before = model.inference
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 64, 80), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 5, (2, 64, 80), generator=gen)
    labels[0, :16, :32] = 255  # two cells of image 0 without a labelled pixel
    per_exit = exit_token_logits(model, images.float() / 255, labels)
    assert [len(t) for _, t in per_exit] == [2 * 20 - 2] * 2
    assert all(lg.shape == (38, 5) for lg, _ in per_exit)
    assert model.inference == before
    doc = fit_exit_temperatures(model, [(images, labels)])
    assert doc["images"] == 2 and [e["tokens"] for e in doc["exits"]] == [38, 38]
    assert [e["block"] for e in doc["exits"]] == [2, 4]
    assert all(e["nll_after"] <= e["nll_before"] + 1e-6 for e in doc["exits"])


def test_fit_refuses_settings_it_would_not_use(capsys):
    from pipelines.cli import main

    assert main(["eval", "--checkpoint", "c", "--data", "d", "--fit-exit-temperature",
                 "--set", "reference=true", "--mode", "slide", "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("step eval: error: --fit-exit-temperature fits on whole images")
    assert "mode, reference would not be used" in err


MODEL = {"backbone": "vit_tiny_patch16_384", "num_classes": 7, "decoder": "linear",
         "policy": {"pretrained": False, "levels": [2, 4, 8]}, "exits": {"blocks": [4, 8]}}


def test_step_eval_fits_exit_temperatures_on_shards(tiny_shards, tmp_path, capsys):
    """`step eval --fit-exit-temperature` on the tiny shards: one temperature per exit, on
    every labelled token at every exit (halting off), written ready to pass back."""
    from pipelines.cli import main
    from pipelines.common.checkpoint import save_checkpoint
    from pipelines.common.data import eval_loader
    from pipelines.common.model import build_model
    from step_model.model import pad_to_patch
    from step_model.policy import cell_histogram

    torch.manual_seed(0)
    ckpt = str(save_checkpoint(tmp_path / "ckpt", build_model(MODEL)))
    val = tiny_shards["val"]
    out = tmp_path / "temps.json"
    assert main(["eval", "--checkpoint", ckpt, "--data", val, "--fit-exit-temperature",
                 "--policy-mode", "none", "--thresholds", "0.0", "--json", str(out)]) == 0, \
        capsys.readouterr().err
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["images"] == 3 and [e["block"] for e in doc["exits"]] == [4, 8]
    # halting off: every labelled cell (policy none: one token each) reaches both exits,
    # although threshold 0 would halt nearly all of them at the first
    labelled = 0
    for images, labels in eval_loader(val, num_workers=0):
        _, labels = pad_to_patch(images.float(), labels.long())
        labelled += int((cell_histogram(labels, 7).sum(-1) > 0).sum())
    assert [e["tokens"] for e in doc["exits"]] == [labelled, labelled]
    for e in doc["exits"]:
        assert e["temperature"] > 0 and e["nll_after"] <= e["nll_before"] + 1e-6
    temps = [float(t) for t in doc["exit_temperature"].split(",")]
    assert temps == pytest.approx([e["temperature"] for e in doc["exits"]], rel=1e-3)
    assert f"pass --exit-temperature {doc['exit_temperature']}" in printed
    assert doc["inference"]["policy_mode"] == "none" and "exit_temperature" not in doc["inference"]
    # the printed values are a valid setting of the same checkpoint
    assert main(["eval", "--checkpoint", ckpt, "--data", val, "--exit-temperature",
                 doc["exit_temperature"], "--max-samples", "1", "--latency-samples", "0",
                 "--no-mlflow"]) == 0, capsys.readouterr().err
