"""The terminal of ``step run`` (pipelines/common/console.py): the pipeline's own lines,
progress, warnings that concern the user and every error; everything else in a log file
whose path is printed; all of it with ``--verbose``.

Lines first (real lines of a demo run), then a real local Ray whose tasks print, warn,
fail and die, then the tiny pipeline (``tiny_pipeline``, tests/test_workflow_e2e.py): its
line budget, its log file, and a ``--verbose`` rerun of its evaluate step."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_workflow_e2e import _cmd, _env

from pipelines.common.console import LineRules, _Tee

from helpers import REPO

C, R = "\x1b[36m", "\x1b[0m"  # the colour Ray gives a worker's prefix
SHOWN = [
    "[run ] train_policy (fingerprint 682999c3f8fe, run e4dc9c2903dd45dfb8dcdb99a24f369f)",
    f"{C}(RayTrainWorker pid=3027){R} [train policy] step 3/300 (1%)  loss 0.8014  ETA 2m04s",
    f"{C}(_evaluate_task pid=88){R} eval: 24/24 images (100%), 2.10 images/s",
    "(RayTrainWorker pid=3027, ip=10.0.0.2) WARNING data_prep.loader: data loader skipped 2",
    "\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task",
    "(autoscaler +2s) Error: No available node types can fulfill resource request",
    "(TrainController pid=6425) [2026-12-06 21:05:09,969 F 6425 6502] raylet_client.cc:1: x",
    "2026-12-06 21:02:26,221\tERROR worker.py:440 -- Unhandled error: ray::boom()",
    "step run: error: every trial failed",
]
HIDDEN = [
    "(RayTrainWorker pid=3027) Reporting training result 9: TrainingReport(checkpoint=None, "
    "metrics={'train/loss_avg': 0.41}, validation=False) from rank 1",
    "(RayTrainWorker pid=3027) Checkpoint successfully created at: Checkpoint(path=/x)",
    "(TrainController pid=2314) Requesting resources: {'CPU': 1} * 2",
    "(RayTrainWorker pid=3027) Wrapping provided model in DistributedDataParallel.",
    "(TrainController pid=6425) [2026-12-06 21:05:09,969 W 6425 6502] core_worker.cc:9: x",
    "2026-12-06 21:02:18,156\tWARNING authentication_token_setup.py:85 -- Token auth ...",
    "2026-12-06 21:02:27,883\tINFO streaming_executor.py:216 -- Execution plan of Dataset",
    "2026/12/06 21:04:54 WARNING mlflow.pytorch: Saving pytorch model by Pickle ...",
]


def test_the_terminal_keeps_the_pipelines_lines_and_errors():
    rules = LineRules()
    assert [line for line in SHOWN if not rules.shown(line)] == []
    assert [line for line in HIDDEN if rules.shown(line)] == []


def test_a_workers_traceback_shows_its_first_line_and_its_exception():
    rules = LineRules()
    block = [
        ("(PlacementGroupCleaner pid=6527) Exception in thread PlacementGroupCleanerMonitor:",
         True),
        ("(PlacementGroupCleaner pid=6527) Traceback (most recent call last):", True),
        ('(RayTrainWorker pid=1) Reporting training result 3: ...', False),  # interleaved
        ('(PlacementGroupCleaner pid=6527)   File "/ray/util/state/api.py", line 144', False),
        ("(PlacementGroupCleaner pid=6527)     api_server_url = get_address(address)", False),
        ("(PlacementGroupCleaner pid=6527) ConnectionError", True),
        ("(PlacementGroupCleaner pid=6527) : Found multiple active Ray instances", True),
        ("(PlacementGroupCleaner pid=6527) Checkpoint successfully created", False),
        # what Python itself calls ignored: a trial's actor ended by Tune during a GC
        ("(run_trial pid=14) Exception ignored in: <function WeakSet._remove>", False),
        ("(run_trial pid=14) Traceback (most recent call last):", False),
        ('(run_trial pid=14)   File "ray/_private/worker.py", line 1063, in sigterm', False),
        ("(run_trial pid=14) ", False),
        ("(run_trial pid=14) SystemExit: 1", False),
        ("(run_trial pid=14) Traceback (most recent call last):", True),  # a real one after
    ]
    assert [rules.shown(line) for line, _ in block] == [shown for _, shown in block]


def test_a_library_error_records_traceback_shows_its_first_line_and_its_exception():
    rules = LineRules()
    block = [
        ("2026-12-07 21:09:59,731\tERROR experiment_state.py:176 -- Saving experiment state "
         "to storage at '/s/ray/tune-1f5b' failed with exception: ", True),
        ("Traceback (most recent call last):", True),
        ('  File "ray/tune/execution/experiment_state.py", line 174, in wait_for_sync', False),
        ("    self._storage.syncer.wait()", False),
        ("           ^^^^^^^^^^^^^^^^^^^^^^^^^", False),
        ("FileNotFoundError: [Errno 2] Failed to open local file '/tmp/ray/x-tmp-searcher'",
         True),
        ("[done] tune in 29.2s", True),
        # the driver's own crash, not after a record: every frame stays on the terminal
        ("Traceback (most recent call last):", True),
        ('  File "pipelines/workflow/runner.py", line 170, in step', True),
        ("ValueError: boom", True),
    ]
    assert [rules.shown(line) for line, _ in block] == [shown for _, shown in block]


def test_the_tee_logs_every_line_and_shows_the_shown_ones():
    terminal, log = io.StringIO(), io.StringIO()
    tee = _Tee(terminal, log, LineRules(), threading.Lock())
    tee.write(f"{C}(TrainController pid=1){R} Requesting resources\n[done] pre")
    tee.write("pare in 16.2s\n(RayTrainWorker pid=2) [train step] step 1/2")
    assert terminal.getvalue() == "[done] prepare in 16.2s\n"  # whole lines only
    tee.close_pending()
    assert terminal.getvalue().splitlines() == ["[done] prepare in 16.2s",
                                                "(RayTrainWorker pid=2) [train step] step 1/2"]
    assert log.getvalue().splitlines() == [  # colour codes stripped in the file
        "(TrainController pid=1) Requesting resources", "[done] prepare in 16.2s",
        "(RayTrainWorker pid=2) [train step] step 1/2"]
    assert not tee.isatty()  # progress as lines, not redrawn bars


# ---- a real local Ray: what its workers print, warn, raise -------------------------------

PROBE = """
import logging, os, sys, time
import ray
from pipelines.common.cluster import init_ray
from pipelines.common.console import open_console, worker_console

open_console("probe", verbose_=sys.argv[1] == "1")
init_ray()

@ray.remote
def chatty():
    worker_console()
    print("ray-chatter-marker")
    print("[train probe] step 1/1 (100%)  loss 0.5  ETA 0s")
    logging.getLogger("pipelines.probe").warning("own-warning-marker")
    try:
        raise ValueError("caught-in-worker-marker")
    except ValueError:
        import traceback
        traceback.print_exc()

@ray.remote(max_retries=0)
def dies():
    os._exit(3)

@ray.remote
def fails():
    raise RuntimeError("failing-task-marker")

ray.get(chatty.remote())
try:
    ray.get(dies.remote())
except ray.exceptions.WorkerCrashedError:
    pass
time.sleep(2)  # the workers' lines reach the driver in batches
ray.get(fails.remote())
"""


def _probe(tmp_path: Path, verbose: str) -> tuple[subprocess.CompletedProcess, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, verbose], cwd=REPO,
                          env=_env(tmp_path / verbose), capture_output=True, text=True,
                          timeout=240)
    (log,) = (tmp_path / verbose).glob("probe-*.log")
    return proc, log.read_text()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_errors_of_ray_tasks_and_workers_reach_the_terminal(tmp_path):
    proc, log = _probe(tmp_path, "0")
    shown = proc.stdout + proc.stderr
    assert proc.returncode == 1  # the failing task's error ends the driver
    assert "RuntimeError: failing-task-marker" in shown  # a failing task
    assert "(raylet) A worker died or was killed" in _plain(shown)  # a worker that died
    # an error a worker printed: its first line and its exception, the frames in the file
    assert "Traceback (most recent call last)" in shown
    assert "ValueError: caught-in-worker-marker" in shown
    frame = ", in chatty"  # the frame that raised ("-c" code: no source line below it)
    assert frame not in shown and frame in log
    # the project's progress and warnings show; other lines only in the file
    assert "[train probe] step 1/1" in shown and "own-warning-marker" in shown
    assert "ray-chatter-marker" not in shown and "ray-chatter-marker" in log
    assert "Started a local Ray instance" not in shown and "Started a local Ray" in log
    path = re.search(r"^log: (\S+)", proc.stdout, re.M)
    assert path and Path(path[1]).read_text() == log

    verbose, _ = _probe(tmp_path, "1")
    shown = verbose.stdout + verbose.stderr
    assert "ray-chatter-marker" in shown and "Started a local Ray instance" in shown
    assert ", in chatty" in shown
    assert "RuntimeError: failing-task-marker" in shown


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


# ---- the tiny pipeline --------------------------------------------------------------------

# lines on the terminal of configs/tiny/pipeline.yaml resumed in train_step: 60 measured,
# 3 of them the error of Ray Train's placement-group cleaner, which fails to find its
# cluster whenever other Ray instances run on the machine (as in a parallel test session)
TINY_BUDGET = 70


def _worker_lines(text: str) -> set[str]:
    return {line for line in _plain(text).splitlines() if re.match(r"^\([^()]*pid=", line)}


def _log_of(stdout: str) -> str:
    path = re.search(r"^log: (\S+)", stdout, re.M)
    assert path, stdout[:2000]
    return Path(path[1]).read_text()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_tiny_pipeline_terminal_budget_log_file_and_verbose(tiny_pipeline, tmp_path):
    quiet = tiny_pipeline["stdout2"] + tiny_pipeline["stderr2"]
    lines = quiet.splitlines()
    print(f"terminal: {len(lines)} lines")  # pytest -rP shows it
    assert len(lines) <= TINY_BUDGET, quiet
    assert "[train step] step 8/8" in quiet  # a long step's progress, the last line always
    assert "| tuned STEP |" in quiet  # the summary
    log = _log_of(tiny_pipeline["stdout2"])
    hidden = _worker_lines(log) - _worker_lines(quiet)
    assert any("Reporting training result" in line for line in hidden), sorted(hidden)[:20]
    assert _worker_lines(quiet) < _worker_lines(log)

    # --verbose, on a rerun of the evaluate step (and the report): every line of its log
    cmd = [*_cmd(tmp_path / "store", tiny_pipeline["tracking_uri"], tmp_path / "verbose.json"),
           "--set", "evaluate.max_samples=1", "--verbose"]
    run = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path / "logs"), capture_output=True,
                         text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    shown = _plain(run.stdout + run.stderr)
    assert "[run ] evaluate" in shown and "[skip] train_step" in shown
    assert "Started a local Ray instance" in shown  # Ray's own lines, hidden without it
    assert "Started a local Ray instance" not in quiet
    # every line of the log file on the terminal (the file adds a time to log records)
    ours = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \S+: ")
    logged = {line for line in _log_of(run.stdout).splitlines() if not ours.match(line)}
    assert logged <= set(shown.splitlines()), logged - set(shown.splitlines())
