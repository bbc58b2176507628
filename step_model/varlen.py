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
* ``packed``: the images' valid tokens concatenated into one sequence; the block's
  per-token parts (the norms, the MLP: two thirds of its linear FLOPs) run as one call over
  all of them, the attention (with its QKV and output projections) per image, so no token
  attends across images (a block-diagonal attention, without building the mask). Exact
  (no masking, no padding computed); per-image GEMMs of a few hundred rows become one of a
  few thousand. For timm's pre-norm ``Block``; other blocks run ``per_image``.
* ``auto`` (default): ``packed`` on CPU, ``pad_mask`` on CUDA. Measured on this 2-core
  CPU, the tuned CamVid model at batch 8: 45.8 against 48.2 ms per image for
  ``per_image``, the same masks (docs/model.md, "The FLOP cut on the clock").

Layout invariant kept by the model: each image's valid tokens are a prefix of its row
(``valid[b, :n_b]`` True), so both strategies only need the per-image lengths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resolve_strategy(strategy: str, device: torch.device) -> str:
    if strategy == "auto":
        return "pad_mask" if device.type == "cuda" else "packed"
    return strategy


def run_block(block: nn.Module, x: torch.Tensor, lengths: list[int], strategy: str) -> torch.Tensor:
    """One block over a padded batch ``x`` (B, N, D) whose image b holds ``lengths[b]`` tokens.

    Padding rows of the output are undefined (zeros or garbage) and never read.
    """
    n = x.shape[1]
    if all(length == n for length in lengths):
        return block(x)
    strategy = resolve_strategy(strategy, x.device)
    if strategy == "packed" and _packable(block):
        return _packed(block, x, lengths)
    if strategy in ("per_image", "packed"):
        return pad_rows([block(x[b : b + 1, :length])[0] for b, length in enumerate(lengths)], n)
    if strategy == "pad_mask":
        valid = torch.arange(n, device=x.device)[None] < torch.tensor(lengths, device=x.device)[:, None]
        return block(x, attn_mask=valid[:, None, None, :])
    raise ValueError(f"varlen: unknown strategy {strategy!r} (auto, per_image, pad_mask, packed)")


def _packable(block: nn.Module) -> bool:
    """timm's pre-norm ViT ``Block`` (not a subclass that may reorder its parts)."""
    from timm.models.vision_transformer import Block

    return type(block) is Block


def _packed(block: nn.Module, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """``Block.forward`` on the concatenated valid tokens, attention per image."""
    n = x.shape[1]
    packed = torch.cat([x[b, :length] for b, length in enumerate(lengths)])[None]
    h = block.norm1(packed)
    spans = torch.tensor([0, *lengths]).cumsum(0).tolist()
    attn = torch.cat([block.attn(h[:, s:e]) if e > s else h[:, s:e]
                      for s, e in zip(spans[:-1], spans[1:], strict=True)], 1)
    packed = packed + block.drop_path1(block.ls1(attn))
    packed = packed + block.drop_path2(block.ls2(block.mlp(block.norm2(packed))))
    return pad_rows(packed[0].split(lengths), n)


def pad_rows(rows: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """Images' token rows (m_b, D) back into one padded batch (B, n, D), zeros after each
    image's m_b tokens."""
    return torch.stack([F.pad(r, (0, 0, 0, n - r.shape[0])) for r in rows])
