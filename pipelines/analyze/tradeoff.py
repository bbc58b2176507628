"""The paper's decomposition at one operating point: plain ViT, dCTS only, exits only, STEP.

Every point is measured on the same checkpoint and images with
:func:`pipelines.evaluate.evaluator.evaluate_model` (FLOPs counted on what runs, the policy
network included whenever it selects the tokens):

* ``plain``: policy ``none``, halting off: the unpruned ViT + decoder;
* ``dcts``: the learned policy's sharing at the operating point, halting off;
* ``exits``: no sharing, halting at the operating point's exit thresholds;
* ``step``: both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from step_model.config import InferenceConfig

VARIANTS = ("plain", "dcts", "exits", "step")


def variant_inference(variant: str, op: InferenceConfig) -> InferenceConfig:
    """A variant's settings from the operating point ``op`` (in a learned policy mode)."""
    share = variant in ("dcts", "step")
    return op.replace(policy_mode=None if share else "none",
                      halting=variant in ("exits", "step"), exit_policy="confidence")


def run_tradeoff(model, loader_fn: Callable[[], Iterable], *, num_classes: int,
                 op: InferenceConfig, device: str, max_samples: int | None,
                 class_names: list[str] | None = None) -> list[dict[str, Any]]:
    from pipelines.evaluate.evaluator import EvalOptions, evaluate_model

    rows = []
    for variant in VARIANTS:
        kw = variant_inference(variant, op)
        model.set_inference(kw)
        r = evaluate_model(model, loader_fn(), num_classes=num_classes, device=device,
                           class_names=class_names,
                           options=EvalOptions(max_samples=max_samples, count_flops=True,
                                               latency_samples=0, progress=False))
        rows.append({"variant": variant, "miou": r.miou, "gflops": r.gflops,
                     "gflops_policy": r.gflops_split.get("policy"),
                     "tokens_mean": r.tokens_mean, "tokens_in": r.tokens_in,
                     "halted_fraction": r.halted_fraction,
                     "inference": kw.to_dict()})
    return rows
