"""Halted tokens kept as context: later blocks attend to them as keys and values only.

``InferenceConfig.halted_context`` says what the blocks after an exit keep of the tokens
that halted there:

* ``none`` (the paper's, DToP's): nothing. A halted token leaves the encoder; the active
  tokens of later blocks attend to each other only.
* ``kv``: every halted token, frozen at its exit. Each later block projects the frozen
  features to keys and values with its own ``norm1`` and the K/V rows of its ``qkv`` (no
  query, no output projection, no MLP, no residual update), and the active tokens of the
  same image attend to [active tokens, halted tokens]. Extra cost per later block and
  image, with K halted and n active tokens (prefix included), width D, 1 MAC = 2 FLOPs:
  ``4 K D^2`` (K/V projections) + ``4 n K D`` (scores and weighted sum over K more keys).
* ``pooled``: the halted tokens of an image pooled per class predicted at their exit: the
  mean of their frozen features weighted by the cells each covers (a supertoken of side s
  counts s^2), over every exit so far, so at most C context tokens per image (C classes).
  Used as keys/values the same way, at ``4 K D^2 + 4 n K D`` with K <= C.

Related work (docs/model.md, "Halted tokens as context"): DToP keeps the ``top_k`` most
confident tokens of each class *active* for context (``InferenceConfig.top_k``, arXiv
2308.01045); EViT fuses the tokens it drops into one token that later blocks still run
(arXiv 2202.07800): ``pooled`` is that, per class, as keys/values only. Unlike both, the
context never gets a query, so its features stay exactly the exit's and the halted tokens'
predictions are the exit's, as with ``none``.

Choices:

* Only the plain pre-norm timm ``Block`` with its ``Attention`` is supported (every ViT
  the backbone accepts by default); :func:`check_blocks` names a block that is not one.
* The context is not detached: in training (the fine-tuning phase with halting) the active
  tokens' loss reaches the halted tokens' features, and through them the blocks before the
  exit, as the forward uses them. Cheap (the graph is kept anyway for the exit loss), and
  the blocks before an exit learn to leave features that later blocks can read.
* Varlen (``step_model.varlen``): ``per_image`` gives each image its own context (no mask);
  ``pad_mask`` pads the contexts to the longest and masks the padding keys, like the tokens.
* With no context yet (before the first exit, or nothing halted) a block runs as with
  ``none`` (:func:`step_model.varlen.run_block`): ``kv`` without halting is ``none``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

from .config import SettingsMismatch
from .varlen import pad_rows, resolve_strategy, run_block


def check_blocks(blocks: nn.Module) -> None:
    """Raise :class:`SettingsMismatch` unless every block is a plain timm ``Block`` with
    the plain ``Attention`` (what the halted context's forward re-implements)."""
    for i, block in enumerate(blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise SettingsMismatch(
                f"halted_context: block {i} is {type(block).__name__} with "
                f"{type(getattr(block, 'attn', None)).__name__}; kv and pooled need timm's "
                "plain Block with Attention (use none)")


def _pack(feats: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Each image's valid rows first (stable), trimmed to the longest; the rest zeroed
    (padding rows may hold garbage, which a masked key must not turn into NaN)."""
    order = (~valid).to(torch.uint8).argsort(dim=1, stable=True)
    counts = valid.sum(1)
    k = int(counts.max()) if counts.numel() else 0
    packed = feats.gather(1, order[..., None].expand(-1, -1, feats.shape[-1]))[:, :k]
    live = torch.arange(k, device=feats.device)[None] < counts[:, None]
    return torch.where(live[..., None], packed, 0.0), counts.tolist()


def context_kv(block: Block, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (B, heads, K, head_dim) of context features ``ctx`` (B, K, D) in
    ``block``: its ``norm1`` and the K/V two thirds of its ``qkv`` (no query)."""
    attn = block.attn
    b, k, _ = ctx.shape
    d = attn.num_heads * attn.head_dim
    bias = attn.qkv.bias
    kv = F.linear(block.norm1(ctx), attn.qkv.weight[d:], None if bias is None else bias[d:])
    key, value = kv.reshape(b, k, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.k_norm(key), value


def block_with_context(block: Block, x: torch.Tensor, ctx: torch.Tensor,
                       attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """timm's ``Block.forward`` on ``x`` (B, N, D) whose attention also reads ``ctx``
    (B, K, D) as keys/values after the tokens' own. ``attn_mask`` (B, 1, 1, N+K) bool,
    True = attend; None = every key."""
    attn = block.attn
    b, n, _ = x.shape
    y = block.norm1(x)
    gate = getattr(attn, "gate", None)  # an output gate (newer timm; None by default)
    gate = None if gate is None else gate(y).sigmoid()
    q, k, v = attn.qkv(y).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    ck, cv = context_kv(block, ctx)
    k = torch.cat([attn.k_norm(k), ck.to(k.dtype)], dim=2)
    v = torch.cat([v, cv.to(v.dtype)], dim=2)
    o = F.scaled_dot_product_attention(attn.q_norm(q), k, v, attn_mask=attn_mask,
                                       dropout_p=attn.attn_drop.p if attn.training else 0.0)
    o = attn.norm(o.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim))
    if gate is not None:
        o = o * gate
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(o))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class HaltedContext:
    """The context of one forward: what the halted tokens leave to later blocks.

    ``feats`` (B, K, D): image b's context in its first ``lengths[b]`` rows (None: none
    yet). ``token_area`` (B, N): cells each token covers (``pooled``'s weights)."""

    def __init__(self, mode: str, num_classes: int, token_area: torch.Tensor) -> None:
        if mode not in ("kv", "pooled"):
            raise ValueError(f"halted_context: unknown mode {mode!r} (none, kv, pooled)")
        self.mode, self.num_classes = mode, num_classes
        # column N: empty slots (slot_token == N)
        self._area = torch.cat([token_area, token_area.new_zeros(token_area.shape[0], 1)], 1)
        self.feats: torch.Tensor | None = None
        self.lengths: list[int] = []
        self._sums: torch.Tensor | None = None  # pooled: (B, C, D) area-weighted sums
        self._weights: torch.Tensor | None = None  # pooled: (B, C) cells per class

    def add(self, x: torch.Tensor, halt: torch.Tensor, logits: torch.Tensor,
            slot_token: torch.Tensor) -> None:
        """Take the tokens halting at an exit: ``x`` (B, M, D) the slots' features after the
        exit block, ``halt`` (B, M) bool, ``logits`` (B, M, C) the exit's, ``slot_token``
        (B, M) each slot's token (N: empty)."""
        if self.mode == "kv":
            if self.feats is None:
                self.feats, self.lengths = _pack(x, halt)
                return
            have = torch.arange(self.feats.shape[1], device=x.device)[None] < \
                torch.tensor(self.lengths, device=x.device)[:, None]
            self.feats, self.lengths = _pack(torch.cat([self.feats, x], 1),
                                             torch.cat([have, halt], 1))
            return
        b, _, d = x.shape
        pred = logits.detach().argmax(-1)
        w = torch.where(halt, self._area.gather(1, slot_token).to(x.dtype), 0.0)
        part = torch.where(halt[..., None], x * w[..., None], 0.0)
        sums = x.new_zeros(b, self.num_classes, d).scatter_add(1, pred[..., None].expand(-1, -1, d), part)
        weights = w.new_zeros(b, self.num_classes).scatter_add(1, pred, w)
        if self._sums is not None:
            sums, weights = self._sums + sums, self._weights + weights
        self._sums, self._weights = sums, weights
        present = weights > 0
        means = sums / torch.where(present, weights, 1.0)[..., None]
        self.feats, self.lengths = _pack(means, present)

    def run_block(self, block: Block, x: torch.Tensor, lengths: list[int],
                  strategy: str) -> torch.Tensor:
        """:func:`step_model.varlen.run_block` with the context as extra keys/values:
        image b's ``lengths[b]`` tokens attend to themselves and its context rows."""
        if self.feats is None or not any(self.lengths):
            return run_block(block, x, lengths, strategy)
        n, k = x.shape[1], self.feats.shape[1]
        if all(m == n for m in lengths) and all(c == k for c in self.lengths):
            return block_with_context(block, x, self.feats)
        strategy = resolve_strategy(strategy, x.device)
        if strategy in ("per_image", "packed"):  # packed: not with context rows (yet)
            rows = []
            for i, (m, c) in enumerate(zip(lengths, self.lengths, strict=True)):
                row = x[i:i + 1, :m]
                if m == 0:
                    out = row
                elif c == 0:
                    out = block(row)
                else:
                    out = block_with_context(block, row, self.feats[i:i + 1, :c])
                rows.append(out[0])
            return pad_rows(rows, n)
        if strategy == "pad_mask":
            dev = x.device
            valid = torch.cat([
                torch.arange(n, device=dev)[None] < torch.tensor(lengths, device=dev)[:, None],
                torch.arange(k, device=dev)[None] < torch.tensor(self.lengths, device=dev)[:, None],
            ], dim=1)
            return block_with_context(block, x, self.feats, valid[:, None, None, :])
        raise ValueError(f"varlen: unknown strategy {strategy!r} (auto, per_image, pad_mask, "
                         "packed)")
