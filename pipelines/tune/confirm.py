"""Confirmation: the few cheapest feasible trials, measured again on every searchable image.

Trials are measured on ``max_samples`` images to keep the search cheap, and the cheapest
trial under a limit is, by construction, the one whose drop was most flattered by those
images (the winner's curse). So before choosing, the ``confirm_top`` cheapest trials
feasible under the point rule, plus the ``confirm_top`` cheapest feasible under the
guarded rule, are evaluated again on the whole split the search may see (held-out images
still excluded), together with the unpruned reference (their per-image matrices give new
intervals, at a level corrected for the number of candidates under ``multiplicity:
bonferroni``), and the choice is made over those figures only. A candidate of the point
rule that the cliff screen never reached keeps a NaN ``cliff_step``: the guard does not
choose a point whose neighbours were not measured. Nothing runs when the trials already
saw every searchable image.

When no confirmed candidate passes the guard, the next ``confirm_top`` cheapest per rule
are confirmed too, up to ``confirm_rounds`` rounds in all, and every candidate's interval
is recomputed at the level corrected for all the candidates confirmed so far: a search
whose cheapest few points all fail on the whole split goes on to the next ones instead of
stopping at the first few (the CamVid run of 2026-12-07 confirmed four candidates at 3.3-4.0
GFLOPs, none within the guard; with five rounds, 19 up to 4.96 GFLOPs, all failing its tail
check: docs/camvid.md, "A second run from scratch").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pipelines.tune.guard import as_guard, confirm_confidence, point_key
from pipelines.tune.pareto import (
    Selection,
    annotate,
    cost_order,
    is_feasible,
    rule_drop,
    select,
)
from pipelines.tune.trial import (
    TrialContext,
    drop_interval,
    evaluate_images,
    reference_inference,
    slice_figures,
    trial_inference,
    trial_metrics,
)

SEARCH_FIGURES = ("miou", "drop", "drop_lo", "drop_hi", "gflops", "num_images", "tail_drop",
                  "worst_group_drop")


@dataclass
class Confirmation:
    reference: dict[str, Any]  # the reference evaluation on every searchable image
    trials: list[dict[str, Any]]  # the candidates, full-split figures + search_* figures
    selection: Selection  # the choice over them

    @property
    def images(self) -> int:
        return int(self.reference.get("num_images") or 0)

    def to_json(self) -> dict[str, Any]:
        return {"images": self.images,
                "reference": {k: self.reference.get(k) for k in ("miou", "gflops")},
                "candidates": [{k: t.get(k) for k in (
                    "trial_id", "params", *SEARCH_FIGURES,
                    *(f"search_{f}" for f in SEARCH_FIGURES))} for t in self.trials]}


def candidates(trials: list[dict[str, Any]], baseline_miou: float, max_drop: float,
               mode: str, top: int, guard: Any = "ci") -> list[dict[str, Any]]:
    """The ``top`` cheapest trials feasible under each rule (point drop, ``guard``; ``ci``
    when the guard is ``none``), cheapest first, each operating point once: a searcher over
    a discrete space can propose the same point again (Optuna's TPE does), and confirming
    it twice would crowd out the next-cheapest point."""
    done = annotate(trials, baseline_miou, max_drop, mode)  # type: ignore[arg-type]
    g = as_guard(guard)
    rule = as_guard("ci") if g.is_plain() else g

    def cheapest(guard: Any) -> list[dict[str, Any]]:
        ok = [t for t in done if is_feasible(rule_drop(t, guard, max_drop), max_drop)]
        points: dict[Any, dict[str, Any]] = {}
        for t in sorted(ok, key=cost_order):
            points.setdefault(_key(t), t)
        return list(points.values())[:top]

    out: dict[Any, dict[str, Any]] = {}
    for t in [*cheapest("none"), *cheapest(rule)]:
        out.setdefault(_key(t), t)
    return sorted(out.values(), key=cost_order)


def searchable_images(data: str, holdout: dict[str, Any] | None) -> int:
    from pipelines.common.data import holdout_keys

    return len(holdout_keys(data, holdout)[0])


def confirm(ctx: TrialContext, space, cands: Callable[[int], list[dict[str, Any]]], *,
            top: int, rounds: int = 1, echo=print) -> Confirmation:
    """Evaluate the reference and the candidates (``cands(n)``: the ``n`` cheapest per rule)
    on every searchable image, ``top`` more per rule in each round until one passes the
    guard or ``rounds`` are done (on the driver, like the reference evaluation: a handful of
    evaluations, one after the other)."""
    ref, ref_images = evaluate_images(ctx.checkpoint, ctx.data,
                                      reference_inference(ctx.base), max_samples=None,
                                      device=ctx.device, holdout=ctx.holdout)
    echo(f"confirm: the reference on all {len(ref_images)} searchable images; reference "
         f"mIoU {100 * ref['miou']:.2f}")
    measured: dict[Any, tuple[dict[str, Any], dict[str, Any], list]] = {}
    for r in range(1, rounds + 1):
        new = [t for t in cands(top * r) if _key(t) not in measured]
        if not new:
            break
        if r > 1:
            echo(f"confirm: none of the {len(measured)} candidate(s) passes; round {r}: the "
                 f"next {len(new)}")
        for t in new:
            inference = trial_inference(ctx.base, space.to_inference(t["params"], ctx.num_exits))
            m, images = evaluate_images(ctx.checkpoint, ctx.data, inference,
                                        max_samples=None, device=ctx.device,
                                        holdout=ctx.holdout)
            measured[_key(t)] = (t, m, images)
        confirmed, level = _figures(ctx, list(measured.values()), ref, ref_images)
        selection = select(confirmed, ref["miou"], ctx.max_drop, ctx.drop_mode,  # type: ignore[arg-type]
                           ctx.guard)  # type: ignore[arg-type]
        if selection.best is not None:
            break
    for row in confirmed:
        echo(f"confirm: trial {row.get('trial_id')}: {row['gflops']:.3f} GFLOPs, drop "
             f"{row['drop']:.2f} [{row.get('drop_lo', float('nan')):.2f}, "
             f"{row.get('drop_hi', float('nan')):.2f}] (searched images: "
             f"{row['search_drop']:.2f})")
    if level != ctx.confidence:
        echo(f"confirm: intervals at {100 * level:.2f} % (Bonferroni over {len(confirmed)} "
             f"candidates)")
    return Confirmation(reference=ref, trials=confirmed, selection=selection)


def _key(t: dict[str, Any]) -> Any:
    params = t.get("params")
    return point_key(params) if params else t.get("trial_id") or id(t)


def _figures(ctx: TrialContext, measured: list[tuple[dict[str, Any], dict[str, Any], list]],
             ref: dict[str, Any], ref_images: list) -> tuple[list[dict[str, Any]], float]:
    """Every measured candidate's full-split figures, its interval at the level corrected
    for all of them; and that level."""
    guard = as_guard(ctx.guard)
    level = confirm_confidence(guard, ctx.confidence, len(measured))
    full = replace(ctx, baseline=ref, reference=ref_images, max_samples=None, confidence=level)
    rows = []
    for t, m, images in measured:
        metrics = trial_metrics(m, ref, ctx.max_drop, ctx.drop_mode,
                                interval=drop_interval(full, images), guard=ctx.guard,
                                slices=slice_figures(full, images))
        # the cliff figures stay the search's: neighbours and candidate on the same images
        row = {**{k: v for k, v in t.items() if k not in ("feasible",)},
               **{f"search_{k}": t.get(k) for k in SEARCH_FIGURES}, **metrics,
               "num_images": len(images), "confirm_confidence": level}
        if guard.cliff is not None and row.get("cliff_step") is None:
            # a point the cliff screen never reached (the point rule's candidate) is not
            # the guard's to choose: its neighbours were not measured
            row["cliff_step"] = math.nan
        rows.append(row)
    return rows, level
