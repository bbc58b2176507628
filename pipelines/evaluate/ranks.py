"""Which images each DDP rank evaluates.

Under DDP the validation *samples* (not shards) are split across ranks, balanced to within
one image (:func:`pipelines.common.data.eval_loader`), so a one-shard validation split
still gives every rank work. ``max_samples`` is a *global* cap: rank ``r`` of ``W``
evaluates at most ``max_samples // W + (r < max_samples % W)`` images, so that
``max_samples`` images are evaluated in all (when the data has them).
"""

from __future__ import annotations

from dataclasses import dataclass


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group; (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class RankShare:
    """This rank's ``cap`` (None: no cap) and the images it and all ranks will evaluate,
    when known (for progress lines)."""

    cap: int | None
    rank_total: int | None
    all_total: int | None


def rank_share(loader, max_samples: int | None, rank: int, world: int) -> RankShare:
    """This rank's share of the global ``max_samples``; the totals come from the loader's
    ``num_samples`` / ``total_samples`` when it has them."""
    from data_prep.loader import rank_sample_range

    cap: int | None = None
    if max_samples is not None:
        lo, hi = rank_sample_range(max(0, max_samples), rank, world)
        cap = hi - lo
    rank_total = getattr(loader, "num_samples", None)
    all_total = getattr(loader, "total_samples", None)
    if cap is not None:
        rank_total = cap if rank_total is None else min(rank_total, cap)
        all_total = max_samples if all_total is None else min(all_total, max_samples)
    return RankShare(cap, rank_total, all_total)
