"""``step ui`` serves the embedded SQLite store on 127.0.0.1 (a real MLflow UI process)."""

from __future__ import annotations

import contextlib
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

pytestmark = pytest.mark.timeout(300)


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


def _store(tmp_path) -> str:
    from pipelines.tracking.runs import get_or_create_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    get_or_create_experiment(uri, "ui-signals")
    return uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
            return True
    except OSError:
        return False


def _procs() -> list[tuple[int, int, int, str]]:
    """(pid, ppid, pgid, state) of every process, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            out.append((int(stat.parent.name), int(fields[1]), int(fields[2]), fields[0]))
    return out


def _group_left(pgid: int) -> list[int]:
    """Processes still in the server's process group (zombies are not processes)."""
    return [pid for pid, _, group, state in _procs() if group == pgid and state != "Z"]


def _server_group(ui_pid: int) -> int:
    """The process group of the server that `step ui` (``ui_pid``) started."""
    kids = [group for _, ppid, group, _ in _procs() if ppid == ui_pid]
    assert kids, "step ui started no server"
    return kids[0]


def _wait_until(check, timeout: float, what: str, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: step ui exited ({proc.returncode}): "
                                 + proc.stdout.read().decode()[-2000:])
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


@pytest.mark.integration
def test_timeout_step_ui_leaves_nothing_listening(tmp_path):
    """`timeout 600 step ui`, ended by SIGTERM the way timeout (and systemd, and kill) end
    their command: timeout relays a SIGTERM it receives to its child, which is what it
    sends it when the time runs out; the test does not wait out a fixed duration. The
    server and its uvicorn worker go with step ui; nothing answers on the port afterwards."""
    port, uri = _free_port(), _store(tmp_path)
    proc = subprocess.Popen(["timeout", "600", sys.executable, "-m", "pipelines.cli", "ui",
                             "--port", str(port), "--backend-store-uri", uri],
                            env=_env_without_tracking_uri(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # up to ~35 s on a loaded 2-core machine
        _wait_until(lambda: _answers(port), 90, "the UI did not come up", proc)
        ui = next(pid for pid, ppid, _, _ in _procs() if ppid == proc.pid)  # timeout's child
        group = _server_group(ui)
        proc.send_signal(signal.SIGTERM)  # to timeout, which relays it to step ui
        assert proc.wait(timeout=60) == 0  # step ui's own code, passed on by timeout
        assert not _answers(port)
        with socket.socket() as s:  # nobody listens (connections may linger in TIME_WAIT)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
        assert _group_left(group) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def serving(tmp_path):
    """`step ui` serving a store, up: (its process, its port, its server's process group)."""
    port, uri = _free_port(), _store(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--port", str(port),
                             "--backend-store-uri", uri], env=_env_without_tracking_uri(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_until(lambda: _answers(port), 90, "the UI did not come up", proc)
        yield proc, port, _server_group(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_step_ui_stops_its_server_on_a_signal(serving, sig):
    proc, port, group = serving
    assert group != os.getpgid(proc.pid)  # its own group: a terminal's ^C reaches step ui
    proc.send_signal(sig)                 # step ui alone, as a terminal would
    assert proc.wait(timeout=30) == 0
    assert not _answers(port) and _group_left(group) == []


@pytest.mark.integration
def test_step_ui_exits_non_zero_when_its_server_dies(serving):
    proc, _, group = serving
    os.killpg(group, signal.SIGKILL)  # the server dies; step ui is not signalled
    assert proc.wait(timeout=30) != 0
    assert "mlflow exited on its own" in proc.stdout.read().decode()
    assert _group_left(group) == []


def test_a_forward_ends_with_step_ui(tmp_path):
    """`--forward`: SIGTERM to step ui (not to its group) ends the ssh it runs too (here a
    stand-in `ssh` that only waits)."""
    fake = tmp_path / "bin" / "ssh"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexec sleep 300\n")
    fake.chmod(0o755)
    env = dict(_env_without_tracking_uri(), PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--tracking-uri",
                             "http://127.0.0.1:5999", "--forward", "me@gateway"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_until(lambda: any(ppid == proc.pid for _, ppid, _, _ in _procs()), 60,
                    "no ssh started", proc)
        ssh = next(pid for pid, ppid, _, _ in _procs() if ppid == proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert ssh not in [pid for pid, _, _, state in _procs() if state != "Z"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


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
