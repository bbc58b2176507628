"""``step eval --checkpoint URI --data URI [--thresholds ...] [--json PATH]``.

Evaluates a checkpoint on a ``step prep`` shard directory: mIoU, per-class IoU, pixel
accuracy, GFLOPs (split), tokens per block, halted fractions, per-class halting, latency.
Settings: :class:`pipelines.evaluate.settings.EvalSettings` (``--config``, ``--set``,
flags). Inference settings (``inference.*``: ``--thresholds`` for the exits,
``--merge-thresholds`` or ``--budget`` for the policy, ...) change the fixed checkpoint's
own with ``model.set_inference``, as Ray Tune does. The result is logged as
one MLflow run (params, metrics and ``eval.json``) unless ``--no-mlflow``. Policy mode
``oracle`` (tokens chosen from the labels) is refused unless ``--allow-oracle``; its
results are then marked ``uses_labels`` / ``upper_bound`` (JSON, MLflow tags, output).
"""

from __future__ import annotations

from pipelines.cli.command import (
    INFERENCE_ALIASES,
    MLFLOW_ALIASES,
    Command,
    Invocation,
    Result,
)
from pipelines.evaluate.settings import EvalSettings

ALIASES = (*INFERENCE_ALIASES, *MLFLOW_ALIASES)


def evaluate(inv: Invocation) -> Result:
    from pipelines.common.checkpoint import resolve_checkpoint_dir
    from pipelines.common.oracle import ORACLE_NOTE, refuse_oracle, uses_oracle
    from pipelines.evaluate.evaluator import evaluate_checkpoint

    s: EvalSettings = inv.settings
    inference = s.inference.given()
    checkpoint = resolve_checkpoint_dir(s.checkpoint)
    oracle = uses_oracle(checkpoint, inference)
    if oracle and not s.allow_oracle:
        refuse_oracle("step eval")
    result = evaluate_checkpoint(
        checkpoint, s.data, inference=inference, max_samples=s.max_samples,
        device=s.device, mode=s.mode, crop_size=s.crop_size, stride=s.stride,
        latency_samples=s.latency_samples,
    )
    full = result.to_dict()
    run_id = tracking_uri = None
    if s.mlflow.enabled:
        run_id, tracking_uri = _log(s, checkpoint, inference, result, oracle)
    out = {"run_id": run_id, "tracking_uri": tracking_uri, "checkpoint": checkpoint,
           "data": s.data, "inference": inference, "metrics": result.headline(),
           "result": full, "uses_labels": oracle, "upper_bound": oracle}
    m = out["metrics"]
    if oracle:
        print(f"step eval: {ORACLE_NOTE}; these figures are not a model's result")
    print(f"step eval: {result.num_images} images, mIoU {_f(m['miou'])}, "
          f"GFLOPs {_f(m['gflops'])}, tokens {_f(m['tokens_mean'])}/{_f(m['tokens_in'])}, "
          f"halted {_f(m['halted_fraction'])}, latency {_f(m['latency_ms'])} ms")
    return Result(out)


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _log(s: EvalSettings, checkpoint: str, inference: dict, result,
         oracle: bool) -> tuple[str, str]:
    from pipelines.common.oracle import ORACLE_TAGS
    from pipelines.tracking.runs import RunLogger, create_run, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(s.mlflow.tracking_uri)
    tags = {"step.kind": "eval", "step.checkpoint": checkpoint,
            **(ORACLE_TAGS if oracle else {})}
    name = "eval (oracle: upper bound)" if oracle else "eval"
    run_id = create_run(tracking_uri, s.mlflow.experiment, run_name=name, tags=tags,
                        parent_run_id=s.mlflow.parent_run_id)
    tracker = RunLogger(run_id, tracking_uri)
    tracker.log_params({"checkpoint": checkpoint, "data": s.data, "mode": s.mode,
                        **{f"inference.{k}": v for k, v in inference.items()}})
    tracker.log_metrics({k: v for k, v in result.headline().items() if v is not None})
    tracker.log_dict(result.to_dict(), "eval.json")
    tracker.log_datasets({"evaluation": s.data})
    tracker.end("FINISHED")
    return run_id, tracking_uri


COMMAND = Command(EvalSettings, evaluate, aliases=ALIASES,
                  config_help="eval settings (YAML: checkpoint, data, inference, ...)")
configure = COMMAND.configure
run = COMMAND.run
