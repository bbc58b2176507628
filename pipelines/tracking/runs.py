"""MLflow tracking: where runs go, and a logger that never kills training.

Design choices:

* **One tracking URI rule for every command**: explicit (config / flag) >
  ``MLFLOW_TRACKING_URI`` > an embedded default, ``sqlite:///<cwd>/runs/mlflow.db`` with
  artifacts in ``<cwd>/runs/mlartifacts``. MLflow 3.17 refuses the old ``./mlruns`` file
  store unless ``MLFLOW_ALLOW_FILE_STORE=true``, hence SQLite. Experiments are created with
  an explicit ``artifact_location`` so artifacts never land in whatever the current
  directory of a Ray worker happens to be.
* **Only the driver and rank 0 talk to MLflow.** The driver creates the run (so its id
  exists before any worker starts, and other ranks can never create empty runs); rank 0
  logs per-step metrics to that run id through :class:`RunLogger`.
* **A tracking server that goes away must not kill training.** :class:`RunLogger` catches
  every MLflow error, warns once per outage, and stops trying for ``cooldown_s`` seconds
  (a circuit breaker) so that a dead server costs one short timeout, not MLflow's default
  7 retries with exponential back-off (about 4 minutes per call against a refused port) on
  every training step. The short HTTP budget is set only for the duration of the logger's
  own calls: the driver shares its process with other MLflow users (Tune, the workflow),
  whose calls keep MLflow's defaults. Model uploads keep the defaults too (a large model
  can take longer than the short timeout to be acknowledged); they run only while the
  circuit is closed, so a dead server is found by a cheap call first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_DIR = "runs"
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"

# Short HTTP budget for the logger's calls (seconds / retries). MLflow reads these variables
# per request, so they are set around each call only (see ``_short_http_budget``).
_FAST_FAIL_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_budget_lock = threading.Lock()
_budget_users = 0
_budget_set: list[str] = []


@contextlib.contextmanager
def _short_http_budget():
    """``_FAST_FAIL_ENV`` for the duration of a call; variables the user set win.

    Reference-counted so that overlapping calls from several threads restore the
    environment only when the last one ends.
    """
    global _budget_users
    with _budget_lock:
        if _budget_users == 0:
            _budget_set[:] = [k for k in _FAST_FAIL_ENV if k not in os.environ]
            os.environ.update({k: _FAST_FAIL_ENV[k] for k in _budget_set})
        _budget_users += 1
    try:
        yield
    finally:
        with _budget_lock:
            _budget_users -= 1
            if _budget_users == 0:
                for k in _budget_set:
                    os.environ.pop(k, None)
                _budget_set.clear()


def default_tracking_uri(root: str | Path | None = None) -> str:
    """The embedded store: a SQLite file under ``<root or cwd>/runs``."""
    base = Path(root or Path.cwd()).resolve() / DEFAULT_DIR
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / DEFAULT_DB}"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """explicit > ``MLFLOW_TRACKING_URI`` > embedded SQLite default (created on demand)."""
    if explicit:
        return explicit
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return default_tracking_uri()


def default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Explicit artifact folder for experiments of a local SQLite store; None for servers.

    A tracking server owns its artifact root (``--default-artifact-root``); for a local
    ``sqlite:///.../mlflow.db`` the artifacts go next to the database, in ``mlartifacts/``.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///"):])
    folder = db.parent / DEFAULT_ARTIFACTS / experiment
    folder.mkdir(parents=True, exist_ok=True)
    return folder.resolve().as_uri()


# MLflow 3's UI opens an experiment in its model-training view only with this tag; without
# it, the GenAI view (traces, prompts), which shows none of a training's runs or metrics.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def get_or_create_experiment(tracking_uri: str, name: str) -> str:
    """Experiment id for ``name``, created with an explicit artifact location if new.

    New and existing experiments get ``mlflow.experimentKind``; an existing one keeps a kind
    that someone chose, and loses a kind the UI only guessed (``*_inferred``,
    ``no_inferred_type``).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        _ensure_kind(client, exp)
        return exp.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=default_artifact_location(tracking_uri, name),
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
    except Exception:  # created concurrently by another process (e.g. parallel trials)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        _ensure_kind(client, exp)
        return exp.experiment_id


def _ensure_kind(client, exp) -> None:
    kind = (exp.tags or {}).get(EXPERIMENT_KIND_TAG)
    if kind is None or kind.endswith("_inferred") or kind == "no_inferred_type":
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def experiment_views(tracking_uri: str, base: str, limit: int = 10) -> list[tuple[str, str]]:
    """(name, address) of the store's model-training experiments, newest first: ``base``
    (the UI's root) + the runs table in the model-training view."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.links import experiment_link

    exps = MlflowClient(tracking_uri).search_experiments(
        filter_string=f"tags.`{EXPERIMENT_KIND_TAG}` = '{EXPERIMENT_KIND}'",
        max_results=limit, order_by=["last_update_time DESC"])
    return [(e.name, base + experiment_link(e.experiment_id)) for e in exps]


def find_run(tracking_uri: str, experiment_id: str, tags: Mapping[str, str]) -> str | None:
    """Newest run whose tags match all of ``tags`` (used to continue a resumed training)."""
    from mlflow.tracking import MlflowClient

    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = MlflowClient(tracking_uri).search_runs(
        [experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def run_status(tracking_uri: str, run_id: str) -> str | None:
    """The run's status (``RUNNING``, ``FINISHED``, ...), None when the store lacks it."""
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri).get_run(run_id).info.status
    except Exception:  # noqa: BLE001 - deleted, another store: not there
        return None


def create_run(
    tracking_uri: str,
    experiment: str,
    *,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    resume_tags: Mapping[str, str] | None = None,
) -> str:
    """Create (or, when ``resume_tags`` match an existing run, reopen) a run; returns its id.

    With ``parent_run_id`` the run is nested: MLflow shows it under the parent only through
    the ``mlflow.parentRunId`` tag. A new run gets its description
    (:func:`pipelines.tracking.notes.describe`); a reopened one keeps the one it has.
    """
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.notes import NOTE_TAG, with_note

    client = MlflowClient(tracking_uri)
    exp_id = get_or_create_experiment(tracking_uri, experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run_id = find_run(tracking_uri, exp_id, resume_tags) if resume_tags else None
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        for k, v in all_tags.items():
            if k != NOTE_TAG:
                client.set_tag(run_id, k, v)
        return run_id
    all_tags = with_note(all_tags, exp_id)
    return client.create_run(exp_id, tags=all_tags, run_name=run_name).info.run_id


class RunLogger:
    """Logs to one existing MLflow run; warns and continues when the server is gone.

    Every public method returns normally whatever MLflow does. After a failure, calls are
    skipped for ``cooldown_s`` seconds, then tried again (a server that comes back gets the
    later metrics). ``ok`` tells whether the last attempt succeeded, ``failures`` counts
    failed attempts. ``fast_fail`` (remote servers only) runs each call, except model
    uploads, under the short HTTP budget.
    """

    def __init__(self, run_id: str, tracking_uri: str, *, cooldown_s: float = 30.0,
                 fast_fail: bool = True):
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.cooldown_s = cooldown_s
        self.fast_fail = fast_fail and not tracking_uri.startswith(("sqlite:", "file:"))
        self.ok = True
        self.failures = 0
        self._down_until = 0.0

    @property
    def available(self) -> bool:
        """False while the circuit is open (calls are skipped after a recent failure)."""
        return time.monotonic() >= self._down_until

    def _call(self, what: str, fn, *args, short_budget: bool = True, **kwargs) -> Any:
        if not self.available:
            return None
        budget = (_short_http_budget() if self.fast_fail and short_budget
                  else contextlib.nullcontext())
        try:
            with budget:
                out = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            self.failures += 1
            if self.ok:
                warnings.warn(
                    f"MLflow tracking at {self.tracking_uri} failed ({what}: "
                    f"{type(err).__name__}: {str(err)[:200]}); training continues, "
                    f"retrying in {self.cooldown_s:.0f}s",
                    RuntimeWarning, stacklevel=3,
                )
            self.ok = False
            self._down_until = time.monotonic() + self.cooldown_s
            return None
        if not self.ok:
            log.warning("MLflow tracking at %s is back", self.tracking_uri)
        self.ok = True
        return out

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items()
                 if v is not None]
        if batch:
            self._call("log_metrics", self.client.log_batch, self.run_id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params that the run does not hold yet.

        MLflow params are immutable, and a resumed run (same run, reopened) may come with a
        changed config (more steps, another tracking URI): re-logging a changed value would
        be rejected as a whole batch, which must not read as a server outage. Changed keys
        keep their first value; their names go to the ``step.params_changed_on_resume`` tag
        and the resolved config artifact of the resume holds the new values.
        """
        from mlflow.entities import Param

        run = self._call("get_run", self.client.get_run, self.run_id)
        if run is None:
            return
        existing = run.data.params
        wanted = {k: _param_str(v) for k, v in params.items()}
        changed = sorted(k for k, v in wanted.items() if k in existing and existing[k] != v)
        items = [Param(k, v) for k, v in wanted.items() if k not in existing]
        # MLflow caps a batch at 100 params.
        for i in range(0, len(items), 100):
            self._call("log_params", self.client.log_batch, self.run_id, params=items[i:i + 100])
        if changed:
            log.warning("run %s resumed with changed params (MLflow keeps the first values): %s",
                        self.run_id, ", ".join(changed))
            self.set_tags({"step.params_changed_on_resume": ",".join(changed)[:5000]})

    def tags(self) -> dict[str, str]:
        """The run's tags ({} when MLflow cannot be reached)."""
        run = self._call("get_run", self.client.get_run, self.run_id)
        return dict(run.data.tags) if run is not None else {}

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        if items:
            self._call("set_tags", self.client.log_batch, self.run_id, tags=items)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log_text", self.client.log_text, self.run_id, text, artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._call("log_dict", self.client.log_dict, self.run_id, data, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", self.client.log_artifact, self.run_id, str(path),
                   artifact_path)

    def log_datasets(self, datasets: Mapping[str, str | None]) -> None:
        """``{context: step prep directory}`` as the run's dataset inputs (see
        :mod:`pipelines.tracking.datasets`); ``training`` reads the training split."""
        from pipelines.tracking.datasets import dataset_inputs

        try:
            inputs = dataset_inputs({k: v for k, v in datasets.items() if v})
        except Exception as err:  # noqa: BLE001 - a description must not stop a training
            # (and is no tracking outage: the circuit breaker stays closed)
            warnings.warn(f"dataset inputs of run {self.run_id} not logged: "
                          f"{type(err).__name__}: {str(err)[:300]}", RuntimeWarning,
                          stacklevel=2)
            return
        if inputs:
            self._call("log_inputs", self.client.log_inputs, self.run_id, datasets=inputs)

    def log_model(self, model, name: str = "model", **kwargs) -> str | None:
        """``mlflow.pytorch.log_model`` into this run; returns the model URI or None.

        Pickle format: MLflow 3's default ``pt2`` export needs a traceable model, and STEP's
        data-dependent token counts are not. Requirements are pinned explicitly: MLflow's
        inference of them starts a subprocess that imports the model (seconds to minutes).
        """
        kwargs.setdefault("serialization_format", "pickle")
        kwargs.setdefault("pip_requirements", model_requirements())

        def _log() -> str:
            import mlflow
            import mlflow.pytorch

            with global_tracking_uri(self.tracking_uri), \
                    mlflow.start_run(run_id=self.run_id, nested=True):
                info = mlflow.pytorch.log_model(model, name=name, **kwargs)
            return info.model_uri

        return self._call("log_model", _log, short_budget=False)

    def end(self, status: str = "FINISHED") -> None:
        self._call("end", self.client.set_terminated, self.run_id, status)


@contextlib.contextmanager
def global_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``mlflow.start_run``, ``mlflow.register_model``) at
    ``tracking_uri`` for the block, then leave MLflow exactly as it was: only the fluent API
    knows how to log and register MLflow 3's logged models.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into ``os.environ``,
    and ``mlflow.get_tracking_uri()`` returns a default (``sqlite:///mlflow.db``) when none
    was set; restoring that default would leak it to every later command and subprocess.
    So the module's own unset state (``None``) and the environment are restored as found.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_uri, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)  # None: unset, as it was
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def model_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("step-seg", "torch", "torchvision", "timm"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return reqs


def _param_str(value: Any) -> str:
    text = "None" if value is None else str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
