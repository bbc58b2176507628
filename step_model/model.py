"""The STEP segmenter: dCTS supertokens + early exits on a timm ViT, Segmenter decoder.

Forward, per batch:

1. pad H, W up to multiples of 16 (zeros; labels with 255), like Segmenter;
2. choose superpatches (policy ``none`` / ``oracle`` / ``threshold`` / ``budget``);
3. embed each (super)token: area-downsample its (16s x 16s) pixel block by s to 16 x 16
   (``avg_pool2d``; bilinear without antialias aliases for s > 2) and apply the ViT's own
   patch-embedding conv; its position embedding is the mean over the cells it covers;
4. run the blocks on each image's active tokens (:mod:`step_model.varlen`); after an exit
   block, halted tokens keep their exit prediction and are *removed* from the batch, so
   later blocks really run on fewer tokens (``halted_context`` kv / pooled: they stay
   there as keys and values only, :mod:`step_model.context`);
5. decode the tokens still active, put every token's logits back on the grid through
   ``cell_to_token`` (one gather) and upsample bilinearly to the input size: by default the
   softmax probabilities (``upsample="probs"``), returned as log-probabilities, because
   halted cells carry exit-head logits and active cells decoder logits, whose scales differ.

Everything needed for analysis (tokens per block, supertokens per level, halting per exit,
per-cell level and exit depth) is returned in :class:`TokenFlow`.

``forward`` composes four pieces that analysis and serving can also call one by one (as
timm splits ``forward_features`` / ``forward_head``)::

    tokens = model.forward_tokens(images, labels)   # steps 1-3 -> SuperTokens
    encoded = model.forward_encoder(tokens)          # step 4    -> EncodedTokens
                                                     #   (halt_counts=: the ablation's counts)
    logits, token_logits = model.forward_head(tokens, encoded)  # step 5
    flow = model.token_flow(tokens, encoded)         # TokenFlow
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import build_encoder
from .config import (
    IGNORE_INDEX,
    PATCH,
    InferenceConfig,
    InferenceOverrides,
    StepConfig,
    split_model_config,
)
from .context import HaltedContext, check_blocks
from .decoder import build_decoder
from .exits import ExitHead, halting_mask, spread_key
from .policy import build_policy, check_float_images, policy_targets
from .segmenter_init import load_segmenter
from .selection import (
    TokenLayout,
    build_layout,
    dense_layout,
    select_by_budget,
    select_by_threshold,
)
from .varlen import run_block


@dataclass
class TokenFlow:
    """Where the tokens went, per image. Tensors are on the model's device."""

    grid: tuple[int, int]
    exit_blocks: list[int]
    num_tokens: torch.Tensor  # (B,) tokens after sharing
    tokens_per_block: torch.Tensor  # (B, depth) tokens entering each block (no prefix tokens)
    supertokens_per_level: dict[int, torch.Tensor]  # level -> (B,), level 1 = single cells
    halted_per_exit: torch.Tensor  # (B, n_exits)
    cell_to_token: torch.Tensor  # (B, gh*gw)
    cell_level: torch.Tensor  # (B, gh, gw) side of the superpatch covering the cell
    cell_exit_depth: torch.Tensor  # (B, gh, gw) blocks the cell's token ran through

    @property
    def tokens_in(self) -> int:
        return self.grid[0] * self.grid[1]

    def summary(self) -> dict[str, Any]:
        """Plain-Python view (per image lists) for JSON / MLflow."""
        return {
            "grid": list(self.grid),
            "tokens_in": self.tokens_in,
            "num_tokens": self.num_tokens.tolist(),
            "tokens_per_block": self.tokens_per_block.tolist(),
            "supertokens_per_level": {str(s): v.tolist() for s, v in self.supertokens_per_level.items()},
            "exit_blocks": list(self.exit_blocks),
            "halted_per_exit": self.halted_per_exit.tolist(),
        }


@dataclass
class StepOutput:
    logits: torch.Tensor  # (B, C, H, W) at input resolution
    flow: TokenFlow
    token_logits: torch.Tensor  # (B, N, C) final per-token logits (frozen exit logits if halted)
    exit_logits: list[torch.Tensor] = field(default_factory=list)  # per exit (B, N, C)
    exit_valid: list[torch.Tensor] = field(default_factory=list)  # per exit (B, N) tokens present
    policy_logits: dict[int, torch.Tensor] | None = None  # {s: (B, gh/s, gw/s)} when the policy ran


@dataclass
class SuperTokens:
    """What :meth:`StepSegmenter.forward_tokens` returns: the embedded token batch.

    N = ``layout.max_tokens`` (the longest image's token count; shorter images are padded
    at the end of their row), P = ``prefix`` (class token or none), D = embedding width.
    """

    x: torch.Tensor  # (B, P+N, D) prefix tokens first, then tokens in raster order of their top-left cell
    layout: TokenLayout  # grid, cell_to_token (B, gh*gw), num_tokens (B,), token_level (B, N), ...
    prefix: int  # P
    input_size: tuple[int, int]  # (H, W) before padding to multiples of 16
    policy_logits: dict[int, torch.Tensor] | None  # {s: (B, gh/s, gw/s)} when the policy ran

    @property
    def num_tokens(self) -> int:
        """N: token positions per image (padding included)."""
        return self.layout.max_tokens


@dataclass
class EncodedTokens:
    """What :meth:`StepSegmenter.forward_encoder` returns: the tokens still active after the
    last block (final norm applied) and the bookkeeping of the exits.

    The active tokens sit in *slots*: M = ``max(lengths)`` <= N per image, active first;
    ``slot_token`` maps a slot to its token number (N for an empty slot). Per-token tensors
    (N columns) are in token order, like ``SuperTokens``.
    """

    x: torch.Tensor  # (B, P+M, D) prefix tokens, then the active tokens' slots
    lengths: list[int]  # active tokens per image (len B)
    slot_token: torch.Tensor  # (B, M) long, token of each slot; N = empty slot
    exit_logits: list[torch.Tensor]  # per exit that ran: (B, N, C)
    exit_valid: list[torch.Tensor]  # per exit that ran: (B, N) bool, token present there
    halted: torch.Tensor  # (B, N) bool, the token halted at an exit
    frozen_logits: torch.Tensor | None  # (B, N, C) the halted tokens' exit logits; None: no halting ran
    halt_depth: torch.Tensor  # (B, N) long, blocks the token ran through (depth if it never halted)
    halted_per_exit: list[torch.Tensor]  # per exit where halting ran: (B,) tokens halted there
    tokens_per_block: list[list[int]]  # per block: tokens entering it, per image (depth x B)


def pad_to_patch(images: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pad bottom/right to multiples of 16 (Segmenter's ``padding``); labels with 255."""
    h, w = images.shape[-2:]
    ph, pw = (-h) % PATCH, (-w) % PATCH
    if ph or pw:
        images = F.pad(images, (0, pw, 0, ph), value=0.0)
        if labels is not None:
            labels = F.pad(labels, (0, pw, 0, ph), value=IGNORE_INDEX)
    return images, labels


def _to_token_order(values: torch.Tensor, slot_token: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Per-slot values (B, S, ...) -> per-token (B, n_tokens, ...); padding slots point at
    ``n_tokens`` and are dropped. Out of place, so gradients flow to ``values``."""
    extra = values.shape[2:]
    idx = slot_token.view(*slot_token.shape, *([1] * len(extra))).expand(-1, -1, *extra)
    out = values.new_zeros(values.shape[0], n_tokens + 1, *extra)
    return out.scatter(1, idx, values)[:, :n_tokens]


def _drop_halted(
    x: torch.Tensor, slot_token: torch.Tensor, keep: torch.Tensor, prefix: int, n_tok: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Remove halted tokens for real: active tokens first (stable), then trim the padding,
    so later blocks run on max_b(active_b) tokens. Prefix tokens (class token) stay."""
    order = (~keep).to(torch.uint8).argsort(dim=1, stable=True)
    lengths = keep.sum(1).tolist()
    n_new = max(lengths)
    x_tok = x[:, prefix:].gather(1, order[..., None].expand(-1, -1, x.shape[-1]))[:, :n_new]
    slot_token = slot_token.gather(1, order)[:, :n_new]
    live = torch.arange(n_new, device=x.device)[None] < keep.sum(1, keepdim=True)
    slot_token = torch.where(live, slot_token, n_tok)
    return torch.cat([x[:, :prefix], x_tok], dim=1), slot_token, lengths


class StepSegmenter(nn.Module):
    """The STEP segmenter. ``cfg`` (:class:`StepConfig`) is the architecture, fixed once
    built (``model.cfg`` is read-only); ``inference`` (:class:`InferenceConfig`, default
    its defaults) is how it runs, replaced whole through :meth:`set_inference` or, for a
    while, :meth:`inference_scope`. Halting during training is a training phase, not a
    setting: :meth:`halt_in_training`.

    ``local_files`` maps the weight sources named in ``cfg`` (``backbone_weights``,
    ``init_from``) to copies on this machine, read instead; ``model.cfg`` keeps the names
    given (a checkpoint records the URIs, not one machine's cache)."""

    def __init__(self, cfg: StepConfig, inference: InferenceConfig | None = None, *,
                 local_files: Mapping[str, str] | None = None) -> None:
        super().__init__()
        files = dict(local_files or {})
        local = cfg.model_copy(update={k: files[v] for k in ("backbone_weights", "init_from")
                                       if (v := getattr(cfg, k)) in files})
        # built: the config with what the weights decided (pos-table size, mean/std) filled in
        self.encoder, built, segmenter = build_encoder(local)
        self._cfg = built.model_copy(update={"backbone_weights": cfg.backbone_weights,
                                             "init_from": cfg.init_from})
        self.exit_blocks = cfg.exits.resolved_blocks(self.encoder.depth)
        self._halt_in_training = False
        self._exit_gen: torch.Generator | None = None
        self._inference = InferenceConfig()
        self.set_inference(inference or InferenceConfig())  # validated now, not at inference
        dim = self.encoder.embed_dim
        self.policy = build_policy(cfg.policy, cfg.num_classes)
        if cfg.policy.weights:
            state = torch.load(cfg.policy.weights, map_location="cpu", weights_only=True)
            self.policy.load_state_dict(state)
        self.exit_heads = nn.ModuleList(ExitHead(dim, cfg.num_classes) for _ in self.exit_blocks)
        self.decoder = build_decoder(cfg.decoder, dim, cfg.num_classes, cfg.decoder_layers)
        if segmenter is not None:  # encoder + decoder; exit heads and policy stay fresh
            load_segmenter(self, segmenter)

    @property
    def cfg(self) -> StepConfig:
        """The architecture (with what the weights decided filled in); never changes."""
        return self._cfg

    # ---- inference settings (what Ray Tune varies on a fixed checkpoint) ---------------
    @property
    def inference(self) -> InferenceConfig:
        """The current inference settings (immutable: replace them with set_inference)."""
        return self._inference

    def set_inference(self, settings: InferenceConfig | InferenceOverrides | Mapping[str, Any]
                      | None = None, /, **changes: Any) -> InferenceConfig:
        """Replace the inference settings: by ``settings`` when it is an
        :class:`InferenceConfig`, else the current ones with the fields ``settings`` sets
        (an :class:`InferenceOverrides` or its dict); then ``changes`` (keyword arguments,
        None = keep). Validated (against this model's exits and policy levels too)
        before anything changes. A new ``exit_seed`` or ``exit_policy`` reseeds the
        ``random`` exit policy's generator. Returns the new settings."""
        base = settings if isinstance(settings, InferenceConfig) else \
            self._inference.apply(settings)
        new = base.apply(changes)
        new.check_exits(len(self.exit_blocks))
        new.check_levels(self._cfg.policy.levels)
        if new.halted_context != "none":
            check_blocks(self.encoder.blocks)
        old = self._inference
        if (new.exit_seed, new.exit_policy) != (old.exit_seed, old.exit_policy):
            self._exit_gen = None
        self._inference = new
        return new

    @contextlib.contextmanager
    def inference_scope(self, settings: InferenceConfig | InferenceOverrides
                        | Mapping[str, Any] | None = None, /,
                        **changes: Any) -> Iterator[InferenceConfig]:
        """``set_inference(settings, **changes)`` for the ``with`` block, the settings
        before it restored afterwards (a training step's draw, a benchmark's plain pass)."""
        saved = self._inference
        try:
            yield self.set_inference(settings, **changes)
        finally:
            self.set_inference(saved)

    def halt_in_training(self, on: bool = True) -> None:
        """Let tokens halt in training mode too (the fine-tuning phase, DToP's recipe).
        A training-phase switch: not an inference setting, never saved with the model."""
        self._halt_in_training = bool(on)

    @property
    def halts_in_training(self) -> bool:
        return self._halt_in_training

    def exit_generator(self) -> torch.Generator:
        """The ``random`` exit policy's generator: one per model, seeded from
        ``inference.exit_seed`` when created (first use, or after the seed / policy
        changed), never per forward, so successive forwards draw different tokens and a
        fresh model repeats the draws."""
        if self._exit_gen is None:
            self._exit_gen = torch.Generator().manual_seed(self._inference.exit_seed)
        return self._exit_gen

    # ---- pieces --------------------------------------------------------------------------
    def select(self, images: torch.Tensor, labels: torch.Tensor | None) -> tuple[TokenLayout, dict | None]:
        """Token layout for padded images; also the policy logits when the policy ran."""
        b = images.shape[0]
        grid = (images.shape[-2] // PATCH, images.shape[-1] // PATCH)
        pcfg, inf = self.cfg.policy, self._inference
        # a policy fine-tuned in stage 2 runs in every training forward, with gradient (its
        # loss: pipelines.train.stages); selection itself never has one
        trains = self.training and any(p.requires_grad for p in self.policy.parameters())
        logits = (self._policy_logits(images, grad=trains)
                  if trains or inf.policy_mode in ("threshold", "budget") else None)
        if inf.policy_mode == "none":
            return dense_layout(grid, b, images.device), logits
        with torch.no_grad():
            if inf.policy_mode == "oracle":
                if labels is None:
                    raise ValueError("policy_mode 'oracle' needs labels in forward(images, labels)")
                scores = policy_targets(labels, tuple(pcfg.levels), pcfg.purity, self.cfg.num_classes,
                                        homogeneity=pcfg.homogeneity)
                accepted = select_by_threshold(scores, dict.fromkeys(scores, 0.5), grid)
            else:
                scores = {s: v.detach().float().sigmoid() for s, v in logits.items()}
                if inf.policy_mode == "threshold":
                    accepted = select_by_threshold(scores, inf.merge_thresholds, grid)
                else:
                    accepted = select_by_budget(scores, inf.budget, grid)
        return build_layout(accepted, grid, b, images.device), logits

    def _policy_logits(self, images: torch.Tensor, grad: bool) -> dict[int, torch.Tensor]:
        """The policy's logits, always in eval mode (BatchNorm running stats: the policy's
        batches in stage 2 are the segmenter's, too few images for batch statistics)."""
        was_training = self.policy.training
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            logits = self.policy.eval()(images)
        self.policy.train(was_training)
        return logits

    def embed(self, images: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """(Super)token embeddings + position embeddings, prefix tokens first: (B, P+N, D)."""
        enc, vit = self.encoder, self.encoder.vit
        gh, gw = layout.grid
        b = images.shape[0]
        x = enc.normalize(images)
        prefix_pos, grid_pos = enc.grid_pos_embed(gh, gw)
        if layout.max_tokens == gh * gw and bool((layout.token_level == 1).all()):
            tokens = vit.patch_embed(x).reshape(b, gh * gw, -1)  # exactly timm's path
            pos = grid_pos.expand(b, -1, -1)
        else:
            tokens = enc.embed_patches(self._gather_patches(x, layout))
            tokens = vit.patch_embed.norm(tokens)
            # mean of the covered cells' position embeddings
            dim = grid_pos.shape[-1]
            idx = layout.cell_to_token[..., None].expand(-1, -1, dim)
            pos = grid_pos.new_zeros(b, layout.max_tokens, dim).scatter_add(1, idx, grid_pos.expand(b, -1, -1))
            area = (layout.token_level.clamp(min=1) ** 2).to(pos.dtype)
            pos = pos / area[..., None]
        prefix = enc.prefix_tokens(b)
        if vit.no_embed_class or prefix is None:
            x = tokens + pos
            if prefix is not None:
                x = torch.cat([prefix, x], dim=1)
        else:
            x = torch.cat([prefix + prefix_pos, tokens + pos], dim=1)
        return vit.norm_pre(vit.pos_drop(x))

    @staticmethod
    def _gather_patches(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """(B, N, 3*16*16) pixel patches; a level-s token gets its block area-downsampled by s.

        Per level present: the image pooled by s (coarser levels from the previous one:
        averages of equal-sized averages are the area average), laid out once as a table of
        its 16 x 16 patches (one contiguous copy), whose rows the level's tokens gather.
        Gathering the windows straight from the 6-d view of the image took 3.5 against 2.5 ms
        of CPU for a CamVid image (480 x 368, 267 tokens); tables of every window of every
        level, concatenated, cost ~0.3 s per 1024^2 image.
        """
        b, c = x.shape[:2]
        gw = layout.grid[1]
        level, anchor = layout.token_level, layout.token_anchor
        out = x.new_zeros(b, layout.max_tokens, c * PATCH * PATCH)
        pooled, prev = x, 1
        for s in sorted(set(level.unique().tolist()) - {0}):
            if s != prev:
                pooled, prev = F.avg_pool2d(pooled, s // prev), s
            h, w = pooled.shape[-2] // PATCH, pooled.shape[-1] // PATCH
            table = (pooled[..., : h * PATCH, : w * PATCH].reshape(b, c, h, PATCH, w, PATCH)
                     .permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * PATCH * PATCH))
            bi, ti = (level == s).nonzero(as_tuple=True)
            a = anchor[bi, ti]
            out[bi, ti] = table[bi, ((a // gw) // s) * w + (a % gw) // s]
        return out

    # ---- forward ---------------------------------------------------------------------
    def forward_tokens(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> SuperTokens:
        """Pad, select the superpatches (policy), embed them with their position embeddings.

        images float [0, 1] (B, 3, H, W); labels int64 (B, H, W), 255 = ignore (needed by
        the oracle policy only). Returns :class:`SuperTokens`: ``x`` (B, P+N, D), the
        ``layout`` (grid (H/16, W/16) rounded up), the policy logits when the policy ran.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected (B, 3, H, W), got {tuple(images.shape)}")
        check_float_images(images)
        input_size = (images.shape[-2], images.shape[-1])
        images, labels = pad_to_patch(images, labels)
        layout, policy_logits = self.select(images, labels)
        x = self.embed(images, layout)
        return SuperTokens(x=x, layout=layout, prefix=x.shape[1] - layout.max_tokens,
                           input_size=input_size, policy_logits=policy_logits)

    def forward_encoder(self, tokens: SuperTokens, halt_counts: list[torch.Tensor] | None = None) -> EncodedTokens:
        """The ViT blocks with early exits, then the final norm.

        Exit heads run in training (auxiliary loss) or when halting is on. With halting,
        after an exit block the halted tokens keep that exit's logits (``frozen_logits``)
        and are removed from ``x``, so later blocks run on the active tokens only (with
        ``halted_context`` kv / pooled, which also attend to the halted ones as keys and
        values: :mod:`step_model.context`). Returns
        :class:`EncodedTokens`: ``x`` (B, P+M, D) with M <= N, per exit (B, N, C) logits.

        ``halt_counts`` (the exit ablation): one (B,) long tensor per exit, e.g. a confidence
        run's ``list(out.flow.halted_per_exit.unbind(1))``. With exit policy ``random`` or
        ``uniform``, exactly ``min(count, active tokens)`` tokens halt at each exit; without
        it they halt as many as the score rule (``inference.exit_score``) would among their
        own survivors (so only the first exit matches a confidence run). The ``confidence``
        policy ignores it. Every token active at an exit was active at the previous one, so
        ``agreement`` compares each with its own previous prediction.
        """
        x, prefix, n_tok = tokens.x, tokens.prefix, tokens.num_tokens
        layout = tokens.layout
        inf = self._inference
        b, device, strategy = x.shape[0], x.device, inf.varlen
        lengths = layout.num_tokens.tolist()
        slot_token = torch.arange(n_tok, device=device).expand(b, -1)
        slot_token = torch.where(slot_token < layout.num_tokens[:, None], slot_token, n_tok)
        halt_depth = torch.full((b, n_tok), self.encoder.depth, dtype=torch.long, device=device)
        halted = torch.zeros(b, n_tok, dtype=torch.bool, device=device)
        frozen: torch.Tensor | None = None
        halting_on = inf.halting and (not self.training or self._halt_in_training)
        run_exits = self.training or halting_on
        taus = inf.thresholds_per_exit(len(self.exit_blocks))
        temps = inf.temperatures_per_exit(len(self.exit_blocks))
        if halt_counts is not None and len(halt_counts) != len(self.exit_blocks):
            raise ValueError(f"halt_counts: {len(halt_counts)} tensors for {len(self.exit_blocks)} exits")
        gen = self.exit_generator() if halting_on and inf.exit_policy == "random" else None
        slot_key = None
        if halting_on and inf.exit_policy == "uniform":
            key = spread_key(layout.token_anchor, layout.token_level, layout.grid)
            slot_key = torch.cat([key, key.new_zeros(b, 1)], 1)  # column N: empty slots
        # halted tokens as keys/values of later blocks (step_model.context); None: dropped
        context = (HaltedContext(inf.halted_context, self.cfg.num_classes,
                                 layout.token_level.clamp(min=1) ** 2)
                   if halting_on and inf.halted_context != "none" else None)
        run = run_block if context is None else context.run_block
        exit_logits, exit_valid, halted_counts, per_block = [], [], [], []

        for i, block in enumerate(self.encoder.blocks, start=1):
            per_block.append(list(lengths))
            x = run(block, x, [n + prefix for n in lengths], strategy)
            if not run_exits or i not in self.exit_blocks:
                continue
            e = self.exit_blocks.index(i)
            slot_logits = self.exit_heads[e](x[:, prefix:])
            valid = torch.arange(x.shape[1] - prefix, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
            tok_logits = _to_token_order(slot_logits, slot_token, n_tok)
            exit_logits.append(tok_logits)
            exit_valid.append(_to_token_order(valid, slot_token, n_tok))
            if not halting_on:
                continue
            prev = None  # agreement: the previous exit's class of the token in each slot
            if inf.exit_score == "agreement" and e > 0:
                pred = exit_logits[e - 1].argmax(-1)
                prev = torch.cat([pred, pred.new_zeros(b, 1)], 1).gather(1, slot_token)
            halt = halting_mask(
                slot_logits, valid, taus[e], inf.top_k, inf.exit_policy, gen,
                count=None if halt_counts is None else halt_counts[e],
                key=None if slot_key is None else slot_key.gather(1, slot_token),
                score=inf.exit_score, temperature=temps[e], previous=prev,
            )
            halt_tok = _to_token_order(halt, slot_token, n_tok)
            frozen = tok_logits if frozen is None else torch.where(halt_tok[..., None], tok_logits, frozen)
            halted = halted | halt_tok
            halt_depth = torch.where(halt_tok, i, halt_depth)
            halted_counts.append(halt.sum(1))
            if context is not None:
                context.add(x[:, prefix:], halt, slot_logits, slot_token)
            x, slot_token, lengths = _drop_halted(x, slot_token, valid & ~halt, prefix, n_tok)

        return EncodedTokens(
            x=self.encoder.final_norm(x), lengths=lengths, slot_token=slot_token,
            exit_logits=exit_logits, exit_valid=exit_valid, halted=halted, frozen_logits=frozen,
            halt_depth=halt_depth, halted_per_exit=halted_counts, tokens_per_block=per_block,
        )

    def forward_head(self, tokens: SuperTokens, encoded: EncodedTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode the active tokens, take the frozen exit logits of the halted ones, put
        every token's logits back on the grid through ``cell_to_token`` (one gather),
        upsample bilinearly and crop the padding.

        ``inference.upsample == "probs"`` (default) upsamples the softmax probabilities and returns
        their log (clamped at 1e-8): argmax and cross-entropy (log_softmax of a log-probability
        is itself) stay right, and a halted cell next to an active one blends probabilities,
        not logits of two heads with different scales. ``"logits"`` upsamples the logits.

        Returns (logits float32 (B, C, H, W) at the input size, channels-last in memory,
        token_logits (B, N, C)).
        """
        prefix, n_tok = tokens.prefix, tokens.num_tokens
        decoded = self.decoder(encoded.x[:, prefix:], encoded.lengths,
                               self._inference.varlen).float()
        final = _to_token_order(decoded, encoded.slot_token, n_tok)
        frozen = encoded.frozen_logits
        token_logits = final if frozen is None else torch.where(encoded.halted[..., None], frozen.float(), final)
        return self.pixel_logits(tokens, token_logits), token_logits

    def pixel_logits(self, tokens: SuperTokens, token_logits: torch.Tensor) -> torch.Tensor:
        """Per-token logits (B, N, C) on the pixels: gathered to the grid through
        ``cell_to_token``, upsampled (``inference.upsample``), cropped to the input size;
        float32 (B, C, H, W), channels-last in memory. :meth:`forward_head`'s last part, also
        for logits the forward did not choose (an exit's, for every token)."""
        b, c = token_logits.shape[0], token_logits.shape[-1]
        gh, gw = tokens.layout.grid
        grid_logits = token_logits.gather(1, tokens.layout.cell_to_token[..., None].expand(-1, -1, c))
        grid_logits = grid_logits.transpose(1, 2).reshape(b, c, gh, gw)
        h, w = tokens.input_size
        size = (gh * PATCH, gw * PATCH)
        # channels-last: the class axis innermost, so the argmax a mask takes reads contiguous
        # memory (on a CPU, argmax over dim 1 of a channels-first map took 32 ms of a 80 ms
        # forward at 480 x 360, 11 classes; channels-last 2 ms). Same values, other strides.
        channels_last = torch.channels_last
        if self._inference.upsample == "probs":
            grid = grid_logits.softmax(1).contiguous(memory_format=channels_last)
            probs = F.interpolate(grid, size=size, mode="bilinear")[..., :h, :w]
            logits = probs.clamp_min(1e-8).log()
        else:
            grid = grid_logits.contiguous(memory_format=channels_last)
            logits = F.interpolate(grid, size=size, mode="bilinear")[..., :h, :w]
        return logits

    def token_flow(self, tokens: SuperTokens, encoded: EncodedTokens) -> TokenFlow:
        """The :class:`TokenFlow` record of one forward (where the tokens went, per image)."""
        layout = tokens.layout
        gh, gw = layout.grid
        b, device = encoded.x.shape[0], encoded.x.device
        levels = (1, *self.cfg.policy.levels)
        valid_tok = layout.token_valid()
        halted_counts = encoded.halted_per_exit
        return TokenFlow(
            grid=(gh, gw),
            exit_blocks=list(self.exit_blocks),
            num_tokens=layout.num_tokens,
            tokens_per_block=torch.tensor(encoded.tokens_per_block, device=device).T.reshape(b, self.encoder.depth),
            supertokens_per_level={s: ((layout.token_level == s) & valid_tok).sum(1) for s in levels},
            # one column per exit always; zeros where nothing could halt (halting off)
            halted_per_exit=(torch.stack(halted_counts, 1) if halted_counts
                             else torch.zeros(b, len(self.exit_blocks), dtype=torch.long, device=device)),
            cell_to_token=layout.cell_to_token,
            cell_level=layout.cell_level,
            cell_exit_depth=encoded.halt_depth.gather(1, layout.cell_to_token).view(b, gh, gw),
        )

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                halt_counts: list[torch.Tensor] | None = None) -> StepOutput:
        """images float [0, 1] (B, 3, H, W); labels int64 (B, H, W), 255 = ignore (needed by
        the oracle policy only); ``halt_counts``: see :meth:`forward_encoder`. Returns
        :class:`StepOutput` (logits (B, C, H, W))."""
        tokens = self.forward_tokens(images, labels)
        encoded = self.forward_encoder(tokens, halt_counts)
        logits, token_logits = self.forward_head(tokens, encoded)
        return StepOutput(
            logits=logits, flow=self.token_flow(tokens, encoded), token_logits=token_logits,
            exit_logits=encoded.exit_logits, exit_valid=encoded.exit_valid,
            policy_logits=tokens.policy_logits,
        )


def build_step_model(cfg: StepConfig | Mapping[str, Any],
                     inference: InferenceConfig | InferenceOverrides | Mapping[str, Any]
                     | None = None, *, local_files: Mapping[str, str] | None = None
                     ) -> StepSegmenter:
    """A :class:`StepSegmenter` from an architecture config or its plain-dict form (either
    layout: the inference keys of the older one, ``policy.mode`` ..., give the inference
    settings). ``inference``: an :class:`InferenceConfig`, or changes to the defaults (or
    to the dict's settings)."""
    own = InferenceConfig()
    if not isinstance(cfg, StepConfig):
        cfg, own = split_model_config(cfg)
    if not isinstance(inference, InferenceConfig):
        inference = own.apply(inference)
    return StepSegmenter(cfg, inference, local_files=local_files)
