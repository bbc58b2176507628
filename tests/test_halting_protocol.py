"""The halting protocol of ``step analyze``: the calibration error on hand-built cases, the
three settings' relations on a tiny model, figures per group. (The command end to end, on
tiny shards with a held-out group: tests/test_analyze.py.)"""

from __future__ import annotations

import pytest
import torch

from helpers import blocky_labels, tiny

# ---- the metric -----------------------------------------------------------------------


def test_ece_is_zero_when_confidence_matches_accuracy():
    from pipelines.evaluate.calibration import Reliability

    rel = Reliability(15)
    # per bin: 10 pixels at confidence 0.8 of which 8 right, 20 at 0.3 of which 6 right
    rel.add(torch.tensor([0.8, 0.3]), correct=torch.tensor([8.0, 6.0]),
            weight=torch.tensor([10.0, 20.0]))
    r = rel.result()
    assert r["ece"] == pytest.approx(0.0, abs=1e-6)  # float32 confidences
    assert r["mean_confidence"] == pytest.approx(r["accuracy"]) == pytest.approx(14 / 30)
    assert r["count"] == 2 and r["weight"] == 30


def test_ece_of_an_overconfident_set_is_worked_out_by_hand():
    from pipelines.evaluate.calibration import Reliability

    rel = Reliability(15)
    # 4 predictions at 0.9, 2 right; 4 at 0.6, 3 right
    rel.add(torch.tensor([0.9] * 4 + [0.6] * 4),
            torch.tensor([1, 1, 0, 0, 1, 1, 1, 0]))
    r = rel.result()
    # half the weight is off by |0.5 - 0.9|, half by |0.75 - 0.6|
    assert r["ece"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.15)
    assert r["mean_confidence"] == pytest.approx(0.75) and r["accuracy"] == pytest.approx(0.625)
    b = r["bins"]
    assert len(b["count"]) == 15 and len(b["edges"]) == 16
    hi, lo = int(0.9 * 15), int(0.6 * 15)  # bins 13 and 9
    assert b["count"][hi] == b["count"][lo] == 4 and sum(b["count"]) == 8
    assert b["accuracy"][hi] == 0.5 and b["confidence"][lo] == pytest.approx(0.6)
    assert b["accuracy"][0] is None  # empty bins say so


def test_a_token_weighs_as_its_pixels_and_sums_merge():
    from pipelines.evaluate.calibration import Reliability

    token = Reliability()
    token.add(torch.tensor([0.9, 0.55]), torch.tensor([30.0, 2.0]), torch.tensor([64.0, 4.0]))
    pixels = Reliability()
    pixels.add(torch.tensor([0.9] * 64 + [0.55] * 4),
               torch.tensor([1.0] * 30 + [0.0] * 34 + [1.0] * 2 + [0.0] * 2))
    for k in ("ece", "mean_confidence", "accuracy", "weight"):
        assert token.result()[k] == pytest.approx(pixels.result()[k])
    a, b = Reliability(), Reliability()
    a.add(torch.tensor([0.9]), torch.tensor([30.0]), torch.tensor([64.0]))
    b.add(torch.tensor([0.55]), torch.tensor([2.0]), torch.tensor([4.0]))
    assert a.merge(b).result() == token.result()


def test_ece_agrees_with_torchmetrics_per_prediction():
    from torchmetrics.functional.classification import binary_calibration_error

    from pipelines.evaluate.calibration import Reliability

    g = torch.Generator().manual_seed(0)
    conf = torch.rand(2000, generator=g) * 0.999  # torchmetrics gives 1.0 a bin of its own
    right = (torch.rand(2000, generator=g) < conf ** 2).long()  # overconfident
    rel = Reliability(15)
    rel.add(conf, right)
    expected = float(binary_calibration_error(conf, right, n_bins=15, norm="l1"))
    assert expected > 0.05 and rel.ece() == pytest.approx(expected, rel=1e-5)


# ---- the three settings on a tiny model -------------------------------------------------

def _model_and_batch():
    from step_model.config import InferenceConfig

    model = tiny("threshold", exits=[4, 8], num_classes=5)
    torch.manual_seed(1)
    images = torch.rand(2, 3, 64, 96)
    labels = torch.cat([blocky_labels(64, 96, 0), blocky_labels(64, 96, 1)])
    labels[:, :5, :7] = 255  # some ignored pixels
    op = InferenceConfig(policy_mode="threshold", merge_thresholds=0.5, top_k=0,
                         exit_thresholds=[0.3])
    return model, images, labels, op


def _run(model, images, labels, op, groups, per_image=False):
    from pipelines.analyze.halting import run_protocol

    def batches():
        if per_image:
            for b in range(images.shape[0]):
                yield images[b:b + 1], labels[b:b + 1], groups[b:b + 1]
        else:
            yield images, labels, groups

    return run_protocol(model, batches, num_classes=5, op=op, bins=15)


def test_the_merging_only_forward_is_the_halting_off_forward_with_every_exit_run():
    from pipelines.analyze.halting import merging_only_forward, protocol_inference

    model, images, labels, op = _model_and_batch()
    settings = protocol_inference(op)
    assert settings["plain"].policy_mode == "none" and not settings["plain"].halting
    assert settings["merging_only"].policy_mode == "threshold" \
        and not settings["merging_only"].halting and settings["tuned"].halting
    with torch.no_grad():
        model.set_inference(settings["merging_only"])
        off = model(images, labels)
        probe = merging_only_forward(model, images, labels, settings["merging_only"])
    assert torch.equal(off.logits, probe.logits)
    assert int(probe.flow.halted_per_exit.sum()) == 0 and len(probe.exit_logits) == 2
    assert off.exit_logits == []  # halting off runs no exit head: the probe is needed
    for valid in probe.exit_valid:  # every token reaches every exit
        assert valid.sum(1).tolist() == probe.flow.num_tokens.tolist()


def test_halting_off_makes_tuned_equal_merging_only_with_every_pixel_active():
    from pipelines.analyze.halting import HaltingMeter, merging_only_forward, protocol_inference

    model, images, labels, op = _model_and_batch()
    settings = protocol_inference(op)
    with torch.no_grad():
        model.set_inference(settings["plain"])
        plain = model(images, labels)
        merged = merging_only_forward(model, images, labels, settings["merging_only"])
        model.set_inference(settings["merging_only"])  # "tuned" with halting off
        off = model(images, labels)
    meter = HaltingMeter(5, [4, 8], 12)
    meter.update(["a", "a"], labels, plain, merged, off, gflops=(3.0, 2.0, 1.0))
    f = meter.result()["overall"]
    assert f["miou"]["tuned"] == f["miou"]["merging_only"] and f["drop_from_halting"] == 0
    assert f["gflops"] == {"plain": 3.0, "merging_only": 2.0, "tuned": 1.0}  # per image
    px = f["pixels"]
    labelled = int((labels != 255).sum())
    assert px["active"]["share"] == 1.0 and px["active"]["pixels"] == labelled
    assert px["halted"]["share"] == px["exit_4"]["share"] == 0.0
    assert px["active"]["accuracy_tuned"] == px["active"]["accuracy_merging_only"]
    for e in ("exit_4", "exit_8"):
        assert f["calibration"][e]["halted"]["count"] == 0
        assert f["calibration"][e]["halted"]["ece"] is None
        # every labelled pixel lies in exactly one token reaching the exit
        assert f["calibration"][e]["reaching"]["weight"] == labelled


def test_everything_halting_at_the_first_exit():
    """Exit threshold 0 and top_k 0: every token halts at block 4, so the halted tokens
    there are the tokens reaching it, with the same predictions (the same blocks ran)."""
    from pipelines.evaluate.metrics import confusion_matrix, scores_from_confusion

    model, images, labels, op = _model_and_batch()
    op = op.replace(exit_thresholds=0.0)
    doc = _run(model, images, labels, op, ["a", "a"])
    f = doc["overall"]
    assert doc["exits"] == ["exit_4", "exit_8"] and f["images"] == 2
    px = f["pixels"]
    assert px["halted"]["share"] == px["exit_4"]["share"] == 1.0 and px["active"]["pixels"] == 0
    cal = f["calibration"]
    assert cal["exit_4"]["halted"] == cal["exit_4"]["reaching"]
    assert cal["exit_8"]["halted"]["count"] == 0 and cal["exit_8"]["reaching"]["count"] > 0
    # the figures are the forwards' own: plain and tuned against direct forwards
    with torch.no_grad():
        for setting, key in ((op.replace(policy_mode="none", halting=False), "plain"),
                             (op.replace(halting=True), "tuned")):
            model.set_inference(setting)
            out = model(images, labels)
            pred = out.logits.argmax(1)
            cm = confusion_matrix(pred, labels, 5)
            assert f["miou"][key] == pytest.approx(scores_from_confusion(cm).miou)
            if key == "tuned":
                lab = labels != 255
                acc = float(((pred == labels) & lab).sum()) / float(lab.sum())
                assert px["halted"]["accuracy_tuned"] == pytest.approx(acc)
    assert f["drop_from_halting"] == pytest.approx(
        100 * (f["miou"]["merging_only"] - f["miou"]["tuned"]))
    assert model.inference == op  # left at the operating point


def test_figures_per_group_by_key_pattern_are_those_of_the_groups_images():
    from pipelines.common.groups import group_of_key

    model, _, _, op = _model_and_batch()
    torch.manual_seed(2)
    images = torch.rand(3, 3, 64, 96)
    labels = torch.cat([blocky_labels(64, 96, s) for s in range(3)])
    keys = ["0001TP_008550", "0016E5_07959", "0001TP_008580"]
    groups = [group_of_key("^([^_]+)_", k) for k in keys]
    assert groups == ["0001TP", "0016E5", "0001TP"]
    doc = _run(model, images, labels, op, groups, per_image=True)
    assert list(doc["groups"]) == ["0001TP", "0016E5"]
    assert [doc["groups"][g]["images"] for g in doc["groups"]] == [2, 1]
    assert doc["overall"]["images"] == 3
    alone = _run(model, images[[0, 2]], labels[[0, 2]], op, ["x", "x"], per_image=True)
    assert doc["groups"]["0001TP"] == alone["overall"]
    # the overall figures sum the groups' pixels and tokens
    parts = [doc["groups"][g] for g in doc["groups"]]
    for k in ("halted", "active"):
        assert doc["overall"]["pixels"][k]["pixels"] == sum(p["pixels"][k]["pixels"] for p in parts)
    for e in doc["exits"]:
        assert doc["overall"]["calibration"][e]["reaching"]["count"] == sum(
            p["calibration"][e]["reaching"]["count"] for p in parts)


def test_calibration_reads_the_tempered_confidence_that_decided():
    """With ``exit_temperature`` set, the reliability tables read the probability the
    halting decision read (logits / T), not the raw head's: the same tokens reaching the
    exit, the same predictions, a lower mean confidence at T = 3."""
    model, images, labels, op = _model_and_batch()
    raw = _run(model, images, labels, op, ["a", "a"])["overall"]["calibration"]["exit_4"]
    hot = _run(model, images, labels, op.replace(exit_temperature=[3.0]),
               ["a", "a"])["overall"]["calibration"]["exit_4"]["reaching"]
    raw = raw["reaching"]
    assert hot["count"] == raw["count"] and hot["weight"] == raw["weight"]
    assert hot["accuracy"] == pytest.approx(raw["accuracy"])
    assert hot["mean_confidence"] < raw["mean_confidence"] - 0.01
