"""``step train policy|step --config FILE [--set key=value ...] [--json PATH]``.

The stage comes from the command; a config whose ``stage`` says otherwise is an error.
A rerun with the same ``name`` and ``storage.storage_path`` resumes from the run's latest
checkpoint (and continues the same MLflow run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="training config (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config field (repeatable), "
                        "e.g. --set data.train=runs/shards/train --set optim.lr=1e-4")
    parser.add_argument("--json", metavar="PATH",
                        help="write run_id, tracking_uri, checkpoint and metrics as JSON")
    parser.add_argument("--parent-run-id", default=None,
                        help="nest the MLflow run under this run (mlflow.parentRunId)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from pipelines.common.settings import ConfigError, dump_config
    from pipelines.train.config import load_train_config

    stage = args.command_path[-1]
    try:
        cfg = load_train_config(args.config, args.overrides, stage=stage)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        cfg.require_data()
    except (ConfigError, FileNotFoundError) as err:
        print(f"step train {stage}: {err}", file=sys.stderr)
        return 2

    from pipelines.train.trainer import fit

    result = fit(cfg, parent_run_id=args.parent_run_id)
    summary = {"run_id": result.run_id, "tracking_uri": result.tracking_uri,
               "checkpoint": result.checkpoint, "model_uri": result.model_uri,
               "stage": result.stage, "ray_run_name": result.ray_run_name,
               "storage_path": result.storage_path, "metrics": result.metrics}
    headline = {k: result.metrics.get(k) for k in ("miou", "gflops", "tokens_mean",
                                                    "halted_fraction", "policy_bacc")
                if result.metrics.get(k) is not None}
    print(f"step train {stage}: done at step {result.metrics.get('step')}; "
          + ", ".join(f"{k}={v:.4g}" for k, v in headline.items()))
    print(f"  checkpoint: {result.checkpoint}")
    print(f"  MLflow run: {result.run_id} at {result.tracking_uri}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    return 0
