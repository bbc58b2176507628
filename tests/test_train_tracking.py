"""Tracking: URI resolution, the embedded default, and a logger that survives a dead server."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest

from pipelines.tracking.runs import (
    RunLogger,
    create_run,
    get_or_create_experiment,
    resolve_tracking_uri,
)


def test_tracking_uri_precedence(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = resolve_tracking_uri()
    assert default == f"sqlite:///{tmp_path.resolve() / 'runs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri() == "http://127.0.0.1:1"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_embedded_store_puts_artifacts_next_to_the_database(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    (tmp_path / "runs").mkdir()
    exp_id = get_or_create_experiment(uri, "exp")
    assert get_or_create_experiment(uri, "exp") == exp_id
    location = MlflowClient(uri).get_experiment(exp_id).artifact_location
    assert location == (tmp_path / "runs" / "mlartifacts" / "exp").as_uri()
    parent = create_run(uri, "exp", run_name="parent")
    child = create_run(uri, "exp", run_name="child", parent_run_id=parent,
                       tags={"ray.run_name": "n"}, resume_tags={"ray.run_name": "n"})
    assert MlflowClient(uri).get_run(child).data.tags["mlflow.parentRunId"] == parent
    # the same resume tags reopen the same run (a resumed training continues its run)
    assert create_run(uri, "exp", run_name="child", resume_tags={"ray.run_name": "n"}) == child


def test_logger_warns_and_continues_when_the_server_is_gone(mlflow_server) -> None:
    from mlflow.tracking import MlflowClient

    from helpers import free_port

    run_id = create_run(mlflow_server, "resilience", run_name="r")
    alive = RunLogger(run_id, mlflow_server)
    alive.log_metrics({"loss": 1.0}, step=1)
    assert alive.ok

    # Same run, but the server has gone away (nothing listens on this port any more).
    gone = RunLogger(run_id, f"http://127.0.0.1:{free_port()}", cooldown_s=60)
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2, 50):  # a training loop keeps logging...
            gone.log_metrics({"loss": 1.0 / step}, step=step)
        gone.log_params({"a": 1})
        gone.log_text("x", "x.txt")
        gone.end("FINISHED")
    elapsed = time.monotonic() - t0
    assert not gone.ok and gone.failures == 1  # one attempt, then the circuit is open
    assert sum("training continues" in str(w.message) for w in caught) == 1
    assert elapsed < 60, "a dead server must not stall training for MLflow's retry budget"
    history = MlflowClient(mlflow_server).get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [1]


@pytest.mark.parametrize("value", [None, "x" * 7000])
def test_params_are_made_loggable(value, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = create_run(uri, "p", run_name="p")
    logger = RunLogger(run_id, uri)
    logger.log_params({f"k{i}": value for i in range(150)})  # > 100: several batches
    assert logger.ok
    assert len(MlflowClient(uri).get_run(run_id).data.params) == 150


def test_resumed_run_with_changed_params_keeps_logging(tmp_path) -> None:
    """A reopened run whose config changed must not lose its params, artifacts or metrics
    (MLflow rejects a changed param value; that is no outage)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = create_run(uri, "resume", run_name="r")
    RunLogger(run_id, uri).log_params({"train.steps": 12, "mlflow.tracking_uri": "http://a"})

    resumed = RunLogger(run_id, uri)
    resumed.log_params({"train.steps": 24, "mlflow.tracking_uri": "http://b", "new.key": 1})
    resumed.log_text("train: {steps: 24}", "config.yaml")
    resumed.log_metrics({"loss": 0.5}, step=13)
    assert resumed.ok and resumed.failures == 0

    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params == {"train.steps": "12", "mlflow.tracking_uri": "http://a",
                               "new.key": "1"}
    assert run.data.tags["step.params_changed_on_resume"] == "mlflow.tracking_uri,train.steps"
    assert run.data.metrics["loss"] == 0.5
    local = MlflowClient(uri).download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))
    assert Path(local).read_text() == "train: {steps: 24}"


def test_global_tracking_uri_leaves_mlflow_and_the_environment_as_found(tmp_path, monkeypatch):
    """Logging a model switches MLflow's global URI for a moment; it must not leave a URI
    behind (in MLflow or in MLFLOW_TRACKING_URI, which later subprocesses inherit)."""
    import os

    import mlflow
    from mlflow.tracking._tracking_service import utils

    from pipelines.tracking.runs import global_tracking_uri

    # start from MLflow's unset state (earlier tests in the session may have set a URI)
    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri()
    with global_tracking_uri(f"sqlite:///{tmp_path / 'a.db'}"):
        assert mlflow.get_tracking_uri().endswith("a.db")
        assert os.environ["MLFLOW_TRACKING_URI"].endswith("a.db")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.get_tracking_uri() == before

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    with global_tracking_uri(f"sqlite:///{tmp_path / 'b.db'}"):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:1"
    assert mlflow.get_tracking_uri() == "http://127.0.0.1:1"
