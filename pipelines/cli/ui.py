"""``step ui``: the MLflow UI on 127.0.0.1 over the embedded store (or any tracking URI).

Binds to 127.0.0.1 only: the UI has no authentication, and the store holds everything the
pipelines logged. To look at a cluster's runs, point a browser at the cluster's own
tracking server instead (``MLFLOW_TRACKING_URI``); this command is for local stores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pydantic import Field

from pipelines.cli.command import Command, Invocation
from pipelines.common.settings import ConfigError, StrictModel


class UiSettings(StrictModel):
    port: int = Field(5000, ge=1, le=65535, description="port on 127.0.0.1")
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
        raise FileNotFoundError(f"no MLflow store at {db} yet: run `step run "
                                "configs/demo.yaml` first (or pass --backend-store-uri)")
    artifacts = settings.artifacts or str(db.parent / DEFAULT_ARTIFACTS
                                      if db.parent.name == DEFAULT_DIR else db.parent / "mlartifacts")
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    return [mlflow_bin, "ui", "--backend-store-uri", store, "--default-artifact-root",
            artifacts, "--host", "127.0.0.1", "--port", str(settings.port), "--workers", "1"]


def serve(inv: Invocation) -> int:
    settings: UiSettings = inv.settings
    cmd = command(settings)
    if settings.print_command:
        print(" ".join(cmd))
        return 0
    print(f"MLflow UI on http://127.0.0.1:{settings.port} (store {cmd[3]}); Ctrl-C stops it")
    # job execution off: the UI alone starts in ~4 s and ~0.5 GiB instead of ~7 s / 1.9 GiB
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0


COMMAND = Command(UiSettings, serve, json=None, config_help="ui settings (YAML)")
configure = COMMAND.configure
run = COMMAND.run
