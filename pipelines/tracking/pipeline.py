"""The MLflow runs of a pipeline (``step run``): the parent run and one child per step.

Everything :class:`~pipelines.workflow.runner.Workflow` records in MLflow goes through
:class:`PipelineRuns`, so the workflow reads as sequencing and fingerprints only. Tags
that the workflow relies on to skip and resume: ``step.workflow`` (pipeline name),
``step.name`` (step), ``step.fingerprint``, ``step.outputs`` (JSON), ``step.skipped``,
``step.reused_run_id``, ``step.error``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.tracking.notes import NOTE_TAG, with_note
from pipelines.tracking.runs import get_or_create_experiment


@dataclass
class RunView:
    """What the review of a pipeline reads of one run (no MLflow types leave this package)."""

    run_id: str
    name: str
    experiment_id: str
    status: str
    depth: int  # 1: a step run, 2: a run nested under a step (a training, a trial), ...
    parent_id: str
    tags: dict[str, str] = field(default_factory=dict)


class PipelineRuns:
    def __init__(self, tracking_uri: str, experiment: str):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.experiment_id = get_or_create_experiment(tracking_uri, experiment)
        self.client = MlflowClient(tracking_uri)

    def status(self, run_id: str) -> str | None:
        """The run's status, or None when the store does not have it (deleted, other store)."""
        try:
            return self.client.get_run(run_id).info.status
        except Exception:  # noqa: BLE001 - any lookup failure means "not there"
            return None

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, "step.resumed", "true")

    def create(self, run_name: str, tags: dict[str, str]) -> str:
        return self.client.create_run(self.experiment_id, run_name=run_name,
                                      tags=with_note(tags, self.experiment_id)).info.run_id

    def set_note(self, run_id: str, text: str) -> None:
        """The run's description (Markdown, on its overview page in the UI)."""
        self.client.set_tag(run_id, NOTE_TAG, text)

    def get(self, run_id: str) -> RunView | None:
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - any lookup failure means "not there"
            return None
        return _view(run, depth=0)

    def tree(self, run_id: str, *, depth: int = 1) -> list[RunView]:
        """The runs below ``run_id``, depth first, each step's runs in start order."""
        out: list[RunView] = []
        kids = self.client.search_runs(
            [self.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'",
            order_by=["attributes.start_time ASC"], max_results=1000)
        for run in kids:
            out.append(_view(run, depth))
            out += self.tree(run.info.run_id, depth=depth + 1)
        return out

    def artifact_files(self, run_id: str, under: str = "") -> list[str]:
        """Paths of every artifact file below ``under`` (recursive; [] if none)."""
        out: list[str] = []
        for info in self.client.list_artifacts(run_id, under or None):
            if info.is_dir:
                out += self.artifact_files(run_id, info.path)
            else:
                out.append(info.path)
        return out

    def read_artifact(self, run_id: str, path: str) -> bytes:
        # MLflow draws a progress bar per download; a page of a dozen images would bury
        # the pipeline's output under them (read at call time, so set around the call)
        saved = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        try:
            with tempfile.TemporaryDirectory() as tmp:
                local = self.client.download_artifacts(run_id, path, tmp)
                return Path(local).read_bytes()
        finally:
            if saved is None:
                os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
            else:
                os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def end(self, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
        if error:
            self.client.set_tag(run_id, "step.error", error[:4000])
        self.client.set_terminated(run_id, status)

    def fail_tree(self, run_id: str, why: str) -> None:
        """A run and its descendants that are still RUNNING end FAILED with ``why``."""
        if self.status(run_id) == "RUNNING":
            self.end(run_id, "FAILED", why)
        for child in self.client.search_runs(
                [self.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'",
                max_results=1000):
            self.fail_tree(child.info.run_id, why)

    def finished_step(self, workflow: str, step: str,
                      fingerprint: str) -> tuple[str, dict[str, Any]] | None:
        """(run id, outputs) of a FINISHED, non-skipped run of this step and fingerprint."""
        query = (f"tags.`step.workflow` = '{workflow}' and tags.`step.name` = '{step}' "
                 f"and tags.`step.fingerprint` = '{fingerprint}' "
                 "and attributes.status = 'FINISHED'")
        for run in self.client.search_runs([self.experiment_id], query,
                                           order_by=["attributes.start_time DESC"],
                                           max_results=20):
            if run.data.tags.get("step.skipped") == "true":
                continue
            return run.info.run_id, json.loads(run.data.tags.get("step.outputs", "{}"))
        return None

    def record_skipped(self, step: str, tags: dict[str, str], reused_run_id: str,
                       outputs: dict[str, Any]) -> str:
        """A FINISHED ``<step> (skipped)`` run that points at the run it reuses."""
        run_id = self.create(f"{step} (skipped)", {
            **tags, "step.skipped": "true", "step.reused_run_id": reused_run_id,
            "step.outputs": json.dumps(outputs)})
        self.end(run_id)
        return run_id

    def finish_step(self, run_id: str, outputs: dict[str, Any], seconds: float) -> None:
        self.client.set_tag(run_id, "step.outputs", json.dumps(outputs, default=str))
        self.client.log_metric(run_id, "step_seconds", seconds)
        self.end(run_id)


def _view(run, depth: int) -> RunView:
    tags = dict(run.data.tags)
    return RunView(run.info.run_id, run.info.run_name or "", run.info.experiment_id,
                   run.info.status, depth, tags.get("mlflow.parentRunId", ""), tags)
