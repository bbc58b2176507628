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

VARIANTS = ("plain", "dcts", "exits", "step")


def variant_inference(variant: str, op: dict[str, Any]) -> dict[str, Any]:
    """``set_inference`` kwargs of a variant from the operating point's kwargs ``op``
    (which holds the learned ``policy_mode``)."""
    share = variant in ("dcts", "step")
    halt = variant in ("exits", "step")
    kw = dict(op)
    if not share:
        kw = {k: v for k, v in kw.items() if k not in ("merge_thresholds", "budget")}
        kw["policy_mode"] = "none"
    kw["halting"] = halt
    kw["exit_policy"] = "confidence"
    return kw


def run_tradeoff(model, loader_fn: Callable[[], Iterable], *, num_classes: int,
                 op: dict[str, Any], device: str, max_samples: int | None,
                 class_names: list[str] | None = None) -> list[dict[str, Any]]:
    from pipelines.evaluate.evaluator import evaluate_model

    rows = []
    for variant in VARIANTS:
        kw = variant_inference(variant, op)
        model.set_inference(**kw)
        r = evaluate_model(model, loader_fn(), num_classes=num_classes, device=device,
                           max_samples=max_samples, count_flops=True, latency_samples=0,
                           class_names=class_names, progress=False)
        rows.append({"variant": variant, "miou": r.miou, "gflops": r.gflops,
                     "gflops_policy": r.gflops_split.get("policy"),
                     "tokens_mean": r.tokens_mean, "tokens_in": r.tokens_in,
                     "halted_fraction": r.halted_fraction,
                     "inference": {k: v for k, v in kw.items()}})
    return rows
