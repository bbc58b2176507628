"""``step ui``: the MLflow UI on 127.0.0.1 over the embedded store (or any tracking URI).

Binds to 127.0.0.1 only: the UI has no authentication, and the store holds everything the
pipelines logged. To look at a cluster's runs, point a browser at the cluster's own
tracking server instead (``MLFLOW_TRACKING_URI``); this command is for local stores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--backend-store-uri", default=None,
                        help="default: $MLFLOW_TRACKING_URI if it is a sqlite:// URI, else "
                        "the embedded store ./runs/mlflow.db")
    parser.add_argument("--artifacts", default=None,
                        help="artifact root for new experiments (default: ./runs/mlartifacts)")
    parser.add_argument("--print-command", action="store_true",
                        help="print the mlflow command instead of running it")


def command(args: argparse.Namespace) -> list[str]:
    from pipelines.tracking.runs import DEFAULT_ARTIFACTS, DEFAULT_DIR, default_tracking_uri

    store = args.backend_store_uri
    env_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if store is None:
        store = env_uri if env_uri.startswith("sqlite:") else default_tracking_uri()
    if not store.startswith("sqlite:"):
        raise SystemExit(f"error: --backend-store-uri {store!r}: `step ui` serves a local "
                         "SQLite store; open a remote tracking server in the browser directly")
    db = Path(store[len("sqlite:///"):])
    if not db.is_file():
        raise SystemExit(f"error: no MLflow store at {db} yet: run `step run configs/demo.yaml` "
                         "first (or pass --backend-store-uri)")
    artifacts = args.artifacts or str(db.parent / DEFAULT_ARTIFACTS
                                      if db.parent.name == DEFAULT_DIR else db.parent / "mlartifacts")
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    return [mlflow_bin, "ui", "--backend-store-uri", store, "--default-artifact-root",
            artifacts, "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]


def run(args: argparse.Namespace) -> int:
    cmd = command(args)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    print(f"MLflow UI on http://127.0.0.1:{args.port} (store {cmd[3]}); Ctrl-C stops it")
    # job execution off: the UI alone starts in ~4 s and ~0.5 GiB instead of ~7 s / 1.9 GiB
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0
