"""Two evaluations of the same images compared: the drop, its interval, the tail, per group.

The one summary every place that compares two models shows (the evaluate step against
each baseline, the held-out check, ``step eval --reference``), from per-image confusion
matrices alone: no forward pass.
"""

from __future__ import annotations

from typing import Any

from pipelines.evaluate.bootstrap import paired_bootstrap
from pipelines.evaluate.groups import group_drops, worst_group
from pipelines.evaluate.tail import tail_drop


def comparison(reference, candidate, *, grouper, drop_mode: str, max_drop: float,
               samples: int, confidence: float, seed: int, tail_fraction: float,
               min_images: int, block: int | str = 1) -> dict[str, Any]:
    """Drop of ``candidate`` against ``reference`` (per-image matrices of the same images):
    point, interval, within the limit, tail, per group and the worst group."""
    iv = paired_bootstrap(reference, candidate, mode=drop_mode,  # type: ignore[arg-type]
                          samples=samples, confidence=confidence, seed=seed, block=block)
    tail = tail_drop(reference, candidate, tail_fraction, drop_mode)  # type: ignore[arg-type]
    out: dict[str, Any] = {"reference_miou": reference.miou(), "miou": candidate.miou(),
                           "drop": iv.drop, "drop_lo": iv.lo, "drop_hi": iv.hi,
                           "confidence": confidence, "bootstrap_block": iv.block,
                           "within_limit": bool(iv.drop <= max_drop + 1e-9),
                           "tail": {k: tail[k] for k in ("fraction", "images", "drop",
                                                         "pixel_drop")}}
    if grouper is not None:
        per = group_drops(reference, candidate, grouper, drop_mode)  # type: ignore[arg-type]
        worst = worst_group(per, min_images)
        out.update(groups=per, worst_group=worst[0] if worst else None,
                   worst_group_drop=worst[1] if worst else None)
    return out
