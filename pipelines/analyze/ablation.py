"""The exit ablation: confidence exits against random and uniform ones, at matched counts.

Per batch the confidence forward decides how many tokens halt at every exit; ``uniform``
and ``random`` then halt exactly those counts at every exit
(``model(images, labels, halt_counts=...)``), so only *which* tokens halt differs. Random
runs one pass over the set per seed, with the draw seeded once per pass (not per forward).
Every forward is FLOP-counted (policy network included); mIoU comes from one confusion
matrix per variant over the whole set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from pipelines.evaluate.metrics import ConfusionMeter
from step_model.config import SCORE_BEFORE_MARGIN, InferenceConfig


class _Meter:
    def __init__(self, num_classes: int, n_exits: int) -> None:
        self.cm = ConfusionMeter(num_classes)
        self.gflops = 0.0
        self.images = 0
        self.tokens = 0.0
        self.halted = torch.zeros(n_exits, dtype=torch.float64)
        self.cells = 0.0
        self.halted_cells = 0.0

    def update(self, out, labels: torch.Tensor, gflops: float) -> None:
        self.cm.update(out.logits.argmax(1), labels)
        self.gflops += gflops
        self.images += labels.shape[0]
        self.tokens += float(out.flow.num_tokens.sum())
        self.halted += out.flow.halted_per_exit.double().sum(0).cpu()
        # tokens are matched, area is not: a halted supertoken covers up to 64 cells
        depth = out.flow.cell_exit_depth
        self.cells += depth.numel()
        self.halted_cells += float((depth < out.flow.tokens_per_block.shape[-1]).sum())

    def result(self, exit_blocks: list[int]) -> dict[str, Any]:
        n = max(self.images, 1)
        names = [f"exit_{b}" for b in exit_blocks]
        miou = self.cm.compute(reduce=False).miou
        return {
            "miou": miou if miou == miou else None,
            "gflops": self.gflops / n,
            "halted_per_exit": {k: float(v) / n for k, v in zip(names, self.halted, strict=True)},
            "halted_fraction_per_exit": {k: float(v) / self.tokens if self.tokens else None
                                         for k, v in zip(names, self.halted, strict=True)},
            "halted_cell_fraction": self.halted_cells / self.cells if self.cells else None,
            "images": self.images,
        }


def counted_forward(model, images, labels, **kwargs):
    """One forward under the FLOP counter: (output, GFLOPs of the whole batch)."""
    from step_model import flop_counter

    with torch.no_grad(), flop_counter(parts_of=model) as fc:
        out = model(images, labels, **kwargs)
    return out, fc.get_total_flops() / 1e9


def set_random_seed(model, seed: int) -> None:
    """Random exits with ``seed``, seeded here once for a whole pass: the model makes a
    fresh generator whenever the exit policy or the seed changes, so passing through
    ``confidence`` first reseeds it even when the seed is the same as the last pass's."""
    model.set_inference(exit_policy="confidence")
    model.set_inference(exit_policy="random", exit_seed=int(seed))


def run_ablation(model, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], *,
                 num_classes: int, inference: InferenceConfig, seeds: list[int],
                 on_confidence: Callable[[Any, torch.Tensor], None] | None = None,
                 ) -> dict[str, Any]:
    """``batches()`` yields (images, labels) on the model's device, the same each call.
    ``on_confidence(out, labels)`` sees every confidence forward (the token flow)."""
    exit_blocks = list(model.exit_blocks)
    if not exit_blocks:
        return {"skipped": "the model has no exits"}
    n_exits = len(exit_blocks)
    conf, uni = _Meter(num_classes, n_exits), _Meter(num_classes, n_exits)
    counts: list[list[torch.Tensor]] = []
    for images, labels in batches():
        model.set_inference(inference, halting=True, exit_policy="confidence")
        out, g = counted_forward(model, images, labels)
        conf.update(out, labels, g)
        if on_confidence is not None:
            on_confidence(out, labels)
        halt = list(out.flow.halted_per_exit.unbind(1))
        counts.append(halt)
        model.set_inference(exit_policy="uniform")
        out, g = counted_forward(model, images, labels, halt_counts=halt)
        uni.update(out, labels, g)
    per_seed = []
    for seed in seeds:
        model.set_inference(inference, halting=True)
        set_random_seed(model, seed)
        rnd = _Meter(num_classes, n_exits)
        for (images, labels), halt in zip(batches(), counts, strict=True):
            out, g = counted_forward(model, images, labels, halt_counts=halt)
            rnd.update(out, labels, g)
        per_seed.append({"seed": int(seed), **rnd.result(exit_blocks)})
    model.set_inference(exit_policy="confidence")
    return {"confidence": conf.result(exit_blocks), "uniform": uni.result(exit_blocks),
            "random": _mean_over_seeds(per_seed)}


def _mean_over_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    if not per_seed:
        return {"miou": None, "gflops": None, "halted_per_exit": {}, "seeds": []}
    mious = [r["miou"] for r in per_seed if r["miou"] is not None]
    mean_miou = _mean(mious)
    std = (sum((m - mean_miou) ** 2 for m in mious) / len(mious)) ** 0.5 if mious else None
    keys = per_seed[0]["halted_per_exit"].keys()
    return {
        "miou": mean_miou,
        "miou_std": std,
        "gflops": sum(r["gflops"] for r in per_seed) / len(per_seed),
        "halted_cell_fraction": _mean([r["halted_cell_fraction"] for r in per_seed]),
        "halted_per_exit": {k: sum(r["halted_per_exit"][k] for r in per_seed) / len(per_seed)
                            for k in keys},
        "seeds": per_seed,
    }


def ablation_sweep(model, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], *,
                   num_classes: int, inference: InferenceConfig, seeds: list[int],
                   thresholds: list[float]) -> list[dict[str, Any]]:
    """:func:`run_ablation` at each shared exit threshold (the sharing of ``inference``):
    one row per threshold, with ``confidence_wins`` (its mIoU above both others')."""
    if not model.exit_blocks:
        return []
    rows = []
    for t in thresholds:
        res = run_ablation(model, batches, num_classes=num_classes,
                           inference=inference.replace(exit_thresholds=float(t)), seeds=seeds)
        rows.append({"exit_threshold": float(t), **res, "confidence_wins": _wins(res)})
    model.set_inference(inference)
    return rows


def _wins(res: dict[str, Any]) -> bool | None:
    mious = [(res.get(k) or {}).get("miou") for k in ("confidence", "random", "uniform")]
    if any(m is None for m in mious):
        return None
    return mious[0] > max(mious[1:])


def confidence_wins(ablation: dict[str, Any], sweep: list[dict[str, Any]]) -> bool | None:
    """Confidence exits score above random and uniform at every measured operating point
    (the analysed one and every sweep threshold); None when nothing was measured."""
    verdicts = [_wins(ablation)] if "confidence" in (ablation or {}) else []
    verdicts += [r["confidence_wins"] for r in sweep]
    verdicts = [v for v in verdicts if v is not None]
    return all(verdicts) if verdicts else None


def ablation_exit_score(analysis: dict[str, Any]) -> str:
    """The exit score behind an analysis' ``confidence`` rows (the exit policy that halts by
    the score, whichever it is): its operating point's, or for a document written before
    it recorded one, the confidence."""
    inference = (analysis.get("operating_point") or {}).get("inference") or {}
    return inference.get("exit_score", SCORE_BEFORE_MARGIN)


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
