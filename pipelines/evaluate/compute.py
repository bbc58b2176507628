"""Compute figures of an evaluation, summed over the forwards that ran.

* GFLOPs per image: every counted forward runs under ``step_model.flops.flop_counter``
  (which also counts the fused CPU attention kernel that ``FlopCounterMode`` misses),
  split into policy / encoder / exits / decoder by ``step_model.flops.flops_by_part``.
  Counting costs no extra forward.
* Tokens and halting from the forward's ``TokenFlow``: tokens after sharing, tokens
  entering each block, supertokens per level, halted tokens per exit.

The shapes come from the model, not from the forwards seen (:func:`model_layout`): under
DDP a rank without data must reduce tensors of the same shapes as the others.
"""

from __future__ import annotations

from typing import Any

import torch

from step_model.config import LEVELS

ALL_LEVELS = (1, *LEVELS)  # supertoken sides (grid cells) any model can use
FLOPS_PARTS = ("policy", "encoder", "exits", "decoder")


def model_layout(model) -> tuple[list[int], int, tuple[int, ...]]:
    """(exit blocks, encoder depth, reported supertoken levels) of ``model`` (or of the
    module a DDP wrapper holds)."""
    m = getattr(model, "module", model)
    exit_blocks = [int(b) for b in getattr(m, "exit_blocks", [])]
    encoder = getattr(m, "encoder", None)
    depth = int(getattr(encoder, "depth", 0) or len(getattr(encoder, "blocks", ()))) \
        if encoder is not None else 0
    cfg_levels = getattr(getattr(getattr(m, "cfg", None), "policy", None), "levels", None)
    levels = tuple(sorted({1, *map(int, cfg_levels)})) if cfg_levels is not None else ALL_LEVELS
    return exit_blocks, depth, levels


class ComputeCounter:
    """Sums of FLOPs, tokens and halting over forwards (per image); :meth:`forward` runs
    one and adds its figures."""

    def __init__(self, exit_blocks: list[int], depth: int, report_levels: tuple[int, ...],
                 count_flops: bool) -> None:
        self.exit_blocks = exit_blocks
        self.depth = depth
        self.report_levels = report_levels
        self.count_flops = count_flops
        self.flops: dict[str, float] = {}
        self.tokens = 0.0
        self.tokens_in = 0.0
        self.per_block = torch.zeros(depth, dtype=torch.float64)
        self.levels: dict[str, float] = {}
        self.halted = torch.zeros(len(exit_blocks), dtype=torch.float64)

    def forward(self, model, images: torch.Tensor, labels: torch.Tensor | None):
        """One forward of ``model``; adds its FLOPs (when counted), tokens and halting."""
        if self.count_flops:
            from step_model.flops import flop_counter, flops_by_part

            with flop_counter(parts_of=model) as fc:
                out = model(images, labels)
            for k, v in flops_by_part(fc, type(model).__name__).items():
                self.flops[k] = self.flops.get(k, 0.0) + v
        else:
            out = model(images, labels)
        flow = out.flow
        self.tokens += float(flow.num_tokens.sum())
        self.tokens_in += float(flow.tokens_in) * images.shape[0]
        per_block = flow.tokens_per_block.double().sum(0).cpu()
        halted = flow.halted_per_exit.double().sum(0).cpu()
        if per_block.numel() != self.depth or halted.numel() != len(self.exit_blocks):
            raise RuntimeError(f"the forwards report {per_block.numel()} blocks / "
                               f"{halted.numel()} exits, the model {self.depth} / "
                               f"{len(self.exit_blocks)}")
        self.per_block += per_block
        self.halted += halted
        for s, v in flow.supertokens_per_level.items():
            self.levels[str(s)] = self.levels.get(str(s), 0.0) + float(v.sum())
        return out

    def vector(self) -> torch.Tensor:
        """Every sum in one float64 vector of a fixed length (for one all-reduce)."""
        unknown = set(self.levels) - {str(s) for s in ALL_LEVELS}
        if unknown:
            raise RuntimeError(f"supertoken levels {sorted(unknown)} outside {ALL_LEVELS}")
        return torch.cat([
            torch.tensor([self.tokens, self.tokens_in], dtype=torch.float64),
            torch.tensor([self.flops.get(k, 0.0) for k in (*FLOPS_PARTS, "total")],
                         dtype=torch.float64),
            self.halted, self.per_block,
            torch.tensor([self.levels.get(str(s), 0.0) for s in ALL_LEVELS],
                         dtype=torch.float64),
        ])

    def figures(self, reduced: torch.Tensor, n: float) -> dict[str, Any]:
        """The per-image figures of :class:`~pipelines.evaluate.evaluator.EvalResult` from
        the reduced :meth:`vector` of all ranks and the images they evaluated."""
        sizes = [2, len(FLOPS_PARTS) + 1, len(self.exit_blocks), self.depth, len(ALL_LEVELS)]
        head, flops, halted, per_block, level_sums = reduced.split(sizes)
        tokens, tokens_in = float(head[0]), float(head[1])
        exit_names = [f"exit_{b}" for b in self.exit_blocks]
        levels = {str(s): float(v) for s, v in zip(ALL_LEVELS, level_sums, strict=True)
                  if s in self.report_levels}
        counted = self.count_flops and n
        return {
            "gflops": float(flops[-1]) / n if counted else None,
            "gflops_split": {k: float(flops[i]) / n for i, k in enumerate(FLOPS_PARTS)}
            if counted else {},
            "tokens_in": tokens_in / n if n else None,
            "tokens_mean": tokens / n if n else None,
            "tokens_per_block": [float(v) / n for v in per_block] if n else [],
            "supertokens_per_level": {k: v / n for k, v in levels.items()} if n else {},
            "halted_fraction": float(halted.sum()) / tokens if tokens else None,
            "halted_per_exit": {name: float(h) / tokens
                                for name, h in zip(exit_names, halted, strict=True)}
            if tokens else {},
        }
