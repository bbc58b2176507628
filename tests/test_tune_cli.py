"""``step tune`` on a real (random-init) checkpoint and real LoveDA shards: the exhaustive
grid, the ``--json`` interface, nested trial runs and the model registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOVEDA = REPO.parent / "shared" / "fixtures" / "real" / "loveda"

pytestmark = pytest.mark.timeout(300)

MODEL = {"backbone": "vit_tiny_patch16_384", "num_classes": 7, "decoder": "linear",
         "policy": {"mode": "threshold", "pretrained": False, "levels": [2, 4, 8]},
         "exits": {"blocks": [4, 8], "thresholds": [0.9]}}


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory, ray_local):
    """A tiny STEP checkpoint (random init, seeded) and the 3 LoveDA scenes at 128 px."""
    import torch

    from data_prep.prep import prepare
    from pipelines.checkpoint import save_checkpoint
    from pipelines.model_config import build_model, normalize_model_config

    root = tmp_path_factory.mktemp("tune")
    torch.manual_seed(0)
    cfg = normalize_model_config(MODEL)
    ckpt = save_checkpoint(root / "ckpt", build_model(cfg), cfg)
    shards = root / "val"
    prepare("loveda", str(LOVEDA), str(shards), split="val", samples_per_shard=4,
            max_side=128, progress=False)
    space = root / "space.yaml"
    space.write_text("name: two_by_two\n"
                     "exit_thresholds: {type: choice, values: [0.2, 1.0]}\n"
                     "merge_thresholds: {type: choice, values: [0.0, 1.0]}\n")
    return {"ckpt": str(ckpt), "val": str(shards), "space": str(space), "root": root}


def test_step_tune_grid_json_runs_and_registry(tiny_case, mlflow_server):
    from mlflow.tracking import MlflowClient

    from pipelines.cli import main

    out = tiny_case["root"] / "tune.json"
    rc = main(["tune", "--checkpoint", tiny_case["ckpt"], "--data", tiny_case["val"],
               "--space", tiny_case["space"], "--max-drop", "100", "--search", "grid",
               "--tracking-uri", mlflow_server, "--experiment", "tune-cli",
               "--register-name", "tune-cli-model",
               "--storage-path", str(tiny_case["root"] / "ray"), "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    for key in ("tracking_uri", "parent_run_id", "max_drop", "baseline", "best", "pareto",
                "registered_model"):
        assert key in doc
    assert doc["tracking_uri"] == mlflow_server and doc["max_drop"] == 100
    assert set(doc["baseline"]) >= {"miou", "gflops"}
    # exhaustive grid: 2 x 2 trials + the one reference evaluation
    assert doc["n_trials"] == 4 and doc["evaluations"] == 5 and doc["failed_trials"] == 0
    # a 100-point limit admits everything: the answer is the cheapest of all trials
    gflops = sorted(p["gflops"] for p in doc["pareto"])
    assert doc["best"]["gflops"] == pytest.approx(gflops[0])
    assert doc["best"]["params"] == {"exit_threshold": 0.2, "merge_threshold": 0.0}
    assert doc["best"]["inference"]["exit_thresholds"] == [0.2, 0.2]
    # merging everything and halting at 0.2 really is cheaper than the unpruned model
    assert doc["best"]["gflops"] < doc["baseline"]["gflops"]

    client = MlflowClient(mlflow_server)
    parent = client.get_run(doc["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["best.exit_threshold"] == "0.2"
    kids = client.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{doc['parent_run_id']}'")
    assert len(kids) == 4 and {k.info.status for k in kids} == {"FINISHED"}
    seen = {(k.data.params["exit_threshold"], k.data.params["merge_threshold"]) for k in kids}
    assert seen == {("0.2", "0.0"), ("0.2", "1.0"), ("1.0", "0.0"), ("1.0", "1.0")}
    reg = doc["registered_model"]
    version = client.get_model_version(reg["name"], reg["version"])
    assert json.loads(version.tags["inference"])["merge_thresholds"] == {
        "2": 0.0, "4": 0.0, "8": 0.0, "16": 0.0}
    assert float(version.tags["gflops"]) == pytest.approx(doc["best"]["gflops"])
    arts = {a.path for a in client.list_artifacts(doc["parent_run_id"], "pareto")}
    assert "pareto/pareto.png" in arts and "pareto/trials.csv" in arts


def test_step_tune_rejects_bad_space(tiny_case, tmp_path, capsys):
    from pipelines.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nexit_thresholds: [{type: fixed, value: 0.5}, "
                   "{type: fixed, value: 0.5}, {type: choice, values: [0.5, 0.9]}]\n")
    rc = main(["tune", "--checkpoint", tiny_case["ckpt"], "--data", tiny_case["val"],
               "--space", str(bad), "--max-drop", "1",
               "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert rc == 2
    assert "3 thresholds but the model has 2 exit heads" in capsys.readouterr().out
