"""``step ui`` serves the embedded SQLite store on 127.0.0.1 (a real MLflow UI process)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(120)


@pytest.mark.integration
def test_step_ui_serves_the_embedded_store(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.runs import get_or_create_experiment

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    (tmp_path / "runs").mkdir()
    get_or_create_experiment(uri, "ui-check")
    MlflowClient(uri).create_run(get_or_create_experiment(uri, "ui-check"), run_name="seen")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # from the directory holding runs/: the default store is found without any flag
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--port", str(port)],
                            cwd=tmp_path, env=_env_without_tracking_uri(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the UI did not come up"
                time.sleep(0.5)
        req = urllib.request.Request(
            base + "/api/2.0/mlflow/experiments/search",
            data=json.dumps({"max_results": 10}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            names = {e["name"] for e in json.loads(r.read())["experiments"]}
        assert "ui-check" in names
        # bound to loopback only
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                             text=True).stdout
        local = [line.split()[3] for line in out.splitlines() if line.strip()]
        assert local and all(a.startswith("127.0.0.1:") for a in local), out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def test_step_ui_without_store_says_what_to_do(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "ui"], cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=""),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "step run configs/demo.yaml" in out.stdout + out.stderr


def _env_without_tracking_uri() -> dict[str, str]:
    """The default store is what is tested: no MLFLOW_TRACKING_URI from the caller."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env
