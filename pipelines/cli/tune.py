"""``step tune``: search inference thresholds under an mIoU-drop limit (Ray Tune)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="STEP checkpoint dir (local or s3://)")
    parser.add_argument("--data", required=True, help="validation shards (written by `step prep`)")
    parser.add_argument("--space", default="joint",
                        help="search space: a tune_spaces/ name (exits_only, merge_only, joint, "
                        "joint_budget, tiny) or a YAML file")
    parser.add_argument("--max-drop", type=float, required=True,
                        help="largest acceptable mIoU drop, in percent (see --drop-mode)")
    parser.add_argument("--drop-mode", choices=("points", "relative"), default="points",
                        help="points: mIoU points; relative: percent of the reference mIoU")
    parser.add_argument("--num-samples", type=int, default=24, help="trials (not for grid)")
    parser.add_argument("--search", choices=("optuna", "random", "grid"), default="optuna")
    parser.add_argument("--max-concurrent", type=int, default=2, help="trials in parallel")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--gpus-per-trial", type=float, default=0.0)
    parser.add_argument("--max-samples", type=int, default=None,
                        help="validation images per evaluation (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./runs/mlflow.db)")
    parser.add_argument("--experiment", default="step-seg")
    parser.add_argument("--register-name", default="step-seg",
                        help="model registry name for the tuned model ('' = do not register)")
    parser.add_argument("--storage-path", default="runs/ray", help="Ray Tune results dir")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")


def run(args: argparse.Namespace) -> int:
    from pipelines.common.settings import ConfigError, validate
    from pipelines.tracking.runs import resolve_tracking_uri
    from pipelines.tune.search import TrialsFailed, TuneSettings

    try:
        settings = validate(TuneSettings, {
            "checkpoint": args.checkpoint, "data": args.data, "space": args.space,
            "max_drop": args.max_drop, "drop_mode": args.drop_mode, "search": args.search,
            "num_samples": args.num_samples, "max_concurrent": args.max_concurrent,
            "resources_per_trial": {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial},
            "max_samples": args.max_samples, "seed": args.seed,
            "tracking_uri": args.tracking_uri, "experiment": args.experiment,
            "register_name": args.register_name or None, "storage_path": args.storage_path,
        }, "step tune arguments")
        tracking_uri = resolve_tracking_uri(settings.tracking_uri)
        settings = settings.model_copy(update={"tracking_uri": tracking_uri})
        outcome = _search_in_run(settings)
    except ConfigError as err:
        print(f"step tune: error: {err}", file=sys.stderr)
        return 2
    except TrialsFailed as err:  # nothing to choose from; the parent run is FAILED
        print(f"step tune: error: {err}", file=sys.stderr)
        return 1
    doc = outcome.to_json()
    _print_summary(doc)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")
    return 0


def _search_in_run(settings):
    """Own the parent run: FINISHED on success, FAILED on any error (never left RUNNING)."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.runs import create_run
    from pipelines.tune.search import preflight, search

    preflight(settings)  # a bad space or checkpoint fails before any run is created
    run_id = create_run(settings.tracking_uri, settings.experiment, run_name=settings.name,
                        tags={"step.kind": "tune"})
    client = MlflowClient(settings.tracking_uri)
    try:
        outcome = search(settings, run_id=run_id)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return outcome


def _print_summary(doc: dict) -> None:
    b, best = doc["baseline"], doc["best"]
    print(f"reference (unpruned): mIoU {100 * b['miou']:.2f}  GFLOPs {b['gflops']:.3f}")
    print(doc["message"])
    if best is not None:
        print(f"best thresholds: {json.dumps(best['inference'])}")
    if doc.get("registered_model"):
        r = doc["registered_model"]
        print(f"registered model: {r['name']} version {r['version']}")
    print(f"{doc['n_trials']} trials ({doc['failed_trials']} failed), "
          f"{len(doc['pareto'])} on the Pareto front; MLflow run {doc['parent_run_id']} "
          f"at {doc['tracking_uri']}")
