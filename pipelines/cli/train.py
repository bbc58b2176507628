"""``step train policy|step --config FILE [--set key=value ...] [--json PATH]``.

Settings: :class:`pipelines.train.config.TrainConfig`. The stage comes from the command; a
config whose ``stage`` says otherwise is an error. A rerun with the same ``name`` and
``storage.storage_path`` resumes from the run's latest checkpoint (and continues the same
MLflow run).
"""

from __future__ import annotations

from pydantic import Field

from pipelines.cli.command import Command, Invocation, Result
from pipelines.common.settings import StrictModel
from pipelines.train.config import TrainConfig, load_train_config


class TrainOptions(StrictModel):
    parent_run_id: str | None = Field(None, description="nest the MLflow run under this run "
                                      "(mlflow.parentRunId)")


def _load(config: str | None, overrides: list[str], path: tuple[str, ...]) -> TrainConfig:
    return load_train_config(config, overrides, stage=path[-1] if path else None)


def train(inv: Invocation) -> Result:
    cfg: TrainConfig = inv.settings
    cfg.require_data()

    from pipelines.train.trainer import fit

    result = fit(cfg, parent_run_id=inv.options.parent_run_id)
    summary = {"run_id": result.run_id, "tracking_uri": result.tracking_uri,
               "checkpoint": result.checkpoint, "model_uri": result.model_uri,
               "stage": result.stage, "ray_run_name": result.ray_run_name,
               "storage_path": result.storage_path, "metrics": result.metrics}
    headline = {k: result.metrics.get(k) for k in ("miou", "gflops", "tokens_mean",
                                                    "halted_fraction", "policy_bacc")
                if result.metrics.get(k) is not None}
    print(f"{inv.prog}: done at step {result.metrics.get('step')}; "
          + ", ".join(f"{k}={v:.4g}" for k, v in headline.items()))
    print(f"  checkpoint: {result.checkpoint}")
    from pipelines.tracking.links import run_location

    print(f"  MLflow run {result.run_id}: {run_location(result.tracking_uri, result.run_id)}")
    return Result(summary)


COMMAND = Command(TrainConfig, train, options=TrainOptions, load=_load, exclude={"stage"},
                  config_help="training config (YAML), e.g. configs/tiny/step.yaml",
                  json="write run_id, tracking_uri, checkpoint and metrics as JSON "
                  "(a local path or s3://bucket/key)")
configure = COMMAND.configure
run = COMMAND.run
