"""The MLflow runs of a pipeline (``step run``): the parent run and one child per step.

Everything :class:`~pipelines.workflow.runner.Workflow` records in MLflow goes through
:class:`PipelineRuns`, so the workflow reads as sequencing and fingerprints only. Tags
that the workflow relies on to skip and resume: ``step.workflow`` (pipeline name),
``step.name`` (step), ``step.fingerprint``, ``step.outputs`` (JSON), ``step.skipped``,
``step.reused_run_id``, ``step.error``.
"""

from __future__ import annotations

import json
from typing import Any

from pipelines.tracking.runs import get_or_create_experiment


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
                                      tags=tags).info.run_id

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
