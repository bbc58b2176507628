"""Paths, servers and processes shared by the tests; the pytest fixtures are in conftest.py."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Real samples inside the repository (sources and licences in tests/data/README.md); the
# LoveDA scenes are the demo's data, shipped once.
FIXTURES = REPO / "tests" / "data"
LOVEDA = REPO / "demo_data" / "loveda"


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: every socket stays bound until all are chosen (one after
    the other, the kernel may hand out a port just released, and Ray refuses a node whose
    components share one)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")




def start_mlflow_server(root: Path, artifact_root: str | None = None,
                        env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow server`` on 127.0.0.1 with its SQLite store and artifacts in ``root``
    (or under ``artifact_root``, e.g. ``s3://bucket/mlflow``, with ``env`` holding its keys).

    Returns (process, URI) once ``/health`` answers. Starting it again on the same ``root``
    serves the same runs (tests that kill a server and bring it back).
    """
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(env or os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    with open(root / "server.log", "ab") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [
                mlflow_bin, "server",
                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                "--default-artifact-root", artifact_root or str(root / "artifacts"),
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            ],
            stdout=log, stderr=subprocess.STDOUT, env=env,
            # `mlflow server` serves from a child (uvicorn): a process group of its own lets
            # stop_process / kill_process end the server, not only the launcher.
            start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(uri + "/health", timeout=90, proc=proc)
    except BaseException:
        stop_process(proc)
        raise
    return proc, uri


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 15) -> None:
    """Signal the process group of ``proc`` (started with ``start_new_session``); SIGKILL
    it if it has not ended within ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def kill_process(proc: subprocess.Popen) -> None:
    """A crash, not a shutdown: SIGKILL to the whole group."""
    stop_process(proc, signal.SIGKILL)


# the CamVid benchmark's data: a copy beside the repository (dev machines, CI), or none
CAMVID = REPO.parent / "shared" / "fixtures" / "camvid"


# ---- Ray nodes started with `ray start` (a cluster on 127.0.0.1) -------------------------

# Every port explicit: another Ray on this machine (the session's `ray_local`, another
# node) already holds the defaults, e.g. the dashboard agent's 52365.
_NODE_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
               "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
               "object-manager-port")


@dataclass
class RayNode:
    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    gcs: str = ""
    dashboard: str = ""
    token: str = ""
    extra: dict = field(default_factory=dict)

    def session_logs(self) -> list[Path]:
        return sorted(self.temp_dir.glob("session_*/logs"))

    def stop(self) -> None:
        # `ray start --block` outlives SIGTERM by more than 15 s: a throwaway test node
        # gets a short grace, then SIGKILL (its temp dir is read before this, if at all)
        stop_process(self.proc, grace=3)


def node_env(token: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A node's environment: token auth, and this venv first on PATH (as on a cluster node
    where the setup commands installed step-seg), so job entrypoints find its `python`."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=path)
    env.pop("RAY_ADDRESS", None)
    env.update(extra or {})
    return env


def start_ray_node(*, head_gcs: str | None = None, token: str | None = None,
                   num_cpus: int = 1, env_extra: dict[str, str] | None = None) -> RayNode:
    """``ray start --block`` in its own process group and its own ``--temp-dir`` (a shared
    one lets a worker node's runtime-env GC delete the head's job working directory).
    Without ``head_gcs`` it starts a head (dashboard and job API on 127.0.0.1) and waits
    until the job API answers."""
    token = token or secrets.token_hex(16)
    temp = Path(tempfile.mkdtemp(prefix="rnode", dir="/tmp"))
    log_path = temp / "node.log"
    ports = free_ports(len(_NODE_PORTS) + 3)
    args = [str(Path(sys.executable).parent / "ray"), "start", "--block",
            f"--num-cpus={num_cpus}", f"--temp-dir={temp}", "--disable-usage-stats",
            *[f"--{name}={port}" for name, port in zip(_NODE_PORTS, ports, strict=False)]]
    gcs = dash = ""
    if head_gcs is None:
        gcs_port, dash_port, client_port = ports[-3:]
        gcs, dash = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}"
        args += ["--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
                 "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={dash_port}", f"--ray-client-server-port={client_port}"]
    else:
        args += [f"--address={head_gcs}", "--node-ip-address=127.0.0.1"]
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(args, env=node_env(token, env_extra), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    node = RayNode(proc, temp, log_path, gcs=gcs or head_gcs, dashboard=dash, token=token)
    if head_gcs is None:
        try:
            wait_ray_api(node, "/api/version")
        except BaseException:
            node.stop()
            raise
    return node


def wait_ray_api(head: RayNode, path: str, check=lambda body: True, timeout: float = 120) -> bytes:
    """GET ``path`` of the head's dashboard (with the token) until ``check(body)``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.proc.poll() is None, head.log.read_text()[-2000:]
        try:
            req = urllib.request.Request(head.dashboard + path,
                                         headers={"Authorization": f"Bearer {head.token}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                body = r.read()
                if r.status == 200 and check(body):
                    return body
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{head.dashboard}{path} not ready within {timeout}s")


# ---- small models and labelled images for the step_model tests ---------------------------

# Random (or barely trained) exit heads give near-uniform probabilities, whose margins (the
# default exit score) are all close to 0: tests that need such heads to halt tokens at
# their thresholds read the max probability instead.
RANDOM_HEADS = {"exit_score": "confidence"}


def tiny(policy: str = "none", exits: list[int] | None = None,
         inference: dict | None = None, **kw):
    """vit_tiny (192 wide, 12 blocks) with a random, untrained policy: fast to build.
    ``policy`` is the policy mode; ``inference``: other inference settings, on top of
    :data:`RANDOM_HEADS`."""
    import torch

    from step_model import ExitConfig, PolicyConfig, StepConfig, build_step_model

    torch.manual_seed(0)
    cfg = StepConfig(
        backbone="vit_tiny_patch16_384", num_classes=kw.pop("num_classes", 5),
        policy=PolicyConfig(pretrained=False), exits=ExitConfig(blocks=exits or []), **kw,
    )
    return build_step_model(cfg, {"policy_mode": policy, **RANDOM_HEADS,
                                  **(inference or {})}).eval()


def loveda_pairs() -> list:
    """[(name, image float (1,3,1024,1024), label int64 (1,1024,1024) with 0 -> 255,
    c -> c-1)] for the three LoveDA scenes."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for img_path in sorted((LOVEDA / "img_dir").glob("*.png")):
        img = np.asarray(Image.open(img_path).convert("RGB"))
        lab = np.asarray(Image.open(LOVEDA / "ann_dir" / img_path.name)).astype(np.int64)
        lab = np.where(lab == 0, 255, lab - 1)
        out.append((
            img_path.name,
            torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255,
            torch.from_numpy(lab)[None],
        ))
    assert len(out) == 3, f"expected 3 LoveDA fixtures in {LOVEDA}"
    return out


def blocky_labels(h: int, w: int, seed: int):
    """Random classes per 16-px cell (few homogeneous windows) with one homogeneous square
    of 2 * (seed + 1) cells in the top-left corner: token counts differ with the seed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, 4, (1, h // 16, w // 16), generator=g)
    side = 2 * (seed + 1)
    cells[:, :side, :side] = 4
    return cells.repeat_interleave(16, 1).repeat_interleave(16, 2)


def printed_settings(capsys, argv: list[str]) -> dict:
    """The settings ``step <argv> --print-config`` resolves (its command must succeed)."""
    import yaml

    from pipelines.cli import main

    assert main([*argv, "--print-config"]) == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)
