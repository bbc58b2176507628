"""``step submit`` against a real Ray head started with token authentication (Ray 2.60)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOVEDA = REPO.parent / "shared" / "fixtures" / "real" / "loveda"

pytestmark = pytest.mark.timeout(240)


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """``ray start --head --block`` in its own process group, token auth on."""
    token = secrets.token_hex(16)
    temp = tempfile.mkdtemp(prefix="rsub", dir="/tmp")
    gcs, dash = _port(), _port()
    # the head's `python` is this venv's, as on a cluster node where setup installed step-seg
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=path)
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    log = open(Path(temp) / "head.log", "wb")  # noqa: SIM115
    # every port explicit: another Ray on this machine (the session's `ray_local`) already
    # holds the defaults, e.g. the dashboard agent's 52365, and the job agent never starts
    ports = [f"--{name}={_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port",
        "ray-client-server-port")]
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         *ports, f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, (Path(temp) / "head.log").read_text()[-2000:]
            try:
                req = urllib.request.Request(address + "/api/version",
                                             headers={"Authorization": f"Bearer {token}"})
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the Ray head's job API did not come up")
        yield {"address": address, "token": token, "temp": temp}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_submit_follow_with_token(ray_head, tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    token_file = tmp_path / "token"
    token_file.write_text(ray_head["token"])
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # only the explicit token may be used
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    rc = main(["submit", "configs/tiny/pipeline.yaml", "--address", ray_head["address"],
               "--token-file", str(token_file), "--follow", "--timeout", "180",
               "--set", f"data.src={LOVEDA}", "--set", f"storage={tmp_path / 'store'}",
               "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
               "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "submitted job" in out and "SUCCEEDED" in out
    # the job ran `step run --dry-run` on the cluster: its plan came back in the logs
    for step in ("prepare", "train_policy", "train_step", "tune", "evaluate", "report"):
        assert f"{step}" in out
    assert "run  fingerprint" in out
    assert ray_head["token"] not in out


def test_submit_without_token_says_how(ray_head, monkeypatch, capsys, tmp_path):
    from pipelines.cli import main

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    rc = main(["submit", "configs/tiny/pipeline.yaml", "--address", ray_head["address"],
               "--set", f"data.src={LOVEDA}", "--set", f"storage={tmp_path}"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "Ray auth token" in out


def test_submit_rejects_bad_config(tmp_path, capsys):
    from pipelines.cli import main

    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\ndata: {src: somewhere}\nstep: {config: nope.yaml}\n")
    assert main(["submit", str(bad), "--address", "http://127.0.0.1:1"]) == 2
    assert "step.config: file not found: nope.yaml" in capsys.readouterr().out
