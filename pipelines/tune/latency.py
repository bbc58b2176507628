"""``tune.cost: latency``: a trial's forward latency against the reference's, measured in
the same trial.

A latency measured on a shared machine drifts with the load from minute to minute, so a
trial's milliseconds cannot be compared with a reference timed at the start of the
search. Each trial therefore times the reference (policy ``none``, halting off) and its
own settings on the same model, the same images and in the same process, one after the
other in every repeat (:func:`step_model.bench_parts.time_modes`), and reports the ratio:
the median over repeats of trial / reference, with its spread ((max - min) / median of
the per-repeat ratios). The model is the one ``step predict`` serves (policy batch norms
folded, the autocast rule). Images: the first ``images`` of the searched split (batch 1).
"""

from __future__ import annotations

import statistics
from typing import Any

from pydantic import Field

from pipelines.common.errors import ExpectedFailure
from pipelines.common.settings import StrictModel


class LatencySettings(StrictModel):
    """How a trial measures latency under ``cost: latency``."""

    images: int = Field(4, ge=1, description="images of the searched split timed per trial")
    warmup: int = Field(1, ge=0, description="untimed forwards per mode first")
    repeats: int = Field(5, ge=1, description="timed rounds (reference, trial) per trial")


def latency_figures(checkpoint: str, data: str, reference: Any, trial: Any, *,
                    device: str, settings: LatencySettings | None = None,
                    holdout: dict[str, Any] | None = None) -> dict[str, float]:
    """{"latency_ratio", "latency_spread", "latency_ms", "latency_ms_reference"} of
    ``trial`` against ``reference`` (InferenceConfigs or changes to the checkpoint's own)."""
    import torch

    from pipelines.common.checkpoint import load_model
    from pipelines.common.data import batch_to_device, eval_loader
    from pipelines.common.precision import autocast
    from step_model.bench_parts import stats, time_modes
    from step_model.config import InferenceConfig
    from step_model.fuse import prepare_for_inference

    cfg = settings or LatencySettings()
    model, _ = load_model(checkpoint, device=device)
    prepare_for_inference(model)
    own = model.inference
    modes = {name: own.apply(changes) if not isinstance(changes, InferenceConfig) else changes
             for name, changes in (("reference", reference), ("trial", trial))}
    loader = eval_loader(data, batch_size=1, num_workers=0, rank=0, world_size=1,
                         max_samples=cfg.images, holdout=holdout, part="search")
    batches = [batch_to_device(b[0], b[1], device)[0] for b in loader][:cfg.images]
    if not batches:
        raise ExpectedFailure(f"{data}: no image to time")
    dev = torch.device(device)
    runs = time_modes(model, batches, modes, warmup=cfg.warmup, repeats=cfg.repeats,
                      autocast=lambda: autocast(dev, "auto"))
    return ratio_figures(runs["reference"], runs["trial"]) | {
        "latency_ms_reference": stats(runs["reference"])["median"]}


def ratio_figures(reference_ms: list[float], trial_ms: list[float]) -> dict[str, float]:
    """The per-repeat ratios trial / reference: their median (``latency_ratio``) and
    spread, and the trial's median milliseconds (``latency_ms``)."""
    ratios = [t / r for t, r in zip(trial_ms, reference_ms, strict=True)]
    med = statistics.median(ratios)
    return {"latency_ratio": med, "latency_spread": (max(ratios) - min(ratios)) / med,
            "latency_ms": statistics.median(trial_ms)}
