"""One nested MLflow run per Ray Tune trial, written by the search's driver.

Not by the trials: one writer per store (an embedded SQLite store shared by parallel trial
processes means lock contention), trials need no MLflow credentials, and a trial process
that dies cannot leave its run RUNNING: the callback marks it FAILED, and a final sweep
(``close_all``) ends anything still open.

A search resumed after its driver died (``Tuner.restore``, :mod:`pipelines.tune.resume`)
gets the state this callback saved with Tune's experiment (``get_state``): the runs of the
trials that finished move under the new search run (``mlflow.parentRunId``), so they are
kept, not run or logged twice; the runs of the trials the crash killed end FAILED (the
trials run again, in new runs), and so does the dead search's own run if still RUNNING.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any


def trial_runs_callback(tracking_uri: str, experiment_id: str, parent_run_id: str, *,
                        params_of: Callable[[dict[str, Any]], dict[str, Any]],
                        metric_names: Sequence[str], error_of: Callable[[Any], str]):
    """A ``ray.tune.Callback`` that gives each trial a run nested under ``parent_run_id``:
    params from ``params_of(trial.config)``, the reported ``metric_names``, and on failure
    ``error_of(trial)`` as the ``step.error`` tag. ``last`` / ``run_ids`` keep, per trial
    id, its last metrics and its run id."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient
    from ray import tune

    from pipelines.tracking.notes import with_note

    class TrialRuns(tune.Callback):
        """One nested MLflow run per trial, always ended FINISHED or FAILED."""

        def __init__(self) -> None:
            self.client = MlflowClient(tracking_uri)
            self.run_ids: dict[str, str] = {}
            self.last: dict[str, dict[str, Any]] = {}
            self.open: set[str] = set()

        def on_trial_start(self, iteration, trials, trial, **info):
            if trial.trial_id in self.run_ids:
                return
            run = self.client.create_run(
                experiment_id, run_name=f"trial-{trial.trial_id}",
                tags=with_note({"mlflow.parentRunId": parent_run_id,
                                "step.kind": "tune-trial", "ray.trial_id": trial.trial_id}),
            )
            rid = run.info.run_id
            self.run_ids[trial.trial_id] = rid
            self.open.add(rid)
            params = params_of(trial.config)
            self.client.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()])

        def on_trial_result(self, iteration, trials, trial, result, **info):
            rid = self.run_ids.get(trial.trial_id)
            metrics = {k: result[k] for k in metric_names if k in result}
            self.last[trial.trial_id] = metrics
            if rid is None:
                return
            now = int(time.time() * 1000)
            self.client.log_batch(rid, metrics=[
                Metric(k, float(v), now, 0) for k, v in metrics.items()
                if isinstance(v, (int, float)) and math.isfinite(float(v))])

        def _end(self, trial, status: str, error: str | None = None) -> None:
            rid = self.run_ids.get(trial.trial_id)
            if rid is None or rid not in self.open:
                return
            if error:
                self.client.log_batch(rid, tags=[RunTag("step.error", error[:4000])])
            self.client.set_terminated(rid, status)
            self.open.discard(rid)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial, "FINISHED" if trial.trial_id in self.last else "FAILED",
                      None if trial.trial_id in self.last else "trial reported no metrics")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial, "FAILED", error_of(trial))

        def close_all(self) -> None:
            for rid in list(self.open):
                self.client.set_terminated(rid, "FAILED")
                self.open.discard(rid)

        # ---- a search resumed after a crash ------------------------------------------

        def get_state(self) -> dict[str, Any]:
            return {"parent": parent_run_id, "run_ids": dict(self.run_ids),
                    "last": dict(self.last)}

        def set_state(self, state: dict[str, Any]) -> None:
            killed = "killed: the search's process died; the trial ran again under run " \
                     + parent_run_id
            for tid, rid in state["run_ids"].items():
                status = self.client.get_run(rid).info.status
                if status == "FINISHED":  # kept: under this search's run from now on
                    self.run_ids[tid] = rid
                    if tid in state["last"]:
                        self.last[tid] = state["last"][tid]
                    self.client.log_batch(rid, tags=[
                        RunTag("mlflow.parentRunId", parent_run_id),
                        RunTag("step.resumed_from", state["parent"])])
                elif status == "RUNNING":
                    self.client.log_batch(rid, tags=[RunTag("step.error", killed)])
                    self.client.set_terminated(rid, "FAILED")
            old = state["parent"]
            if old != parent_run_id:
                self.client.set_tag(old, "step.resumed_by", parent_run_id)
                if self.client.get_run(old).info.status == "RUNNING":
                    self.client.set_terminated(old, "FAILED")

    return TrialRuns()
