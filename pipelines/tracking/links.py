"""Addresses in the MLflow UI: every one the project prints or writes is made here.

MLflow 3.17's UI shows an experiment, and a run, in the view of its sidebar switch: the
GenAI view by default (kept per browser), whose run page is an "Evaluations" view without
a training's metrics. The query parameter ``workflowType=machine_learning`` opens the
"Model training" view instead, so every address carries it (checked in headless
Chromium; the experiment tag ``mlflow.experimentKind`` alone does not switch the view).

A tracking server's addresses are absolute (its URL, without any credentials). A local
SQLite store has no address until ``step ui`` serves it: its addresses are those of
``step ui`` at its default port.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

MODEL_TRAINING_VIEW = "workflowType=machine_learning"
UI_PORT = 5000  # `step ui`'s default port


def run_link(experiment_id: str, run_id: str) -> str:
    """The UI's address of a run, relative to the UI's root."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"


def experiment_link(experiment_id: str) -> str:
    """The UI's address of an experiment's runs table, relative to the UI's root."""
    return f"#/experiments/{experiment_id}/runs?{MODEL_TRAINING_VIEW}"


def server_base(tracking_uri: str) -> str:
    """The UI's root for links: a tracking server's URL (without credentials), else ''."""
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        return ""
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/", "", ""))


def local_ui_base(port: int = UI_PORT) -> str:
    return f"http://127.0.0.1:{port}/"


def run_location(tracking_uri: str, run_id: str, experiment_id: str | None = None) -> str:
    """Where to open a run, for a terminal line: its address in the model-training view
    (on the server; for a local store, once ``step ui`` serves it). The experiment is looked
    up when not given; if the store cannot be asked, the tracking URI is all there is."""
    if experiment_id is None:
        try:
            from mlflow.tracking import MlflowClient

            experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
        except Exception:  # noqa: BLE001 - an address is a convenience, never a failure
            return f"run {run_id} at {tracking_uri}"
    base = server_base(tracking_uri)
    if base:
        return base + run_link(experiment_id, run_id)
    return f"{local_ui_base()}{run_link(experiment_id, run_id)} once `step ui` serves {tracking_uri}"
