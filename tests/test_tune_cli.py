"""``step tune`` on a real (random-init) checkpoint and real LoveDA shards: the exhaustive
grid, the ``--json`` interface, nested trial runs and the model registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import LOVEDA, RANDOM_HEADS, REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MODEL = {"backbone": "vit_tiny_patch16_384", "num_classes": 7, "decoder": "linear",
         "policy": {"pretrained": False, "levels": [2, 4, 8]}, "exits": {"blocks": [4, 8]}}
INFERENCE = {"policy_mode": "threshold", "exit_thresholds": [0.9], **RANDOM_HEADS}


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory, ray_local):
    """A tiny STEP checkpoint (random init, seeded) and the 3 LoveDA scenes at 128 px."""
    import torch

    from data_prep.prep import prepare
    from pipelines.common.checkpoint import save_checkpoint
    from pipelines.common.model import build_model

    root = tmp_path_factory.mktemp("tune")
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "ckpt", build_model(MODEL, INFERENCE))
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
               "--register-name", "tune-cli-model", "--top-k", "1",  # for every evaluation
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
    # the whole settings measured: the checkpoint's, --top-k, the trial's point (a shared
    # exit threshold is one value for every exit)
    assert doc["best"]["inference"] == {
        **INFERENCE, "exit_thresholds": [0.2], "top_k": 1, "budget": None,
        "merge_thresholds": {"2": 0.0, "4": 0.0, "8": 0.0, "16": 0.0}, "exit_policy": "confidence",
        "exit_seed": 0, "exit_score": "confidence", "exit_temperature": None, "halting": True,
        "halted_context": "none", "upsample": "probs",
        "varlen": "auto"}
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
    assert json.loads(version.tags["step.inference"]) == doc["best"]["inference"]
    assert version.tags["top_k"] == "1" and version.tags["policy_mode"] == "threshold"
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
    assert "3 thresholds but the model has 2 exit heads" in capsys.readouterr().err


# ---- every shipped space runs; a search in which every trial failed fails ---------------


@pytest.mark.parametrize("space", __import__("tune_spaces").names())
def test_every_shipped_space_runs_trials(tiny_case, space, tmp_path, capsys):
    """Each space of tune_spaces/, 2 Optuna trials on the tiny checkpoint: the trials must
    succeed (per-level merge thresholds used to fail in every trial: JSON turned the level
    keys into strings) and the search prints one line per finished trial."""
    from pipelines.cli import main

    out = tmp_path / "tune.json"
    rc = main(["tune", "--checkpoint", tiny_case["ckpt"], "--data", tiny_case["val"],
               "--space", space, "--max-drop", "100", "--num-samples", "2",
               "--max-samples", "2", "--confirm-top", "0",  # confirming: test_guard.py
               "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
               "--register-name", "", "--storage-path", str(tmp_path / "ray"),
               "--json", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    doc = json.loads(out.read_text())
    assert doc["n_trials"] == 2 and doc["failed_trials"] == 0, printed.out
    assert doc["best"] is not None and doc["best"]["inference"]
    assert "trial 1/2: " in printed.out and "trial 2/2: " in printed.out
    assert "miou=" in printed.out and "gflops=" in printed.out and "ETA" in printed.out


def test_all_trials_failing_exits_nonzero_naming_the_error(tiny_case, tmp_path, capsys,
                                                           monkeypatch):
    """What the trials receive does not validate (as with the string level keys): the
    command exits non-zero, names the first trial's error on stderr, and the search's
    MLflow run ends FAILED."""
    from mlflow.tracking import MlflowClient

    from pipelines.cli import main
    from pipelines.tune.space import SearchSpace

    dump = SearchSpace.model_dump
    monkeypatch.setattr(SearchSpace, "model_dump",
                        lambda self, **kw: {**dump(self, **kw), "bogus_key": 1})
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    rc = main(["tune", "--checkpoint", tiny_case["ckpt"], "--data", tiny_case["val"],
               "--space", tiny_case["space"], "--max-drop", "100", "--search", "random",
               "--num-samples", "2", "--max-samples", "1", "--tracking-uri", uri,
               "--experiment", "all-fail",
               "--storage-path", str(tmp_path / "ray")])
    printed = capsys.readouterr()
    assert rc == 1
    assert "step tune: error: all 2 trials failed" in printed.err
    assert "ValidationError" in printed.err and "bogus_key" in printed.err
    assert "FAILED: ValidationError" in printed.out  # the progress lines
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("all-fail")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("step.kind") == "tune"]
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert "bogus_key" in parents[0].data.tags["step.tune.message"]
    kids = [r for r in runs if r.data.tags.get("step.kind") == "tune-trial"]
    assert len(kids) == 2 and {k.info.status for k in kids} == {"FAILED"}
    assert all("bogus_key" in k.data.tags["step.error"] for k in kids)


# ---- AWS keys never reach Ray's logs ------------------------------------------------------


def test_aws_keys_stay_out_of_ray_logs(tiny_case, s3_bucket, tmp_path):
    """``step tune`` with AWS keys in its environment, checkpoint, data and Tune storage on
    S3 (moto), on a local Ray whose temp dir the test owns: the trials read S3 with the
    keys forwarded in their arguments, and no file of the Ray session (runtime_env agent
    log included), no output line and no stored result holds the secret."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    import uuid

    import boto3

    from pipelines.common import storage

    bucket = f"s3://{s3_bucket}"
    ckpt = storage.upload_dir(tiny_case["ckpt"], f"{bucket}/ckpt")
    val = storage.upload_dir(tiny_case["val"], f"{bucket}/val")
    secret, token = f"secret-{uuid.uuid4().hex}", f"token-{uuid.uuid4().hex}"
    key_id = f"KEYID{uuid.uuid4().hex[:12].upper()}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: unix socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    scratch = tmp_path / "tmp"  # the processes' temporary files, to see what stays there
    scratch.mkdir()
    env.update(RAY_TMPDIR=str(ray_tmp), TMPDIR=str(scratch), AWS_ACCESS_KEY_ID=key_id,
               AWS_SECRET_ACCESS_KEY=secret, AWS_SESSION_TOKEN=token,
               PYTHONPATH=str(REPO))
    out = tmp_path / "tune.json"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "tune", "--checkpoint", ckpt,
             "--data", val, "--space", tiny_case["space"], "--max-drop", "100",
             "--search", "random", "--num-samples", "2", "--max-samples", "1",
             "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--register-name", "",
             "--storage-path", f"{bucket}/ray", "--json", str(out)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        printed = proc.stdout + proc.stderr
        assert proc.returncode == 0, printed[-4000:]
        doc = json.loads(out.read_text())
        assert doc["n_trials"] == 2 and doc["failed_trials"] == 0, printed[-4000:]
        assert "trial 2/2: " in proc.stdout
        # the S3 checkpoint is read, not staged: no copy of it per trial left behind
        assert not list(scratch.rglob("model.pt")), sorted(scratch.rglob("*"))[:10]

        sessions = list((ray_tmp / "ray").glob("session_2*"))  # Ray's temp dir: $RAY_TMPDIR/ray
        assert sessions and any((s / "logs").is_dir() for s in sessions)
        logs = [p for s in sessions for p in (s / "logs").rglob("*") if p.is_file()]
        assert any(p.name.startswith("runtime_env_agent") for p in logs)
        needles = [v.encode() for v in (secret, token, key_id)]
        leaked = [str(p) for p in ray_tmp.rglob("*") if p.is_file() and not p.is_symlink()
                  and any(n in p.read_bytes() for n in needles)]
        assert not leaked, f"AWS keys in Ray's files: {leaked}"
        assert not any(n.decode() in printed for n in needles)
        assert not any(n in (tmp_path / "m.db").read_bytes() for n in needles)
        s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        stored = s3.list_objects_v2(Bucket=s3_bucket, Prefix="ray/").get("Contents", [])
        names = {Path(o["Key"]).name for o in stored}
        assert "tuner.pkl" in names and "result.json" in names  # Tune's files reached S3
        for obj in stored:
            body = s3.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read()
            assert not any(n in body for n in needles), obj["Key"]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_keys_out_of_env_restores_and_error_summary(monkeypatch):
    """Unit level: the keys leave the environment for the block only (also on errors), and
    a trial's error file becomes ``Type: message`` without Ray's wrapper lines."""
    import os

    from pipelines.tune.credentials import keys_out_of_env
    from pipelines.tune.progress import error_summary

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "t0k3n")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    with pytest.raises(KeyError), keys_out_of_env():
        assert "AWS_SECRET_ACCESS_KEY" not in os.environ
        assert "AWS_SESSION_TOKEN" not in os.environ
        assert os.environ["AWS_DEFAULT_REGION"] == "eu-west-1"  # not a secret: stays
        raise KeyError("boom")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert os.environ["AWS_SESSION_TOKEN"] == "t0k3n"

    text = ("Failure # 1 (occurred at 2026-12-01_05-28-49)\n"
            "ray::ImplicitFunc.train() (pid=1, ip=127.0.0.1, repr=run_trial)\n"
            '  File "/x/pipelines/tune.py", line 9, in run_trial\n'
            "    space = SearchSpace.model_validate(ctx['space'])\n"
            "pydantic_core._pydantic_core.ValidationError: 1 validation error for SearchSpace\n"
            "merge_thresholds.2.[key]\n  Input should be 2, 4, 8 or 16\n")
    assert error_summary(text) == ("ValidationError: 1 validation error for SearchSpace\n"
                                   "merge_thresholds.2.[key]\n  Input should be 2, 4, 8 or 16")
    assert error_summary(ValueError("bad value")) == "ValueError: bad value"
