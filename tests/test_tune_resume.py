"""A search that survives a crash: `step tune` SIGKILLed (its whole process group) after
half of its trials, then run again, resumes the Ray Tune experiment.

One scenario (module fixture), on the tiny random-init checkpoint and the LoveDA scenes at
128 px of tests/test_tune_cli.py: an uninterrupted search; the same search killed after a
batch of trials; the same command again. Also: what a driver killed alone leaves of its
local Ray is stopped by the next run, and nothing of another Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from test_tune_cli import MODEL

from helpers import LOVEDA, RANDOM_HEADS, REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

TRIALS, KILL_AFTER = 8, 4  # 2 at a time: the kill comes between two batches


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    return env


def _tune(case: dict, name: str) -> list[str]:
    root = case["root"]
    return [sys.executable, "-m", "pipelines.cli", "tune", "--checkpoint", case["ckpt"],
            "--data", case["val"], "--space", case["space"], "--max-drop", "100",
            "--num-samples", str(TRIALS), "--max-concurrent", "2", "--max-samples", "2",
            "--confirm-top", "0", "--tracking-uri", case["uri"], "--experiment", "resume",
            "--register-name", "resume-model", "--storage-path", str(root / "ray"),
            "--json", str(root / f"{name}.json")]


def _finished(output: str) -> int:
    """Trials a search's output says finished (one line each)."""
    return sum(line.startswith("trial ") and f"/{TRIALS}: " in line
               for line in output.splitlines())


@pytest.fixture(scope="module")
def searches(tmp_path_factory, ray_local) -> dict:
    """{"full", "killed", "rerun": (json doc or None, output)} and the case."""
    import torch

    from data_prep.prep import prepare
    from pipelines.common.checkpoint import save_checkpoint
    from pipelines.common.model import build_model

    root = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "ckpt", build_model(MODEL, RANDOM_HEADS))
    case = {"root": root, "ckpt": str(ckpt),
            "val": str(root / "val"), "space": str(root / "space.yaml"),
            "uri": f"sqlite:///{root / 'mlflow.db'}"}
    prepare("loveda", str(LOVEDA), case["val"], split="val", samples_per_shard=4,
            max_side=128, progress=False)
    (root / "space.yaml").write_text(
        "name: resume\n"
        "exit_thresholds: {type: choice, values: [0.2, 0.5, 0.8, 1.0]}\n"
        "merge_thresholds: {type: choice, values: [0.0, 0.5, 1.0]}\n")

    out = {"case": case}
    full = subprocess.run(_tune(case, "full"), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    out["full"] = json.loads((root / "full.json").read_text()), full.stdout

    log = root / "killed.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(_tune(case, "killed"), cwd=REPO, env=_env(), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while _finished(log.read_text(errors="replace")) < KILL_AFTER:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.5)  # the snapshot after that trial; the next batch has just started
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a crash: no cleanup code runs
        proc.wait(timeout=60)
    out["killed"] = None, log.read_text(errors="replace")

    rerun = subprocess.run(_tune(case, "rerun"), cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    out["rerun"] = json.loads((root / "rerun.json").read_text()), rerun.stdout
    # Ray Tune logs a failed restore ("Failed to restore the run state") there and goes on
    out["rerun_stderr"] = rerun.stderr
    return out


def _runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("resume")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def _trials(runs, parent: str) -> list:
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]


def test_the_rerun_runs_only_the_unfinished_trials(searches):
    finished = _finished(searches["killed"][1])
    assert finished >= TRIALS // 2
    doc, printed = searches["rerun"]
    assert "tune: resuming the search in" in printed
    executed = [line for line in printed.splitlines() if line.startswith("trial ")]
    # counting on from the finished ones
    assert len(executed) == TRIALS - finished, printed + searches["rerun_stderr"][-6000:]
    assert executed[0].startswith(f"trial {finished + 1}/{TRIALS}: ")
    assert doc["n_trials"] == TRIALS and doc["failed_trials"] == 0


def test_the_choice_and_the_registered_model_are_an_uninterrupted_run_s(searches):
    full, rerun = searches["full"][0], searches["rerun"][0]
    assert rerun["best"]["params"] == full["best"]["params"]
    assert rerun["best"]["inference"] == full["best"]["inference"]
    assert (rerun["best"]["miou"], rerun["best"]["gflops"]) == \
        pytest.approx((full["best"]["miou"], full["best"]["gflops"]))
    assert [p["params"] for p in rerun["pareto"]] == [p["params"] for p in full["pareto"]]
    client, _ = _runs(searches["case"]["uri"])
    versions = [client.get_model_version("resume-model", d["registered_model"]["version"])
                for d in (full, rerun)]
    assert versions[0].version != versions[1].version
    from pipelines.tracking.registry import INFERENCE_TAG

    for tag in (INFERENCE_TAG, "miou", "gflops"):
        assert versions[0].tags[tag] == versions[1].tags[tag], tag


def test_the_same_trials_as_an_uninterrupted_search_and_no_run_left_running(searches):
    """Optuna in batches (ConcurrencyLimiter(batch=True)): the resumed search ran the same
    trials as the uninterrupted one. In MLflow: the finished trials moved under the rerun's
    run (not run twice), the killed ones FAILED, nothing RUNNING."""
    case = searches["case"]
    client, runs = _runs(case["uri"])
    full_id, rerun_id = searches["full"][0]["parent_run_id"], searches["rerun"][0]["parent_run_id"]
    killed = [r for r in runs if r.data.tags.get("step.kind") == "tune"
              and r.info.run_id not in (full_id, rerun_id)]
    assert len(killed) == 1
    assert killed[0].info.status == "FAILED"
    assert killed[0].data.tags["step.resumed_by"] == rerun_id
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []

    def params(parent):
        return Counter((r.data.params["exit_threshold"], r.data.params["merge_threshold"])
                       for r in _trials(runs, parent) if r.info.status == "FINISHED")

    assert sum(params(full_id).values()) == TRIALS
    assert params(rerun_id) == params(full_id)
    kept = [r for r in _trials(runs, rerun_id) if "step.resumed_from" in r.data.tags]
    finished = _finished(searches["killed"][1])
    assert len(kept) == finished and len(_trials(runs, rerun_id)) == TRIALS
    assert {r.data.tags["step.resumed_from"] for r in kept} == {killed[0].info.run_id}
    assert all(r.info.status == "FAILED" for r in _trials(runs, killed[0].info.run_id))


# ---- a driver killed alone: its local Ray's leftovers ------------------------------------

DRIVER = """
import json, sys, time, ray
from pipelines.common.stale_ray import driver_record
record = driver_record()
ray.init(address="local", num_cpus=1, log_to_driver=False)
ray.get(ray.remote(lambda: 1).remote())
print(json.dumps(record), flush=True)
time.sleep(600)
"""


def _driver(tmp_path: Path, name: str) -> tuple[subprocess.Popen, dict]:
    out = tmp_path / f"{name}.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER], env=_env(), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    deadline = time.monotonic() + 180
    while not (lines := [ln for ln in out.read_text().splitlines() if ln.startswith("{")]):
        assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-2000:]
        time.sleep(0.5)
    return proc, json.loads(lines[0])


def test_a_killed_driver_s_ray_processes_are_stopped_and_no_other_ray_s(tmp_path):
    from pipelines.common.stale_ray import _sessions, session_processes, stop_dead_session

    dead, dead_record = _driver(tmp_path, "dead")
    live, live_record = _driver(tmp_path, "live")
    try:
        live_pids = session_processes(_sessions(live_record))
        assert live_pids
        assert stop_dead_session(dead_record) == []  # its driver is alive: not touched
        os.kill(dead.pid, signal.SIGKILL)  # the driver alone, as `kill -9 PID` does
        dead.wait()
        time.sleep(5)  # GCS and raylet follow their driver; Ray 2.60's agents do not
        left = session_processes(_sessions(dead_record))
        assert left, "Ray no longer leaves processes behind: this cleanup can go"
        lines: list[str] = []
        stopped = stop_dead_session(dead_record, lines.append)
        assert stopped and set(stopped) <= set(left)
        assert f"pid {dead_record['pid']}" in lines[0]
        assert session_processes(_sessions(dead_record)) == []
        assert all(Path(f"/proc/{p}").exists() for p in live_pids)  # the other Ray lives
        assert live.poll() is None
    finally:
        for proc in (dead, live):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        stop_dead_session(live_record)  # its leftovers too, now that it is dead
