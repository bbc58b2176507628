"""Segmenter decoders (Strudel et al., ICCV 2021), per token instead of per grid cell.

Both decoders map a set of encoder tokens to per-token class logits; the model scatters
them to the grid through ``cell_to_token`` and upsamples. Fed the full grid, they are the
original Segmenter decoders (the equivalence test relies on that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from .varlen import run_block


class LinearDecoder(nn.Module):
    """Segmenter's linear decoder: one linear layer per token."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor, lengths: list[int], strategy: str = "auto") -> torch.Tensor:
        return self.head(x)


class MaskTransformerDecoder(nn.Module):
    """Segmenter's mask transformer: class embeddings attend jointly with the patch tokens
    through ``layers`` blocks; class masks are scalar products of L2-normalised patch and
    class embeddings. The class embeddings are appended after each image's valid tokens so
    that the valid-prefix layout of :mod:`step_model.varlen` still holds."""

    def __init__(self, embed_dim: int, num_classes: int, layers: int = 2, heads: int | None = None) -> None:
        super().__init__()
        d_model = embed_dim
        heads = heads or max(1, d_model // 64)
        self.num_classes = num_classes
        self.proj_dec = nn.Linear(embed_dim, d_model)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, d_model))
        # Segmenter's blocks have q/k/v biases (a trained Segmenter loads into these)
        self.blocks = nn.ModuleList(Block(d_model, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(layers))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.proj_patch = nn.Parameter(d_model**-0.5 * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(d_model**-0.5 * torch.randn(d_model, d_model))
        self.mask_norm = nn.LayerNorm(num_classes)
        trunc_normal_(self.cls_emb, std=0.02)
        self.register_load_state_dict_pre_hook(_zero_qkv_bias)

    def forward(self, x: torch.Tensor, lengths: list[int], strategy: str = "auto") -> torch.Tensor:
        b, n, _ = x.shape
        c = self.num_classes
        x = self.proj_dec(x)
        cls = self.cls_emb.expand(b, -1, -1)
        if all(length == n for length in lengths):
            z = torch.cat([x, cls], dim=1)
        else:  # put the class embeddings right after each image's valid tokens
            rows = [torch.cat([x[i, :length], cls[i], x.new_zeros(n - length, x.shape[2])]) for i, length in enumerate(lengths)]
            z = torch.stack(rows)
        lens = [length + c for length in lengths]
        for blk in self.blocks:
            z = run_block(blk, z, lens, strategy)
        z = self.decoder_norm(z)
        if all(length == n for length in lengths):
            patches, cls_out = z[:, :n], z[:, n:]
        else:
            patches = z[:, :n]
            cls_out = torch.stack([z[i, length : length + c] for i, length in enumerate(lengths)])
        patches = F.normalize(patches @ self.proj_patch, dim=-1)
        cls_out = F.normalize(cls_out @ self.proj_classes, dim=-1)
        return self.mask_norm(patches @ cls_out.transpose(1, 2))


def _zero_qkv_bias(module: MaskTransformerDecoder, state_dict: dict, prefix: str, *_args) -> None:
    """Checkpoints saved before the blocks had q/k/v biases load with zeros: the same function."""
    for i, blk in enumerate(module.blocks):
        key = f"{prefix}blocks.{i}.attn.qkv"
        if f"{key}.weight" in state_dict and f"{key}.bias" not in state_dict:
            state_dict[f"{key}.bias"] = torch.zeros_like(blk.attn.qkv.bias)


def build_decoder(kind: str, embed_dim: int, num_classes: int, layers: int = 2) -> nn.Module:
    if kind == "linear":
        return LinearDecoder(embed_dim, num_classes)
    if kind == "mask":
        return MaskTransformerDecoder(embed_dim, num_classes, layers)
    raise ValueError(f"decoder: unknown kind {kind!r} (linear, mask)")
