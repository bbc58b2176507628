"""The model registry: the tuned model, registered with the thresholds the search chose."""

from __future__ import annotations

import json
from typing import Any

from pipelines.tracking.runs import RunLogger, global_tracking_uri


def register_tuned_model(tracking_uri: str, run_id: str, checkpoint: str,
                         inference: dict[str, Any], best: dict[str, Any], *,
                         name: str, max_drop: float, drop_mode: str,
                         baseline_miou: float) -> dict[str, Any] | None:
    """Log the checkpoint's model with the chosen thresholds set into run ``run_id`` and
    register it as a new version of ``name``; None when MLflow could not take it.

    The version carries the thresholds and the measured mIoU / GFLOPs as tags, so the
    registry alone says what a version costs and how accurate it is.
    """
    import mlflow

    from pipelines.common.checkpoint import load_model

    model, _ = load_model(checkpoint)
    model.set_inference(**inference)
    tags = {
        "inference": json.dumps(inference),
        # full precision: the registry is where a deployment reads the measured figures
        "miou": repr(float(best["miou"])),
        "gflops": repr(float(best["gflops"])),
        "miou_drop": repr(float(best["drop"])),
        "max_drop": repr(float(max_drop)),
        "drop_mode": drop_mode,
        "baseline_miou": repr(float(baseline_miou)),
        "checkpoint": checkpoint,
        "tune_run_id": run_id,
    }
    for k, v in inference.items():
        tags[k] = json.dumps(v) if not isinstance(v, str) else v
    tracker = RunLogger(run_id, tracking_uri)
    model_uri = tracker.log_model(model, name="tuned_model")
    if model_uri is None:
        return None
    with global_tracking_uri(tracking_uri):
        version = mlflow.register_model(model_uri, name, tags=tags)
    tracker.set_tags({"step.registered_model": f"{name}/{version.version}"})
    return {"name": name, "version": str(version.version), "model_uri": model_uri}
