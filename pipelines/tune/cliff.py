"""Cliff edges: the cheapest guarded points whose slightly more aggressive neighbours collapse.

The cheapest point within a limit sits at the limit's boundary, so a neighbour one grid
step more aggressive is usually outside it. That is fine when the step is gentle and
fragile when it is steep: then the point keeps the limit only at its exact thresholds, and
a change of conditions, which shifts the exits' confidences and the policy's scores (so
the effective thresholds), pushes it over. :mod:`pipelines.tune.guard` defines the check
(``cliff_step``: the largest extra drop of a neighbour beyond the limit); this module
measures it for the points that can be chosen.

:func:`screen` walks the points that pass the guard's other checks, cheapest first (each
operating point once), and gives each its ``cliff_step`` from its neighbours' drops on the
same images as its own: neighbours the search already measured are reused, the others are
evaluated here (on the driver, one after the other, like the confirmation), and join the
trials (``source: neighbour``), so that a feasible neighbour is a candidate too. The walk
stops once ``want`` points passed (the confirmation's candidates), or when
``cliff.max_evaluations`` new evaluations were spent: the points it did not reach then get
a NaN ``cliff_step``, which no guard accepts (a point whose cliff is unknown is not chosen).
Order and ties are fixed (GFLOPs, then mIoU, then the parameters), so the same trials give
the same walk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pipelines.tune.guard import (
    GuardConfig,
    aggressive_neighbours,
    cliff_step,
    point_key,
)
from pipelines.tune.pareto import cost_order, is_feasible, miou_drop, rule_drop


def screen(trials: list[dict[str, Any]], space, ctx, guard: GuardConfig, *, want: int,
           echo: Callable[[str], None] = print,
           evaluate: Callable[[dict[str, Any]], dict[str, Any]] | None = None
           ) -> list[dict[str, Any]]:
    """``trials`` with ``cliff_step`` / ``cliff_neighbour`` on the walked points, plus the
    neighbours evaluated for them. ``evaluate(params) -> trial record`` defaults to an
    evaluation of the checkpoint in ``ctx`` on the search's images."""
    assert guard.cliff is not None
    evaluate = evaluate or (lambda params: _evaluate(space, ctx, params))
    baseline, max_drop, mode = ctx.baseline["miou"], ctx.max_drop, ctx.drop_mode
    pool: dict[tuple, dict[str, Any]] = {}
    out = [dict(t) for t in trials]
    for t in sorted(out, key=cost_order):
        t["drop"] = miou_drop(baseline, t["miou"], mode)
        pool.setdefault(point_key(t["params"]), t)
    no_cliff = guard.model_copy(update={"cliff": None})
    spent, passed, cap = 0, 0, guard.cliff.max_evaluations
    while passed < want:
        todo = [t for t in sorted(pool.values(), key=cost_order)
                if "cliff_step" not in t
                and is_feasible(rule_drop(t, no_cliff, max_drop), max_drop)]
        if not todo:
            break
        t = todo[0]
        near = aggressive_neighbours(t["params"], space.dims, guard.cliff.neighbour_fraction)
        missing = [n for n in near if point_key(n) not in pool]
        if spent + len(missing) > cap:
            echo(f"cliff: {cap} neighbour evaluations spent; {len(todo)} point(s) left "
                 "unchecked are not chosen")
            for u in todo:
                u["cliff_step"] = math.nan
            break
        for n in missing:
            rec = evaluate(n)
            rec.update(source="neighbour", drop=miou_drop(baseline, rec["miou"], mode))
            pool[point_key(n)] = rec
            out.append(rec)
            spent += 1
        step, which = cliff_step(t, [pool[point_key(n)] for n in near], max_drop)
        t["cliff_step"] = step
        t["cliff_neighbour"] = which["params"] if which is not None else None
        limit = guard.cliff.max_step if guard.cliff.max_step is not None else max_drop
        ok = step <= limit
        passed += ok
        echo(f"cliff: {_show(t['params'])} ({t['gflops']:.3f} GFLOPs, drop {t['drop']:.2f}): "
             + ("no steep neighbour" if which is None else
                f"{_show(which['params'])} drops {which['drop']:.2f} (+{step:.2f})")
             + ("" if ok else f" > {limit:g}: a cliff edge, not chosen"))
    # the records of one operating point share its figures (TPE proposes points again)
    for t in out:
        found = pool.get(point_key(t["params"]))
        if found is not None and found is not t and "cliff_step" in found:
            t["cliff_step"], t["cliff_neighbour"] = found["cliff_step"], found.get(
                "cliff_neighbour")
    return out


def _show(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(params.items()) if k != "exit_policy")


def _evaluate(space, ctx, params: dict[str, Any]) -> dict[str, Any]:
    """One neighbour on the search's images, with the figures a trial reports: the search's
    starting settings (``tune.inference``) with the neighbour's changes, as a trial runs."""
    from pipelines.tune.trial import (
        drop_interval,
        evaluate_images,
        slice_figures,
        trial_inference,
        trial_metrics,
    )

    inference = trial_inference(ctx.base, space.to_inference(params, ctx.num_exits))
    m, images = evaluate_images(ctx.checkpoint, ctx.data, inference,
                                max_samples=ctx.max_samples, device=ctx.device,
                                holdout=ctx.holdout)
    metrics = trial_metrics(m, ctx.baseline, ctx.max_drop, ctx.drop_mode,
                            interval=drop_interval(ctx, images), guard=ctx.guard,
                            slices=slice_figures(ctx, images))
    return {"trial_id": "neighbour-" + "-".join(f"{v}" for _, v in point_key(params)),
            "run_id": None, "params": space.normalise(params),
            "num_images": len(images), **metrics}
