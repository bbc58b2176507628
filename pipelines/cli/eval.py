"""``step eval --checkpoint URI --data URI [--thresholds ...] [--json PATH]``.

Evaluates a checkpoint on a ``step prep`` shard directory: mIoU, per-class IoU, pixel
accuracy, GFLOPs (split), tokens per block, halted fractions, per-class halting, latency.
Inference settings (``--thresholds`` for the exits, ``--merge-thresholds`` or
``--budget`` for the policy, ...) are applied with ``model.set_inference`` on the fixed
checkpoint, as Ray Tune does. The result is logged as one MLflow run (params, metrics and
``eval.json``) unless ``--no-mlflow``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None


def _levels(text: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for item in text.replace(",", " ").split():
        level, sep, value = item.partition("=")
        try:
            out[int(level)] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected LEVEL=VALUE pairs like 2=0.5,4=0.6, got {item!r}") from None
        if not sep:
            raise argparse.ArgumentTypeError(f"expected LEVEL=VALUE, got {item!r}")
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="URI",
                        help="checkpoint directory (local or s3://), or a Ray run directory "
                        "(its latest checkpoint)")
    parser.add_argument("--data", required=True, metavar="URI", help="shard directory (step prep)")
    parser.add_argument("--thresholds", type=_floats, default=None, metavar="T[,T...]",
                        help="exit confidence thresholds, one per exit or one for all")
    parser.add_argument("--merge-thresholds", type=_levels, default=None, metavar="S=T,...",
                        help="policy thresholds per level, e.g. 2=0.5,4=0.6,8=0.7,16=0.8")
    parser.add_argument("--budget", type=float, default=None,
                        help="fixed token budget (fraction of the grid) instead of thresholds")
    parser.add_argument("--top-k", type=int, default=None, help="tokens kept active per class")
    parser.add_argument("--exit-policy", choices=["confidence", "random", "uniform"], default=None)
    parser.add_argument("--policy-mode", choices=["none", "oracle", "threshold", "budget"],
                        default=None)
    parser.add_argument("--no-halting", action="store_true", help="exits predict but never halt")
    parser.add_argument("--mode", choices=["whole", "slide"], default="whole")
    parser.add_argument("--crop-size", type=int, default=None, help="slide window (pixels)")
    parser.add_argument("--stride", type=int, default=None, help="slide stride (pixels)")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--latency-samples", type=int, default=3,
                        help="batches timed without FLOP counting (0: no latency)")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--experiment", default="step-seg")
    parser.add_argument("--parent-run-id", default=None)
    parser.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    parser.add_argument("--json", metavar="PATH", help="write the result as JSON")


def inference_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if args.thresholds is not None:
        kw["exit_thresholds"] = args.thresholds
    if args.merge_thresholds is not None:
        kw["merge_thresholds"] = args.merge_thresholds
    if args.budget is not None:
        kw["budget"] = args.budget
    if args.top_k is not None:
        kw["top_k"] = args.top_k
    if args.exit_policy is not None:
        kw["exit_policy"] = args.exit_policy
    if args.policy_mode is not None:
        kw["policy_mode"] = args.policy_mode
    if args.no_halting:
        kw["halting"] = False
    return kw


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from pipelines.evaluate.evaluator import evaluate_checkpoint
    from pipelines.train.stages import resolve_checkpoint_dir

    inference = inference_kwargs(args)
    try:
        checkpoint = resolve_checkpoint_dir(args.checkpoint)
        result = evaluate_checkpoint(
            checkpoint, args.data, inference=inference, max_samples=args.max_samples,
            device=args.device, mode=args.mode, crop_size=args.crop_size, stride=args.stride,
            latency_samples=args.latency_samples,
        )
    except (FileNotFoundError, ValueError, ValidationError) as err:
        print(f"step eval: {err}", file=sys.stderr)
        return 2
    full = result.to_dict()
    run_id = tracking_uri = None
    if not args.no_mlflow:
        run_id, tracking_uri = _log(args, checkpoint, inference, result)
    out = {"run_id": run_id, "tracking_uri": tracking_uri, "checkpoint": checkpoint,
           "data": args.data, "inference": inference, "metrics": result.headline(),
           "result": full}
    m = out["metrics"]
    print(f"step eval: {result.num_images} images, mIoU {_f(m['miou'])}, "
          f"GFLOPs {_f(m['gflops'])}, tokens {_f(m['tokens_mean'])}/{_f(m['tokens_in'])}, "
          f"halted {_f(m['halted_fraction'])}, latency {_f(m['latency_ms'])} ms")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _log(args, checkpoint: str, inference: dict, result) -> tuple[str, str]:
    from pipelines.tracking.runs import RunLogger, create_run, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    run_id = create_run(tracking_uri, args.experiment, run_name="eval",
                        tags={"step.kind": "eval", "step.checkpoint": checkpoint},
                        parent_run_id=args.parent_run_id)
    tracker = RunLogger(run_id, tracking_uri)
    tracker.log_params({"checkpoint": checkpoint, "data": args.data, "mode": args.mode,
                        **{f"inference.{k}": v for k, v in inference.items()}})
    tracker.log_metrics({k: v for k, v in result.headline().items() if v is not None})
    tracker.log_dict(result.to_dict(), "eval.json")
    tracker.end("FINISHED")
    return run_id, tracking_uri
