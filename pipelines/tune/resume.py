"""A search that survives its driver's death: one Ray Tune experiment per search, resumed.

``step tune`` and the pipeline's ``tune`` step run the search in their own process (the
Tune driver). When that process dies (SIGKILL, a lost node, Ctrl-C), the next run of the
same search resumes the Tune experiment instead of starting again:

* **The same search, the same experiment.** The experiment's name is the search's name and
  a digest of what decides its trials (:func:`experiment_name`): the settings that shape
  them, the space, the checkpoint's files and the validation data's manifest; not the
  MLflow run id, which a rerun does not share.
* **Resume, or start afresh.** The experiment folder records the MLflow run of the search
  that owns it (``step_search.json``). A later run with the same name restores it
  (``Tuner.restore``: finished trials kept, unfinished and errored ones run again) unless
  that run is FINISHED: then the search was complete and recorded, and a rerun is a new
  search in a fresh folder.
* **Snapshots after every step.** Tune saves its experiment state (trials, searcher,
  callbacks) at most every 10 s by default, so a crash could lose trials that had
  finished; ``TUNE_GLOBAL_CHECKPOINT_S=0`` makes it save after every step of its loop
  (a few small files; the trials take seconds to minutes each), unless the user set it.
* **The run's own callbacks.** Tune restores the ``RunConfig`` it pickled when the search
  started, callbacks included, whose MLflow parent is the dead run. Ray 2.60 has no public
  way to give a restored Tuner new callbacks; ``Tuner._local_tuner.get_run_config()`` (the
  object Tune then runs with) gets this run's. The callbacks' saved state then moves the
  finished trials' MLflow runs under this run (:mod:`pipelines.tracking.trials`).
* **Determinism.** Optuna suggests in batches of ``max_concurrent`` trials from the same
  completed history (``ConcurrencyLimiter(batch=True)``, see ``search._searcher``), so the
  trials, and the choice, do not depend on which trial of a batch finished first, nor on
  where a crash cut the search.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RECORD = "step_search.json"
# settings that do not change which trials run or what they measure
NOT_IDENTITY = {"name", "checkpoint", "data", "tracking_uri", "experiment", "register_name",
                "storage_path", "confirm_top", "confirm_rounds", "allow_oracle"}


def _content(uri: str, names: tuple[str, ...]) -> dict[str, str]:
    """sha256 of the files ``names`` under ``uri`` (local or ``s3://``) that exist."""
    from data_prep import storage
    from data_prep.verify import file_sha256

    out = {}
    for name in names:
        path = storage.join(uri, name)
        if storage.exists(path):
            out[name] = file_sha256(path)
    return out


def experiment_name(settings, space, checkpoint: str, data: str) -> str:
    """``<settings.name>-<12 hex digits>``: equal for the same search, whoever runs it."""
    from pipelines.common.checkpoint import CONFIG_FILE, MODEL_FILE

    identity = {
        "settings": settings.model_dump(mode="json", exclude=NOT_IDENTITY),
        "space": space.model_dump(mode="json"),
        "checkpoint": _content(checkpoint, (MODEL_FILE, CONFIG_FILE)),
        "data": _content(data, ("manifest.parquet",)) or {"uri": data},
    }
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return f"{settings.name}-{hashlib.sha256(blob).hexdigest()[:12]}"


def _read_record(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def _owner_finished(path: Path, tracking_uri: str) -> bool:
    """Whether the MLflow run recorded in the experiment folder ended FINISHED."""
    from pipelines.tracking.runs import run_status

    run_id = _read_record(path).get("run_id")
    # no record, or a run the store does not have: nothing says the search was complete
    return bool(run_id) and run_status(tracking_uri, run_id) == "FINISHED"


def open_tuner(trainable, *, param_space: dict[str, Any], tune_config, run_config,
               run_id: str, tracking_uri: str):
    """A Tuner for the experiment ``run_config.storage_path / run_config.name``: the one a
    dead run left, restored, or a new one; see the module docstring."""
    from ray import tune

    path = Path(run_config.storage_path) / run_config.name
    if tune.Tuner.can_restore(str(path)) and not _owner_finished(path, tracking_uri):
        try:
            tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True,
                                       resume_errored=True, param_space=param_space)
        except Exception as err:  # noqa: BLE001 - a damaged state: search afresh
            print(f"tune: cannot resume the search in {path} ({type(err).__name__}: "
                  f"{err}); starting it again", flush=True)
        else:
            from pipelines.common.stale_ray import stop_dead_session

            tuner._local_tuner.get_run_config().callbacks = run_config.callbacks
            stop_dead_session(_read_record(path).get("driver"))  # what the dead one left
            _record(path, run_id)
            print(f"tune: resuming the search in {path} (its finished trials are kept)",
                  flush=True)
            return tuner
    if path.exists():
        shutil.rmtree(path)  # a finished search's (its record is in MLflow) or a damaged one
    tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                       run_config=run_config)
    _record(path, run_id)
    return tuner


def _record(path: Path, run_id: str) -> None:
    from pipelines.common.stale_ray import driver_record

    path.mkdir(parents=True, exist_ok=True)
    (path / RECORD).write_text(json.dumps({"run_id": run_id, "driver": driver_record()})
                               + "\n")


@contextlib.contextmanager
def snapshots_every_step() -> Iterator[None]:
    """``TUNE_GLOBAL_CHECKPOINT_S=0`` for the block (unless set): Tune saves its experiment
    state after every step, so a crash loses no finished trial."""
    key = "TUNE_GLOBAL_CHECKPOINT_S"
    added = key not in os.environ
    if added:
        os.environ[key] = "0"
    try:
        yield
    finally:
        if added:
            os.environ.pop(key, None)
