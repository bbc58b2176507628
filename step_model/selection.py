"""Superpatch selection (coarse to fine, quadtree aligned) and the token layout it implies.

A level-s window covers the s x s grid cells [i*s, (i+1)*s) x [j*s, (j+1)*s). Windows that
do not fit at the border are not formed. Selection runs coarse to fine (16, 8, 4, 2): a
window is accepted when its score passes and none of its cells is taken yet; cells left
over stay single tokens.

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
    scores: dict[int, torch.Tensor], thresholds: dict[int, float], grid: tuple[int, int]
) -> dict[int, torch.Tensor]:
    """Accept a window when score >= threshold and it is still free, coarse to fine."""
    gh, gw = grid
    b = next(iter(scores.values())).shape[0] if scores else 0
    device = next(iter(scores.values())).device if scores else None
    taken = torch.zeros(b, gh, gw, dtype=torch.bool, device=device)
    accepted: dict[int, torch.Tensor] = {}
    for s in sorted(scores, reverse=True):
        h, w = gh // s, gw // s
        if h == 0 or w == 0:
            continue
        busy = F.max_pool2d(taken[:, None, : h * s, : w * s].float(), s)[:, 0] > 0
        accept = (scores[s][:, :h, :w] >= thresholds[s]) & ~busy
        accepted[s] = accept
        taken |= _expand(accept, s, gh, gw)
    return accepted


def select_by_budget(
    scores: dict[int, torch.Tensor], keep: float, grid: tuple[int, int]
) -> dict[int, torch.Tensor]:
    """Keep about ``keep`` x gh*gw tokens per image: accept free windows best score first.

    A level-s window saves s*s - 1 tokens; windows that would go below the budget are
    skipped, so an image ends at the budget or at most 2 tokens above it when enough windows
    exist (the batch is padded to its longest image). Greedy in score order is what CTS'
    fixed-budget policy does; this is a short per-image loop on the CPU (~1.4k windows at
    1024^2), not on the model's hot path.
    """
    gh, gw = grid
    target = max(1, int(round(keep * gh * gw)))
    levels = [s for s in sorted(scores, reverse=True) if gh // s and gw // s]
    b = next(iter(scores.values())).shape[0]
    out = {s: np.zeros((b, gh // s, gw // s), dtype=bool) for s in levels}
    cand = []
    for s in levels:
        sc = scores[s][:, : gh // s, : gw // s].detach().float().cpu().numpy()
        cand.append((s, sc))
    for i in range(b):
        entries = []
        for s, sc in cand:
            flat = sc[i].ravel()
            w = gw // s
            entries.extend((-float(v), -s, k // w, k % w, s) for k, v in enumerate(flat))
        entries.sort()  # best score first; ties: coarser first
        taken = np.zeros((gh, gw), dtype=bool)
        count = gh * gw
        for _, _, r, c, s in entries:
            if count <= target:
                break
            saving = s * s - 1
            if count - saving < target or taken[r * s:(r + 1) * s, c * s:(c + 1) * s].any():
                continue
            taken[r * s:(r + 1) * s, c * s:(c + 1) * s] = True
            out[s][i, r, c] = True
            count -= saving
    device = next(iter(scores.values())).device
    return {s: torch.from_numpy(m).to(device) for s, m in out.items()}


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
