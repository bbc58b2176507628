"""Running transformer blocks on images that keep different numbers of tokens.

Everything variable-length goes through :func:`run_block`, so the strategy can change per
device with one inference setting (``InferenceConfig.varlen``):

* ``per_image``: slice each image's valid prefix and run the block on it alone. Measured
  on a 2-core CPU with torch 2.14.1, for a batch with mixed lengths: 2x faster than
  padding + mask, because no FLOPs are spent on padding and CPU kernels are already
  saturated by one image; jagged nested tensors were ~50x slower than padding
  (docs/model.md, "Variable token counts"). Exact: no masking involved.
* ``pad_mask``: one batched call with a boolean key mask through
  ``scaled_dot_product_attention`` (timm's ``Attention`` forwards ``attn_mask``). What a GPU
  wants: one launch per block instead of B, and SDPA's efficient/flash-style kernels accept
  the mask. Padding costs (N_max - n_b) wasted tokens per image.
* ``auto`` (default): ``per_image`` on CPU, ``pad_mask`` on CUDA.

Layout invariant kept by the model: each image's valid tokens are a prefix of its row
(``valid[b, :n_b]`` True), so both strategies only need the per-image lengths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resolve_strategy(strategy: str, device: torch.device) -> str:
    if strategy == "auto":
        return "pad_mask" if device.type == "cuda" else "per_image"
    return strategy


def run_block(block: nn.Module, x: torch.Tensor, lengths: list[int], strategy: str) -> torch.Tensor:
    """One block over a padded batch ``x`` (B, N, D) whose image b holds ``lengths[b]`` tokens.

    Padding rows of the output are undefined (zeros or garbage) and never read.
    """
    n = x.shape[1]
    if all(length == n for length in lengths):
        return block(x)
    strategy = resolve_strategy(strategy, x.device)
    if strategy == "per_image":
        rows = [block(x[b : b + 1, :length]) for b, length in enumerate(lengths)]
        return torch.cat([F.pad(r, (0, 0, 0, n - r.shape[1])) for r in rows], dim=0)
    if strategy == "pad_mask":
        valid = torch.arange(n, device=x.device)[None] < torch.tensor(lengths, device=x.device)[:, None]
        return block(x, attn_mask=valid[:, None, None, :])
    raise ValueError(f"varlen: unknown strategy {strategy!r} (auto, per_image, pad_mask)")
