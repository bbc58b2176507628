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

The per-worker function lives in :mod:`pipelines.train_loop`, inside the installed
package: Ray pickles it by reference, and a function the workers cannot import makes Ray
keep their CPUs and hang the next run (PLATFORM.md).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines import storage
from pipelines.config import TrainConfig
from pipelines.settings import dump_config, flatten
from pipelines.tracking import RunLogger, create_run, resolve_tracking_uri

log = logging.getLogger(__name__)

# The figures every consumer of a training result can rely on (``--json``, Tune, workflow).
HEADLINE = ("miou", "gflops", "tokens_mean", "halted_fraction")


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


def init_ray() -> None:
    """A local Ray unless ``RAY_ADDRESS`` names a cluster; never attach to a stale one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)


def build_trainer(cfg: TrainConfig, train_loop_config: dict[str, Any]):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train_loop import train_loop_per_worker

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
    link = {"ray.run_name": cfg.name, "ray.storage_path": cfg.storage.storage_path}
    run_id = create_run(
        tracking_uri, cfg.mlflow.experiment, run_name=cfg.name,
        tags={**link, "step.stage": cfg.stage, "step.kind": f"train-{cfg.stage}"},
        parent_run_id=parent_run_id, resume_tags=link,
    )
    # fast_fail=False: the driver may share its process with other MLflow users (Tune, the
    # workflow); the short HTTP retry budget is for the training workers only.
    tracker = RunLogger(run_id, tracking_uri, fast_fail=False)
    tracker.log_params(flatten(cfg))
    tracker.log_text(dump_config(cfg), "config.yaml")

    init_ray()
    trainer = build_trainer(cfg, {
        "cfg": cfg.model_dump(mode="json"), "run_id": run_id, "tracking_uri": tracking_uri,
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
    for key in HEADLINE:
        metrics.setdefault(key, None)
    tracker.set_tags({"step.checkpoint": ckpt})
    model_uri = None
    if cfg.mlflow.log_model:
        from pipelines.checkpoint import load_model

        model, model_config = load_model(ckpt)
        model_uri = tracker.log_model(model, name="model", metadata={"step_config": model_config,
                                                                     "checkpoint": ckpt})
    tracker.end("FINISHED")
    return TrainResult(
        run_id=run_id, tracking_uri=tracking_uri, checkpoint=ckpt,
        metrics={k: _plain(v) for k, v in metrics.items()}, stage=cfg.stage,
        ray_run_name=cfg.name, storage_path=cfg.storage.storage_path, model_uri=model_uri,
    )


def _plain(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v
