"""The training driver: one ``TorchTrainer`` per training, one MLflow run per training.

``fit(cfg)`` runs on the driver (a laptop, the head node, a Ray job or a Tune trial):

1. resolves the tracking URI and opens the MLflow run (nested under ``parent_run_id``
   when given). A rerun with the same ``name`` and storage path reopens the same MLflow
   run, as Ray reopens the same run directory;
2. builds ``TorchTrainer(train_loop_per_worker, ...)`` with a deterministic run name
   (``cfg.name``), ``FailureConfig(max_failures)``, ``CheckpointConfig(num_to_keep)`` and
   ``ScalingConfig`` from the config. Ray Train V2 restores from the latest checkpoint in
   ``<storage_path>/<name>`` on its own, both after a worker-group crash and when the same
   run is started again;
3. after training, logs the final model with ``mlflow.pytorch`` and closes the run.

A training that already finished (its final checkpoint, ``checkpoint_<last step>``, is in
the storage path) is not started again: ``fit`` returns the result recorded in that
checkpoint's ``meta.json``, and logs the model only if its MLflow run has none yet (the
tracking server was down when it ended). Workflows and Tune can therefore rerun a pipeline
without paying for, or duplicating, the trainings that are done.

Every MLflow call of the driver goes through :class:`~pipelines.tracking.runs.RunLogger`
once the run exists, so a server that goes away mid-run costs a warning, not the training.

The per-worker function lives in :mod:`pipelines.train.loop`, inside the installed
package: Ray pickles it by reference, and a function the workers cannot import makes Ray
keep their CPUs and hang the next run (measured with Ray 2.60).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from data_prep.storage import capture_s3_env, exists, read_bytes
from pipelines.common import storage
from pipelines.common.cluster import init_ray
from pipelines.common.console import verbose
from pipelines.common.progress import PROGRESS_EVERY_S
from pipelines.common.settings import dump_config, flatten
from pipelines.tracking.runs import (
    RunLogger,
    create_run,
    find_run,
    get_or_create_experiment,
    resolve_tracking_uri,
)
from pipelines.train.config import TrainConfig

log = logging.getLogger(__name__)

# The figures every consumer of a training result can rely on (``--json``, Tune, workflow).
HEADLINE = ("miou", "gflops", "tokens_mean", "halted_fraction")
# Run tag with the logged model's URI: a rerun of a finished training finds it there.
MODEL_URI_TAG = "step.model_uri"


@dataclass
class TrainResult:
    run_id: str
    tracking_uri: str
    checkpoint: str
    metrics: dict[str, Any] = field(default_factory=dict)
    stage: str = "step"
    ray_run_name: str = ""
    storage_path: str = ""
    model_uri: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_trainer(cfg: TrainConfig, train_loop_config: dict[str, Any]):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train.loop import train_loop_per_worker

    storage_path, filesystem = storage.ray_storage(cfg.storage.storage_path)
    scaling = ScalingConfig(
        num_workers=cfg.scaling.num_workers,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker=cfg.scaling.resources_per_worker,
    )
    run_config = RunConfig(
        name=cfg.name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last),
        # the controller's and workers' INFO lines stay in Ray's log files, off the
        # terminal unless --verbose (pipelines/common/console.py)
        logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=train_loop_config,
        scaling_config=scaling,
        run_config=run_config,
        # gloo reduces CPU tensors, NCCL CUDA ones: pick by device, not by default.
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
    )


def fit(cfg: TrainConfig, *, parent_run_id: str | None = None) -> TrainResult:
    """Train ``cfg`` on Ray Train; returns ids, the final checkpoint URI and final metrics."""
    if cfg.stage is None:
        raise ValueError("cfg.stage must be 'policy' or 'step' (the command sets it)")
    cfg.require_data()
    # Absolute local paths: workers run in their own directories.
    cfg = cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"train": storage.absolute(cfg.data.train),
                                            "val": storage.absolute(cfg.data.val)}),
        "storage": cfg.storage.model_copy(
            update={"storage_path": storage.absolute(cfg.storage.storage_path)}),
        "policy_checkpoint": storage.absolute(cfg.policy_checkpoint)
        if cfg.policy_checkpoint else None,
    })
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    done = completed_checkpoint(cfg)
    if done is not None:
        return _completed_result(cfg, done, tracking_uri, parent_run_id)

    run_id = create_run(
        tracking_uri, cfg.mlflow.experiment, run_name=cfg.name,
        tags=_run_tags(cfg), parent_run_id=parent_run_id, resume_tags=_link_tags(cfg),
    )
    tracker = RunLogger(run_id, tracking_uri)
    tracker.log_params(flatten(cfg))
    tracker.log_text(dump_config(cfg), "config.yaml")
    tracker.log_datasets({"training": cfg.data.train, "validation": cfg.data.val})

    from pipelines.train.loop import injected_failure_step

    init_ray()
    trainer = build_trainer(cfg, {
        "cfg": cfg.model_dump(mode="json"), "run_id": run_id, "tracking_uri": tracking_uri,
        # Values travel in the task arguments (S3Env hides them in repr), not in a
        # runtime_env that the dashboard shows.
        "s3_env": capture_s3_env(),
        "fail_at_step": injected_failure_step(),  # tests only
        # a progress line every log_every steps under --verbose, else at a readable pace
        "progress_every_s": 0.0 if verbose() else PROGRESS_EVERY_S,
    })
    try:
        result = trainer.fit()
    except BaseException:
        tracker.end("FAILED")
        raise
    if result.checkpoint is None:
        tracker.end("FAILED")
        raise RuntimeError(f"training {cfg.name} ended without a checkpoint")
    ckpt = storage.checkpoint_uri(result.checkpoint.path, cfg.storage.storage_path)
    metrics = {k: v for k, v in (result.metrics or {}).items() if not k.startswith("_")}
    model_uri = _close_run(tracker, cfg, ckpt, model_uri=None)
    return _result(cfg, run_id, tracking_uri, ckpt, metrics, model_uri)


def completed_checkpoint(cfg: TrainConfig) -> str | None:
    """``<storage_path>/<name>/checkpoint_<last step>`` if it exists (the training is done).

    Only the last step writes that checkpoint, so it exists only once training finished.
    A config with more steps has another last step, and resumes from its latest checkpoint.
    """
    # torch-importing modules: imported when needed (``pipelines.train.trainer`` is imported by
    # Tune and workflow drivers that may never train).
    from pipelines.common.checkpoint import META_FILE, MODEL_FILE, checkpoint_dir_name
    from pipelines.train.loop import final_step

    last = final_step(cfg, cfg.scaling.num_workers)
    uri = storage.join(cfg.storage.storage_path, cfg.name, checkpoint_dir_name(last))
    if exists(storage.join(uri, MODEL_FILE)) and exists(storage.join(uri, META_FILE)):
        return uri
    return None


def _completed_result(cfg: TrainConfig, ckpt: str, tracking_uri: str,
                      parent_run_id: str | None) -> TrainResult:
    """The result of a finished training, from its final checkpoint, without training."""
    from pipelines.common.checkpoint import META_FILE

    meta = json.loads(read_bytes(storage.join(ckpt, META_FILE)))
    metrics = dict(meta.get("metrics") or {})
    log.warning("training %s is already complete (%s, step %s): returning its result "
                "without training again", cfg.name, ckpt, metrics.get("step"))
    exp_id = get_or_create_experiment(tracking_uri, cfg.mlflow.experiment)
    run_id = find_run(tracking_uri, exp_id, _link_tags(cfg))
    if run_id is None:  # a tracking store that never saw this training: record it there
        run_id = create_run(tracking_uri, cfg.mlflow.experiment, run_name=cfg.name,
                            tags=_run_tags(cfg), parent_run_id=parent_run_id)
        tracker = RunLogger(run_id, tracking_uri)
        tracker.log_params(flatten(cfg))
        tracker.log_text(dump_config(cfg), "config.yaml")
        tracker.log_datasets({"training": cfg.data.train, "validation": cfg.data.val})
        model_uri = None
    else:
        tracker = RunLogger(run_id, tracking_uri)
        model_uri = tracker.tags().get(MODEL_URI_TAG)
    model_uri = _close_run(tracker, cfg, ckpt, model_uri=model_uri)
    return _result(cfg, run_id, tracking_uri, ckpt, metrics, model_uri)


def _link_tags(cfg: TrainConfig) -> dict[str, str]:
    """Tags that tie an MLflow run to its Ray run (and find it again on a rerun)."""
    return {"ray.run_name": cfg.name, "ray.storage_path": cfg.storage.storage_path}


def _run_tags(cfg: TrainConfig) -> dict[str, str]:
    return {**_link_tags(cfg), "step.stage": cfg.stage, "step.kind": f"train-{cfg.stage}"}


def _close_run(tracker: RunLogger, cfg: TrainConfig, ckpt: str, *,
               model_uri: str | None) -> str | None:
    """Tag the checkpoint, log the model unless ``model_uri`` says it is logged, finish."""
    tracker.set_tags({"step.checkpoint": ckpt})
    # ``available`` is False right after a failed call: skip the download and the upload.
    if model_uri is None and cfg.mlflow.log_model and tracker.available:
        from pipelines.common.checkpoint import load_model

        model, model_config = load_model(ckpt)
        model_uri = tracker.log_model(model, name="model", metadata={
            "step_config": model_config, "inference": model.inference.to_dict(),
            "checkpoint": ckpt})
        if model_uri is not None:
            tracker.set_tags({MODEL_URI_TAG: model_uri})
    tracker.end("FINISHED")
    return model_uri


def _result(cfg: TrainConfig, run_id: str, tracking_uri: str, ckpt: str,
            metrics: dict[str, Any], model_uri: str | None) -> TrainResult:
    for key in HEADLINE:
        metrics.setdefault(key, None)
    return TrainResult(
        run_id=run_id, tracking_uri=tracking_uri, checkpoint=ckpt,
        metrics={k: _plain(v) for k, v in metrics.items()}, stage=cfg.stage,
        ray_run_name=cfg.name, storage_path=cfg.storage.storage_path, model_uri=model_uri,
    )


def _plain(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v
