"""Superpatch selection (coarse to fine, quadtree aligned) and the token layout it implies.

A level-s window covers the s x s grid cells [i*s, (i+1)*s) x [j*s, (j+1)*s). Windows that
do not fit at the border are not formed. Selection runs coarse to fine (16, 8, 4, 2): a
window is accepted when its score passes and none of its cells is taken yet; cells left
over stay single tokens. A fixed budget is met by the same rule at a per-image threshold
(:func:`select_by_budget`).

The layout is kept per image as ``cell_to_token`` (gh*gw indices), so that un-sharing a
per-token quantity back to the grid is one gather. Tokens are numbered in raster order of
their top-left cell, which makes the numbering independent of how they were selected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class TokenLayout:
    grid: tuple[int, int]
    cell_to_token: torch.Tensor  # (B, gh*gw) long
    num_tokens: torch.Tensor  # (B,) long
    token_level: torch.Tensor  # (B, N) long, side in cells; 0 for padding
    token_anchor: torch.Tensor  # (B, N) long, top-left cell index; 0 for padding
    cell_level: torch.Tensor  # (B, gh, gw) long

    @property
    def max_tokens(self) -> int:
        return self.token_level.shape[1]

    def token_valid(self) -> torch.Tensor:
        n = self.token_level.shape[1]
        return torch.arange(n, device=self.num_tokens.device)[None] < self.num_tokens[:, None]


def _expand(mask: torch.Tensor, s: int, gh: int, gw: int) -> torch.Tensor:
    """(B, h, w) window mask -> (B, gh, gw) cell mask (zero where windows do not fit)."""
    cells = mask.repeat_interleave(s, 1).repeat_interleave(s, 2)
    return F.pad(cells, (0, gw - cells.shape[2], 0, gh - cells.shape[1]))


def select_by_threshold(
    scores: dict[int, torch.Tensor], thresholds: dict[int, float | torch.Tensor], grid: tuple[int, int]
) -> dict[int, torch.Tensor]:
    """Accept a window when score >= threshold and it is still free, coarse to fine.

    A threshold is a number or a (B, 1, 1) tensor (one per image)."""
    gh, gw = grid
    b = next(iter(scores.values())).shape[0] if scores else 0
    device = next(iter(scores.values())).device if scores else None
    taken = torch.zeros(b, gh, gw, dtype=torch.bool, device=device)
    accepted: dict[int, torch.Tensor] = {}
    for s in sorted(scores, reverse=True):
        h, w = gh // s, gw // s
        if h == 0 or w == 0:
            continue
        # a window is busy when any of its cells is taken (reshape + any: ~100x faster than
        # max_pool2d with an s x s kernel on the CPU, which the budget bisection calls often)
        busy = taken[:, : h * s, : w * s].reshape(b, h, s, w, s).any(4).any(2)
        accept = (scores[s][:, :h, :w] >= thresholds[s]) & ~busy
        accepted[s] = accept
        taken |= _expand(accept, s, gh, gw)
    return accepted


def _token_count(accepted: dict[int, torch.Tensor], cells: int) -> torch.Tensor:
    """(B,) tokens of a selection: each accepted level-s window turns s*s cells into one."""
    saved = sum((s * s - 1) * a.flatten(1).sum(1) for s, a in accepted.items())
    return cells - saved


def select_by_budget(
    scores: dict[int, torch.Tensor], keep: float, grid: tuple[int, int]
) -> dict[int, torch.Tensor]:
    """Keep about ``keep`` x gh*gw tokens per image: threshold selection at the per-image
    threshold that meets the budget, topped up with finer free windows.

    Lowering a shared threshold only coarsens the coarse-to-fine layout (a cell's window can
    only grow), so the token count is monotone in it and a bisection over the image's window
    scores finds the lowest threshold whose layout still has >= the target tokens; that
    layout is exactly :func:`select_by_threshold`'s at an equal count. The gap to the target
    (smaller than the next window's saving) is filled by the best-scored windows below the
    threshold that are still free and save no more than the gap, so an image ends at the
    target or at most 2 tokens above it (a level-2 window saves 3). The batch is padded to its
    longest image.

    Why not greedy by raw score (CTS' fixed budget, used before): fine windows score higher
    than coarse ones (a small window is homogeneous more often), so greedy took level-2
    windows everywhere first, saving 3 tokens each, and they then blocked the coarse windows
    of large uniform regions; to reach the budget it had to merge low-scored fine windows
    across object borders (docs/model.md has the measurement).
    """
    gh, gw = grid
    cells = gh * gw
    target = max(1, int(round(keep * cells)))
    levels = [s for s in sorted(scores, reverse=True) if gh // s and gw // s]
    sc = {s: scores[s][:, : gh // s, : gw // s].detach().float() for s in levels}
    b = next(iter(scores.values())).shape[0]
    device = next(iter(scores.values())).device
    if not levels:
        return {}
    # candidates: +inf (nothing merged, count = cells >= target), then every score, descending
    flat = torch.cat([v.flatten(1) for v in sc.values()], 1)
    cand = torch.cat([flat.new_full((b, 1), float("inf")), flat.sort(1, descending=True).values], 1)
    lo = torch.zeros(b, dtype=torch.long, device=device)  # count(cand[lo]) >= target always
    hi = torch.full((b,), cand.shape[1], dtype=torch.long, device=device)
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        t = cand.gather(1, mid.clamp(max=cand.shape[1] - 1)[:, None])[:, :, None]
        ok = _token_count(select_by_threshold(sc, dict.fromkeys(levels, t), grid), cells) >= target
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    t = cand.gather(1, lo[:, None])[:, :, None]
    accepted = select_by_threshold(sc, dict.fromkeys(levels, t), grid)
    counts = _token_count(accepted, cells).tolist()
    if all(n - target < 3 for n in counts):
        return accepted
    return _top_up(accepted, sc, t.flatten().tolist(), counts, target, grid)


def _top_up(accepted: dict[int, torch.Tensor], scores: dict[int, torch.Tensor], t: list[float],
            counts: list[int], target: int, grid: tuple[int, int]) -> dict[int, torch.Tensor]:
    """Add free windows scored below the image's threshold, best first, while the count stays
    >= target. Bounded: only windows saving <= the gap, and the gap is < one window's saving."""
    gh, gw = grid
    device = next(iter(accepted.values())).device
    acc = {s: a.cpu().numpy().copy() for s, a in accepted.items()}
    np_scores = {s: v.cpu().numpy() for s, v in scores.items()}
    for i, n in enumerate(counts):
        gap = n - target
        if gap < 3:
            continue
        taken = np.zeros((gh, gw), dtype=bool)
        for s, a in acc.items():
            taken[: a.shape[1] * s, : a.shape[2] * s] |= a[i].repeat(s, 0).repeat(s, 1)
        entries = []
        for s, v in np_scores.items():
            if s * s - 1 > gap:
                continue
            r, c = np.nonzero(v[i] < t[i])
            entries.extend(zip((-v[i, r, c]).tolist(), [s] * len(r), r.tolist(), c.tolist(), strict=True))
        entries.sort()  # best score first; ties: finer first (smaller saving overshoots less)
        for _, s, r, c in entries:
            if gap < 3:
                break
            if s * s - 1 > gap or taken[r * s:(r + 1) * s, c * s:(c + 1) * s].any():
                continue
            taken[r * s:(r + 1) * s, c * s:(c + 1) * s] = True
            acc[s][i, r, c] = True
            gap -= s * s - 1
    return {s: torch.from_numpy(a).to(device) for s, a in acc.items()}


def build_layout(accepted: dict[int, torch.Tensor], grid: tuple[int, int], batch: int, device) -> TokenLayout:
    """Token layout from the accepted windows of each level (disjoint by construction)."""
    gh, gw = grid
    level = torch.ones(batch, gh, gw, dtype=torch.long, device=device)
    for s, acc in accepted.items():
        level = torch.where(_expand(acc, s, gh, gw), torch.full_like(level, s), level)
    rows = torch.arange(gh, device=device).view(1, gh, 1)
    cols = torch.arange(gw, device=device).view(1, 1, gw)
    anchor_r, anchor_c = rows - rows % level, cols - cols % level
    is_anchor = ((rows % level) == 0) & ((cols % level) == 0)
    flat_anchor = is_anchor.view(batch, -1)
    token_id = flat_anchor.long().cumsum(1) - 1
    anchor_cell = (anchor_r * gw + anchor_c).view(batch, -1)
    cell_to_token = token_id.gather(1, anchor_cell)
    num_tokens = flat_anchor.sum(1)
    n = int(num_tokens.max())
    # scatter each anchor's level / cell to its token slot (padding slots write to column n)
    slot = torch.where(flat_anchor, token_id, torch.full_like(token_id, n))
    cells = torch.arange(gh * gw, device=device).expand(batch, -1)
    token_level = torch.zeros(batch, n + 1, dtype=torch.long, device=device)
    token_level.scatter_(1, slot, level.view(batch, -1))
    token_anchor = torch.zeros(batch, n + 1, dtype=torch.long, device=device)
    token_anchor.scatter_(1, slot, cells)
    return TokenLayout(
        grid=grid, cell_to_token=cell_to_token, num_tokens=num_tokens,
        token_level=token_level[:, :n], token_anchor=token_anchor[:, :n], cell_level=level,
    )


def dense_layout(grid: tuple[int, int], batch: int, device) -> TokenLayout:
    """Policy ``none``: one token per cell (no data-dependent ops, so FLOPs can be counted
    on fake tensors)."""
    gh, gw = grid
    cells = torch.arange(gh * gw, device=device).expand(batch, -1)
    return TokenLayout(
        grid=grid, cell_to_token=cells,
        num_tokens=torch.full((batch,), gh * gw, dtype=torch.long, device=device),
        token_level=torch.ones(batch, gh * gw, dtype=torch.long, device=device),
        token_anchor=cells, cell_level=torch.ones(batch, gh, gw, dtype=torch.long, device=device),
    )
