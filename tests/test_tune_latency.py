"""``tune.cost: latency``: the choice follows a trial's ``cost`` (unit), the ratio and
spread of interleaved timings (unit), and one tiny real search on a random-init
checkpoint and LoveDA shards in which every trial times itself against the reference
and the cheapest by latency is chosen and registered (integration)."""

from __future__ import annotations

import json

import pytest

from helpers import LOVEDA, RANDOM_HEADS, REPO


def _t(tid, gflops, miou, cost=None, **kw):
    t = {"trial_id": tid, "gflops": gflops, "miou": miou, "params": {"x": tid}, **kw}
    if cost is not None:
        t["cost"] = cost
    return t


def test_a_cost_field_decides_the_cheapest_and_the_front():
    from pipelines.tune.pareto import pareto_front, select, trials_csv

    # fewer GFLOPs is not faster here: b's latency ratio is lower than a's
    trials = [_t("a", 1.0, 0.80, cost=0.9, latency_ratio=0.9, latency_spread=0.1),
              _t("b", 2.0, 0.80, cost=0.5, latency_ratio=0.5, latency_spread=0.05),
              _t("c", 3.0, 0.50, cost=0.2, latency_ratio=0.2, latency_spread=0.02)]
    sel = select(trials, 0.81, max_drop=2.0)
    assert sel.best["trial_id"] == "b"  # c is cheaper but infeasible
    assert [t["trial_id"] for t in pareto_front(trials)] == ["c", "b"]
    assert "latency 0.50x of the reference" in sel.message() and "2.000 GFLOPs" in sel.message()
    csv_text = trials_csv(trials, sel)
    assert "latency_ratio" in csv_text.splitlines()[0]
    # the same trials without a cost: GFLOPs decide
    plain = [{k: v for k, v in t.items() if k != "cost"} for t in trials]
    assert select(plain, 0.81, max_drop=2.0).best["trial_id"] == "a"


def test_trial_metrics_with_latency_make_the_ratio_the_cost_and_objective():
    from pipelines.tune.latency import ratio_figures
    from pipelines.tune.trial import trial_metrics

    figures = ratio_figures([10.0, 12.0, 11.0], [5.0, 7.2, 4.4])
    assert figures["latency_ratio"] == pytest.approx(0.5)  # ratios 0.5, 0.6, 0.4
    assert figures["latency_spread"] == pytest.approx(0.4)  # (0.6 - 0.4) / 0.5
    assert figures["latency_ms"] == pytest.approx(5.0)
    m = {"miou": 0.80, "gflops": 4.0}
    base = {"miou": 0.80, "gflops": 8.0}
    out = trial_metrics(m, base, 2.0, "points", latency=figures)
    assert out["cost"] == out["objective"] == pytest.approx(0.5)
    assert trial_metrics(m, base, 2.0, "points")["objective"] == pytest.approx(0.5)  # 4 / 8
    assert "cost" not in trial_metrics(m, base, 2.0, "points")


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_tiny_search_with_cost_latency(tmp_path, ray_local, mlflow_server):
    import torch
    from mlflow.tracking import MlflowClient

    from data_prep.prep import prepare
    from pipelines.cli import main
    from pipelines.common.checkpoint import save_checkpoint
    from pipelines.common.model import build_model

    torch.manual_seed(0)
    model = {"backbone": "vit_tiny_patch16_384", "num_classes": 7, "decoder": "linear",
             "policy": {"pretrained": False, "levels": [2, 4, 8]},
             "exits": {"blocks": [4, 8]}}
    ckpt = save_checkpoint(tmp_path / "ckpt", build_model(
        model, {"policy_mode": "threshold", "exit_thresholds": [0.9], **RANDOM_HEADS}))
    shards = tmp_path / "val"
    prepare("loveda", str(LOVEDA), str(shards), split="val", samples_per_shard=4,
            max_side=128, progress=False)
    space = tmp_path / "space.yaml"
    space.write_text("name: two\nexit_thresholds: {type: choice, values: [0.2, 1.0]}\n"
                     "merge_thresholds: {type: choice, values: [0.0]}\n")
    out = tmp_path / "tune.json"
    rc = main(["tune", "--checkpoint", str(ckpt), "--data", str(shards), "--space",
               str(space), "--max-drop", "100", "--search", "grid", "--cost", "latency",
               "--set", "latency.images=2", "--set", "latency.repeats=2",
               "--confirm-top", "0", "--tracking-uri", mlflow_server,
               "--experiment", "tune-latency", "--register-name", "tune-latency-model",
               "--storage-path", str(tmp_path / "ray"), "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["cost"] == "latency" and doc["n_trials"] == 2
    for p in doc["pareto"]:
        assert p["latency_ratio"] > 0 and p["latency_spread"] >= 0
    # a 100-point limit admits every trial: the answer is the lowest latency ratio
    assert doc["best"]["latency_ratio"] == pytest.approx(
        min(p["latency_ratio"] for p in doc["pareto"]))
    version = MlflowClient(mlflow_server).get_model_version(
        doc["registered_model"]["name"], doc["registered_model"]["version"])
    assert float(version.tags["latency_ratio"]) == pytest.approx(doc["best"]["latency_ratio"])
    assert float(version.tags["gflops"]) == pytest.approx(doc["best"]["gflops"])


def test_pipeline_fingerprint_changes_only_when_the_cost_is_latency():
    """A pipeline with the default cost keeps its tune fingerprint (finished searches are
    not re-run after this field appeared); cost latency is a different search."""
    from pipelines.workflow.config import load_pipeline_config
    from pipelines.workflow.steps import tune_payload

    plain = tune_payload(load_pipeline_config(REPO / "configs/camvid.yaml"), ["a", "b"])
    assert "cost" not in plain["tune"] and "latency" not in plain["tune"]
    timed = tune_payload(load_pipeline_config(REPO / "configs/camvid.yaml",
                                              ["tune.cost=latency"]), ["a", "b"])
    assert timed["tune"]["cost"] == "latency" and timed["tune"]["latency"]["repeats"] == 5
    assert {k: v for k, v in timed["tune"].items() if k not in ("cost", "latency")} \
        == plain["tune"]
