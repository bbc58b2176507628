"""The whole pipeline, end to end, on tiny real data: killed during training, then resumed.

One scenario (module fixture), several checks:

1. ``step run configs/tiny/pipeline.yaml`` starts in a subprocess (its own local Ray, a real
   ``mlflow server`` on 127.0.0.1); it is SIGKILLed (with its whole process group) while
   ``train_step`` runs: a real crash, no cleanup code runs.
2. The same command again: ``prepare`` and ``train_policy`` are skipped by fingerprint,
   the pipeline's parent run is reopened, the rest completes.
3. Once more: nothing changed, every step is skipped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import LOVEDA, REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

STEPS = ["prepare", "train_policy", "train_step", "tune", "evaluate", "report", "analyze"]


def _cmd(storage: Path, tracking_uri: str, json_path: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "run", "configs/tiny/pipeline.yaml",
            "--set", f"storage={storage}", "--set", f"mlflow.tracking_uri={tracking_uri}",
            "--set", f"data.src={LOVEDA}", "--set", "mlflow.experiment=e2e",
            "--json", str(json_path)]


def _env(log_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    if log_dir is not None:  # the log files of `step run` (pipelines/common/console.py)
        env["STEP_LOG_DIR"] = str(log_dir)
    return env


def _state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@pytest.fixture
def pipeline(tiny_pipeline):
    return tiny_pipeline


def killed_resumed_rerun(tmp_path_factory, mlflow_server) -> dict:
    """The scenario of the module docstring; the session fixture ``tiny_pipeline``
    (conftest.py) runs it once for every module that reads it."""
    root = tmp_path_factory.mktemp("pipeline")
    storage = root / "store"
    env = _env(root / "logs")
    state_file = storage / "tiny-pipeline" / "pipeline_state.json"
    log1 = open(root / "run1.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(_cmd(storage, mlflow_server, root / "run1.json"), cwd=REPO,
                            env=env, stdout=log1, stderr=subprocess.STDOUT,
                            start_new_session=True)
    killed_in = None
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            step = (_state(state_file).get("steps") or {}).get("train_step") or {}
            if step.get("status") == "running":
                time.sleep(3)  # let the Ray Train run get going
                killed_in = "train_step"
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log1.close()
    assert killed_in == "train_step", (root / "run1.log").read_text()[-3000:]
    state1 = _state(state_file)

    run2 = subprocess.run(_cmd(storage, mlflow_server, root / "run2.json"), cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=330)
    assert run2.returncode == 0, run2.stdout[-4000:] + run2.stderr[-4000:]
    run3 = subprocess.run(_cmd(storage, mlflow_server, root / "run3.json"), cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert run3.returncode == 0, run3.stdout[-4000:] + run3.stderr[-4000:]
    return {
        "state1": state1, "stdout2": run2.stdout, "stdout3": run3.stdout,
        "stderr2": run2.stderr, "root": root,
        "doc2": json.loads((root / "run2.json").read_text()),
        "doc3": json.loads((root / "run3.json").read_text()),
        "tracking_uri": mlflow_server,
    }


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _children(client, exp_id, parent):
    return client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'",
                              max_results=500)


def test_resume_skips_finished_steps_and_completes(pipeline):
    s1, doc = pipeline["state1"], pipeline["doc2"]
    # the killed run finished prepare and train_policy and died inside train_step
    assert s1["steps"]["prepare"]["status"] == "finished"
    assert s1["steps"]["train_policy"]["status"] == "finished"
    assert s1["steps"]["train_step"]["status"] == "running"
    assert doc["resumed"] is True
    assert doc["parent_run_id"] == s1["parent_run_id"]
    assert doc["skipped"] == ["prepare", "train_policy"]
    assert [n for n in STEPS if not doc["steps"][n]["skipped"]] == STEPS[2:]
    assert "[skip] prepare" in pipeline["stdout2"] and "[skip] train_policy" in pipeline["stdout2"]
    # the summary table and how to open the UI
    assert "| tuned STEP |" in pipeline["stdout2"] and "MLflow UI" in pipeline["stdout2"]


def test_mlflow_runs_complete_and_nested(pipeline):
    doc = pipeline["doc2"]
    client = _client(pipeline["tracking_uri"])
    parent = client.get_run(doc["parent_run_id"])
    assert parent.info.status == "FINISHED"
    exp_id = parent.info.experiment_id
    kids = _children(client, exp_id, parent.info.run_id)
    by_step: dict[str, list] = {}
    for r in kids:
        by_step.setdefault(r.data.tags.get("step.name"), []).append(r)
    assert set(STEPS) <= set(by_step)
    # the killed attempt of train_step is FAILED, the resumed one FINISHED
    statuses = sorted(r.info.status for r in by_step["train_step"])
    assert statuses == ["FAILED", "FINISHED"]
    for name in STEPS:
        fp = doc["steps"][name]["fingerprint"]
        assert any(r.data.tags.get("step.fingerprint") == fp and r.info.status == "FINISHED"
                   for r in by_step[name])
    # nothing anywhere is left RUNNING (trials, trainings, steps)
    running = client.search_runs([exp_id], "attributes.status = 'RUNNING'")
    assert running == []
    # one nested run per Tune trial under the tune step's run, all FINISHED
    tune_run = doc["steps"]["tune"]["run_id"]
    trials = [r for r in _children(client, exp_id, tune_run)
              if r.data.tags.get("step.kind") == "tune-trial"]
    assert len(trials) == 3
    assert {r.info.status for r in trials} == {"FINISHED"}
    assert all({"miou", "drop", "gflops", "tokens_mean", "halted_fraction", "latency_ms"}
               <= set(r.data.metrics) for r in trials)
    # Pareto artifacts on the search run; the best thresholds as params
    tune_info = client.get_run(tune_run)
    names = {a.path for a in client.list_artifacts(tune_run, "pareto")}
    assert {"pareto/pareto.png", "pareto/trials.csv", "pareto/pareto_front.csv"} <= names
    if doc["best"] is not None:
        assert any(k.startswith("best.") for k in tune_info.data.params)
    # the report's artifacts
    rep = doc["steps"]["report"]["run_id"]
    files = {a.path for a in client.list_artifacts(rep, "report")}
    assert {"report/summary.md", "report/pareto.png", "report/per_class_halting.md",
            "report/token_maps"} <= files
    assert [a.path for a in client.list_artifacts(rep, "report/token_maps")] == \
        ["report/token_maps/00.png"]
    # the analyze step: its document in --json, its CSVs and plots on its run
    assert doc["checkpoints"]["step"] == doc["steps"]["train_step"]["outputs"]["checkpoint"]
    assert doc["checkpoints"]["policy"] == doc["steps"]["train_policy"]["outputs"]["checkpoint"]
    assert {"layouts", "policy_vs_oracle", "tradeoff", "ablation", "flow"} <= set(doc["analysis"])
    ana = {a.path for a in client.list_artifacts(doc["steps"]["analyze"]["run_id"], "analysis")}
    assert {"analysis/layouts.csv", "analysis/layouts.png", "analysis/tradeoff.png"} <= ana
    # the halting protocol ran on the validation images: plain, merging only, tuned
    halting = doc["analysis"]["halting"]
    assert halting["overall"]["images"] > 0 and "analysis/halting_miou.csv" in ana
    assert doc["steps"]["analyze"]["outputs"]["drop_from_halting"] == {
        g: f["drop_from_halting"] for g, f in halting["groups"].items()}


def test_registered_model_and_thresholds_hold_on_reevaluation(pipeline):
    doc = pipeline["doc2"]
    assert doc["best"] is not None, "the tiny search found nothing within the limit"
    reg = doc["registered_model"]
    client = _client(pipeline["tracking_uri"])
    version = client.get_model_version(reg["name"], reg["version"])
    assert float(version.tags["miou"]) == pytest.approx(doc["best"]["miou"], abs=1e-6)
    assert float(version.tags["gflops"]) == pytest.approx(doc["best"]["gflops"], rel=1e-6)
    assert json.loads(version.tags["step.inference"]) == doc["best"]["inference"]

    # re-evaluate the chosen thresholds independently of the search
    from pipelines.tune.trial import evaluate, reference_inference

    ckpt = doc["steps"]["train_step"]["outputs"]["checkpoint"]
    val = doc["steps"]["prepare"]["outputs"]["val"]
    ref = evaluate(ckpt, val, reference_inference(doc["best"]["inference"]), max_samples=2,
                   device="cpu")
    tuned = evaluate(ckpt, val, doc["best"]["inference"], max_samples=2, device="cpu")
    assert 100 * (ref["miou"] - tuned["miou"]) <= doc["max_drop"] + 1e-9
    assert tuned["gflops"] == pytest.approx(doc["best"]["gflops"], rel=1e-6)
    assert doc["evaluation"]["within_limit"] is True


def test_unchanged_rerun_skips_everything(pipeline):
    doc3 = pipeline["doc3"]
    assert doc3["skipped"] == STEPS
    assert doc3["parent_run_id"] != pipeline["doc2"]["parent_run_id"]
    reused = {n: doc3["steps"][n]["reused_run_id"] for n in STEPS}
    assert reused == {n: pipeline["doc2"]["steps"][n]["run_id"] for n in STEPS[2:]} | {
        n: pipeline["doc2"]["steps"][n]["reused_run_id"] for n in STEPS[:2]}
    assert doc3["best"] == pipeline["doc2"]["best"]
