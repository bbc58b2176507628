"""Early exits: auxiliary per-token heads inside the encoder, and the halting rule.

A token halts when its exit confidence (max softmax probability) reaches the exit's
threshold, except that the ``top_k`` most confident tokens of each predicted class stay
active, so that every class keeps some context in later blocks (DToP). The ablation
policies ``random`` and ``uniform`` halt the same number of tokens at the same depth,
chosen at random or evenly spaced in token order, to show that *which* tokens halt matters.
"""

from __future__ import annotations

import torch
from torch import nn


class ExitHead(nn.Module):
    """LayerNorm + linear per-token classifier."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


def keep_top_k_per_class(pred: torch.Tensor, conf: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) bool: the k most confident valid tokens of each predicted class."""
    if k <= 0:
        return torch.zeros_like(valid)
    # sort key groups tokens by class, most confident first; invalid tokens sort last
    key = torch.where(valid, pred.double() * 2.0 - conf.double(), torch.full_like(conf, float("inf"), dtype=torch.double))
    order = key.argsort(dim=1, stable=True)
    sorted_pred = torch.where(valid, pred, torch.full_like(pred, -1)).gather(1, order)
    sorted_pred = torch.where(valid.gather(1, order), sorted_pred, torch.iinfo(torch.long).max)
    first = torch.searchsorted(sorted_pred.contiguous(), sorted_pred.contiguous(), right=False)
    rank = torch.arange(pred.shape[1], device=pred.device)[None] - first
    keep_sorted = (rank < k) & valid.gather(1, order)
    keep = torch.zeros_like(valid)
    return keep.scatter(1, order, keep_sorted)


def halting_mask(
    logits: torch.Tensor,
    valid: torch.Tensor,
    threshold: float,
    top_k: int,
    policy: str = "confidence",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Which valid tokens halt at this exit: (B, N) bool."""
    prob = logits.detach().float().softmax(-1)
    conf, pred = prob.max(-1)
    halt = (conf >= threshold) & valid & ~keep_top_k_per_class(pred, conf, valid, top_k)
    if policy == "confidence":
        return halt
    counts = halt.sum(1).tolist()
    lengths = valid.sum(1).tolist()
    out = torch.zeros_like(valid)
    for b, (m, n) in enumerate(zip(counts, lengths, strict=True)):
        if m == 0:
            continue
        if policy == "random":
            idx = torch.randperm(n, generator=generator)[:m].to(valid.device)
        elif policy == "uniform":
            idx = torch.linspace(0, n - 1, m).round().long().unique().to(valid.device)
        else:
            raise ValueError(f"exits.policy: unknown exit policy {policy!r}")
        out[b, idx] = True
    return out
