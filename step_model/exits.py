"""Early exits: auxiliary per-token heads inside the encoder, and the halting rule.

A token halts when its exit score reaches the exit's threshold, except that the ``top_k``
surest tokens (highest score) of each predicted class stay active, so that every class
keeps some context in later blocks (DToP). The score (:func:`exit_scores`) is computed on
the exit's softmax after dividing the logits by the exit's temperature (temperature
scaling; 1 = the raw head). Every score lies in [0, 1], higher = surer, so a threshold
keeps its meaning whichever score is chosen:

* ``confidence``: the max probability (the paper's);
* ``margin``: best minus second-best probability; a token torn between two classes has a
  low margin even when the two together hold all the probability;
* ``entropy``: 1 - H(p) / log(C), the whole distribution's certainty (1: one-hot, 0:
  uniform);
* ``agreement``: the max probability, and a token may halt only where this exit predicts
  the class that the previous exit predicted for it: two heads, at different depths, must
  agree. There is no previous exit at the first one, so nothing halts there: falling
  back to the confidence would let the shallowest, most overconfident head (which halts
  the most tokens) decide alone, which is what this score is meant to prevent.

The ablation policies ``random`` and ``uniform`` halt a given number of tokens at the same
depth, to show that *which* tokens halt matters: ``random`` draws them from the model's
generator, ``uniform`` spreads them evenly over the image grid (:func:`spread_key`). The
number is either given per exit (``count``: the counts of a run of the ``confidence``
policy with the same score and temperatures, so that every exit matches) or, without it,
what that score rule would halt among their own survivors.
"""

from __future__ import annotations

import math
import typing

import torch
from torch import nn

from .config import ExitScore

EXIT_SCORES = typing.get_args(ExitScore)

_CURVE_BITS = 12  # per axis: distinct keys for grids up to 4096 cells a side


class ExitHead(nn.Module):
    """LayerNorm + linear per-token classifier."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


def spread_key(anchor: torch.Tensor, level: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N) long: position of each token's centre along a Z-order (Morton) curve over the
    image, coordinates normalised to the grid so that the curve's halves are the image's.

    Consecutive keys are spatial neighbours and every quadrant (at every scale) is one run
    of keys, so tokens taken evenly spaced in key order are spread evenly over the grid."""
    gh, gw = grid
    lvl = level.clamp(min=1)
    # centre in half cells, scaled to [0, 2^bits): integer arithmetic, no rounding ties
    r = ((2 * torch.div(anchor, gw, rounding_mode="floor") + lvl) << _CURVE_BITS) // (2 * gh)
    c = ((2 * (anchor % gw) + lvl) << _CURVE_BITS) // (2 * gw)
    key = torch.zeros_like(anchor)
    for bit in range(_CURVE_BITS):
        key |= ((r >> bit) & 1) << (2 * bit + 1)
        key |= ((c >> bit) & 1) << (2 * bit)
    return key


def exit_scores(logits: torch.Tensor, score: str = "confidence", temperature: float = 1.0,
                previous: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(score, pred, eligible), each (B, N): the exit score in [0, 1] (higher = surer) of
    ``logits / temperature`` (B, N, C), the predicted class, and which tokens the score
    lets halt at all (every token, except for ``agreement``: those whose class equals
    ``previous`` (B, N), the previous exit's prediction; none without it). Where a token
    may not halt, the agreement score is 0, so that ranking by it (``top_k``) puts the
    tokens that could halt first. No gradient: a decision, not a loss."""
    if score not in EXIT_SCORES:
        raise ValueError(f"exit_score: unknown exit score {score!r}; expected one of "
                         f"{', '.join(EXIT_SCORES)}")
    prob = (logits.detach().float() / temperature).softmax(-1)
    conf, pred = prob.max(-1)
    eligible = torch.ones_like(pred, dtype=torch.bool)
    n_classes = prob.shape[-1]
    if score == "margin" and n_classes > 1:
        top = prob.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1], pred, eligible
    if score == "entropy" and n_classes > 1:
        entropy = torch.special.entr(prob).sum(-1)
        return (1.0 - entropy / math.log(n_classes)).clamp(0.0, 1.0), pred, eligible
    if score == "agreement":
        eligible = torch.zeros_like(eligible) if previous is None else pred == previous
        return torch.where(eligible, conf, 0.0), pred, eligible
    return conf, pred, eligible  # confidence; one class: every score is 1


def keep_top_k_per_class(pred: torch.Tensor, score: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) bool: the k valid tokens of each predicted class with the highest ``score``
    (in [0, 1])."""
    if k <= 0:
        return torch.zeros_like(valid)
    # sort key groups tokens by class, highest score first; invalid tokens sort last
    key = torch.where(valid, pred.double() * 2.0 - score.double(), torch.full_like(score, float("inf"), dtype=torch.double))
    order = key.argsort(dim=1, stable=True)
    sorted_pred = torch.where(valid, pred, torch.full_like(pred, -1)).gather(1, order)
    sorted_pred = torch.where(valid.gather(1, order), sorted_pred, torch.iinfo(torch.long).max)
    first = torch.searchsorted(sorted_pred.contiguous(), sorted_pred.contiguous(), right=False)
    rank = torch.arange(pred.shape[1], device=pred.device)[None] - first
    keep_sorted = (rank < k) & valid.gather(1, order)
    keep = torch.zeros_like(valid)
    return keep.scatter(1, order, keep_sorted)


def _take_first(order: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: the entries ``order[b, :take[b]]``."""
    pos = torch.arange(order.shape[1], device=order.device)[None]
    return torch.zeros_like(order, dtype=torch.bool).scatter(1, order, pos < take[:, None])


def halting_mask(
    logits: torch.Tensor,
    valid: torch.Tensor,
    threshold: float,
    top_k: int,
    policy: str = "confidence",
    generator: torch.Generator | None = None,
    count: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    *,
    score: str = "confidence",
    temperature: float = 1.0,
    previous: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which valid tokens halt at this exit: (B, N) bool.

    Policy ``confidence`` (the method): tokens whose ``score`` (:func:`exit_scores`, of
    the logits divided by ``temperature``; ``previous``: the previous exit's predictions,
    for ``agreement``) reaches ``threshold``, less the ``top_k`` highest-scored of each
    predicted class. ``random`` / ``uniform`` halt ``min(count, valid tokens)`` tokens per
    image; without ``count``, as many as that score rule would here. ``uniform`` takes
    them evenly spaced in ``key`` order (:func:`spread_key`; default: token order)."""
    if policy not in ("confidence", "random", "uniform"):
        raise ValueError(f"exit_policy: unknown exit policy {policy!r}")
    if policy == "confidence" or count is None:
        value, pred, eligible = exit_scores(logits, score, temperature, previous)
        halt = ((value >= threshold) & eligible & valid
                & ~keep_top_k_per_class(pred, value, valid, top_k))
        if policy == "confidence":
            return halt
        count = halt.sum(1)
    n_valid = valid.sum(1)
    take = torch.minimum(count.to(device=valid.device, dtype=torch.long), n_valid)
    if policy == "random":
        # drawn on the CPU generator (one per model), so a device never changes the draw
        noise = torch.rand(valid.shape, generator=generator).to(valid.device)
        order = torch.where(valid, noise, 2.0).argsort(dim=1)
        return _take_first(order, take)
    # uniform: the j-th of m tokens is the centre of the j-th of m equal runs of the valid
    # tokens in curve order (stratified), so each region halts its share of the tokens
    if key is None:
        key = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    big = torch.iinfo(torch.long).max
    order = torch.where(valid, key, big).argsort(dim=1, stable=True)
    j = torch.arange(valid.shape[1], device=valid.device)[None]
    m = take[:, None].clamp(min=1)
    picked = torch.div((2 * j + 1) * n_valid[:, None], 2 * m, rounding_mode="floor")
    picked = torch.where(j < take[:, None], picked, valid.shape[1])  # past the row: dropped
    out = torch.zeros(valid.shape[0], valid.shape[1] + 1, dtype=torch.bool, device=valid.device)
    idx = order.gather(1, picked.clamp(max=valid.shape[1] - 1))
    idx = torch.where(j < take[:, None], idx, valid.shape[1])
    return out.scatter(1, idx, True)[:, :-1]
