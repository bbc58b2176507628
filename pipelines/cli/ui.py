"""``step ui``: the MLflow UI on 127.0.0.1 over the embedded store, or a remote server's.

Binds to 127.0.0.1 only: the UI has no authentication, and the store holds everything the
pipelines logged. A cluster's runs are on its own tracking server: ``--tracking-uri
http://HOST:PORT`` (or ``MLFLOW_TRACKING_URI``) prints that server's UI address and serves
nothing; with ``--forward [user@]gateway`` it opens ``ssh -N -L`` from 127.0.0.1:PORT
(``--port``) to HOST:PORT as the gateway sees it, for a server that listens only on the
cluster's network (or on the head node's loopback: ``http://127.0.0.1:5000``).

The local server (``mlflow ui`` and the uvicorn worker it starts) runs in a process group
of its own, which ``step ui`` ends (SIGTERM, then SIGKILL after a grace period) when it gets
SIGTERM, SIGINT or SIGHUP: what ``timeout``, ``systemd``, ``kill``, Ctrl-C and a closed
terminal send. A server that exits on its own (a port already taken, a broken store) makes
``step ui`` exit non-zero, its workers stopped too.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field

from pipelines.cli.command import Command, Invocation
from pipelines.common.errors import InputNotFound
from pipelines.common.settings import ConfigError, StrictModel
from pipelines.tracking.links import UI_PORT

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class UiSettings(StrictModel):
    port: int = Field(UI_PORT, ge=1, le=65535, description="port on 127.0.0.1 (the local UI, "
                      "or the local end of --forward)")
    tracking_uri: str | None = Field(
        None, description="a remote tracking server, http(s)://HOST:PORT: print its UI's "
        "address instead of serving a local store (default: $MLFLOW_TRACKING_URI when it is "
        "one and no --backend-store-uri is given)")
    forward: str | None = Field(
        None, description="[user@]host to reach the server through: runs `ssh -N -L "
        "127.0.0.1:PORT:HOST:SERVERPORT [user@]host` (HOST:SERVERPORT from --tracking-uri, "
        "as that host sees it) until Ctrl-C")
    backend_store_uri: str | None = Field(
        None, description="a sqlite:/// store (default: $MLFLOW_TRACKING_URI if it is a "
        "sqlite:// URI, else the embedded store ./runs/mlflow.db)")
    artifacts: str | None = Field(None, description="artifact root for new experiments "
                                  "(default: ./runs/mlartifacts)")
    print_command: bool = Field(False, description="print the mlflow command instead of "
                                "running it")


def command(settings: UiSettings) -> list[str]:
    from pipelines.tracking.runs import DEFAULT_ARTIFACTS, DEFAULT_DIR, default_tracking_uri

    store = settings.backend_store_uri
    env_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if store is None:
        store = env_uri if env_uri.startswith("sqlite:") else default_tracking_uri()
    if not store.startswith("sqlite:"):
        raise ConfigError(f"invalid settings:\n  backend_store_uri: {store!r}: `step ui` "
                          "serves a local SQLite store; open a remote tracking server in the "
                          "browser directly")
    db = Path(store[len("sqlite:///"):])
    if not db.is_file():
        raise InputNotFound(f"no MLflow store at {db} yet: run `step run "
                                "configs/demo.yaml` first (or pass --backend-store-uri)")
    artifacts = settings.artifacts or str(db.parent / DEFAULT_ARTIFACTS
                                      if db.parent.name == DEFAULT_DIR else db.parent / "mlartifacts")
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    return [mlflow_bin, "ui", "--backend-store-uri", store, "--default-artifact-root",
            artifacts, "--host", "127.0.0.1", "--port", str(settings.port), "--workers", "1"]


def remote_uri(settings: UiSettings) -> str | None:
    """The remote server to show: --tracking-uri, else an http(s) $MLFLOW_TRACKING_URI
    (unless a local store was asked for); None: serve a local store."""
    uri = settings.tracking_uri
    env_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri is None and settings.backend_store_uri is None and \
            env_uri.startswith(("http://", "https://")):
        uri = env_uri
    if uri is None:
        if settings.forward:
            raise ConfigError("invalid settings:\n  forward: needs --tracking-uri "
                              "http(s)://HOST:PORT (the server, as the forward's host sees it)")
        return None
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"invalid settings:\n  tracking_uri: {uri!r}: expected "
                          "http://HOST:PORT or https://HOST:PORT (a tracking server)")
    fwd = settings.forward
    if fwd is not None and (fwd.startswith("-") or not re.fullmatch(r"[\w.@:\[\]-]+", fwd)):
        raise ConfigError(f"invalid settings:\n  forward: {settings.forward!r}: expected "
                          "[user@]host (an ssh destination)")
    return uri


def _server(uri: str) -> tuple[str, int]:
    parts = urlsplit(uri)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def forward_command(settings: UiSettings, uri: str) -> list[str]:
    host, port = _server(uri)
    # ExitOnForwardFailure: a local port already taken fails now, not at the first click
    return ["ssh", "-N", "-o", "ExitOnForwardFailure=yes", "-L",
            f"127.0.0.1:{settings.port}:{host}:{port}", settings.forward]


def show_remote(settings: UiSettings, uri: str) -> int:
    from pipelines.tracking.links import server_base

    if settings.forward:
        cmd = forward_command(settings, uri)
        if settings.print_command:
            print(shlex.join(cmd))
            return 0
        scheme = urlsplit(uri).scheme
        host, port = _server(uri)
        print(f"MLflow UI on {scheme}://127.0.0.1:{settings.port}/ (forwarded through "
              f"{settings.forward} to {host}:{port}); Ctrl-C stops it", flush=True)
        # in this terminal's process group: ssh may have to ask for a password
        return run_server(cmd, dict(os.environ), own_group=False)
    base = server_base(uri)  # without any user:password@ of the URI
    print(f"MLflow UI: {base}")
    try:
        with urllib.request.urlopen(base + "health", timeout=5):
            pass
    except urllib.error.HTTPError:
        pass  # it answers (an authenticating proxy, say): the browser will sign in
    except OSError as err:
        print(f"warning: {base} does not answer from here ({type(err).__name__}: {err}); "
              "behind a gateway, add --forward [user@]gateway", file=sys.stderr)
        return 0
    print_experiments(uri, base)
    return 0


def print_experiments(tracking_uri: str, base: str) -> None:
    """The experiments' addresses in the model-training view: MLflow 3.17's UI opens every
    experiment in the GenAI view until its sidebar switch is flipped (once per browser)."""
    from pipelines.tracking.runs import experiment_views

    try:
        views = experiment_views(tracking_uri, base)
    except Exception as err:  # noqa: BLE001 - a convenience: the UI works without it
        print(f"(experiments not listed: {type(err).__name__}: {str(err)[:200]})")
        return
    for name, url in views:
        print(f"  {name}: {url}")


def serve(inv: Invocation) -> int:
    settings: UiSettings = inv.settings
    remote = remote_uri(settings)
    if remote is not None:
        return show_remote(settings, remote)
    cmd = command(settings)
    if settings.print_command:
        print(" ".join(cmd))
        return 0
    print(f"MLflow UI on http://127.0.0.1:{settings.port} (store {cmd[3]}); Ctrl-C stops it",
          flush=True)
    # job execution off: the UI alone starts in ~4 s and ~0.5 GiB instead of ~7 s / 1.9 GiB
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    return run_server(cmd, env, lambda: print_experiments(
        cmd[3], f"http://127.0.0.1:{settings.port}/"))


def run_server(cmd: list[str], env: dict[str, str], meanwhile=lambda: None,
               grace: float = 10.0, own_group: bool = True) -> int:
    """Run ``cmd`` (in a process group of its own unless ``own_group`` is false) until it
    exits, or until this process gets one of :data:`STOP_SIGNALS`; it is stopped either
    way (with its group). Returns 0 when a signal stopped it, else the server's exit code
    (1 if it exited 0: a server never should)."""
    stopped: list[int] = []
    proc = subprocess.Popen(cmd, env=env, start_new_session=own_group)

    def on_signal(signum, frame) -> None:
        stopped.append(signum)
        if own_group:
            _signal_group(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        meanwhile()  # while the server starts (e.g. MLflow's import, seconds)
        sys.stdout.flush()
        code = proc.wait()  # a signal's handler runs, then the wait goes on
    finally:
        if own_group:
            _stop_group(proc, grace)
        elif proc.poll() is None:
            proc.kill()
            proc.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopped:
        return 0
    print(f"step ui: {Path(cmd[0]).name} exited on its own (code {code})", file=sys.stderr)
    return code or 1


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the group; False once no process of it is left."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def _stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the server's group (its leader and the uvicorn workers, which outlive a
    leader that dies first), SIGKILL what is left after ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while _signal_group(proc.pid, signal.SIGTERM) and time.monotonic() < deadline:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.2)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


COMMAND = Command(UiSettings, serve, json=None, config_help="ui settings (YAML)")
configure = COMMAND.configure
run = COMMAND.run
