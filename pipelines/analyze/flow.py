"""Where the tokens went over a whole validation set, from the forwards' ``TokenFlow``.

Token figures are means per image (tokens per superpatch level, tokens entering each block,
tokens halted at each exit). Per class, the share of its *pixels* (not of its tokens) that
sit in a superpatch of each level and whose token left at each exit (``final``: ran through
every block), from ``cell_level`` / ``cell_exit_depth`` and the per-cell label histograms.
"""

from __future__ import annotations

from typing import Any

import torch

from pipelines.analyze.ceiling import cell_counts


class FlowMeter:
    def __init__(self, num_classes: int, levels: tuple[int, ...], exit_blocks: list[int],
                 depth: int, class_names: list[str] | None = None) -> None:
        self.num_classes = num_classes
        self.levels = tuple(sorted({1, *levels}))
        self.exit_blocks = list(exit_blocks)
        self.depth = depth
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        self.images = 0
        self.tokens = 0.0
        self.tokens_in = 0.0
        self.per_level = torch.zeros(len(self.levels), dtype=torch.float64)
        self.per_block = torch.zeros(depth, dtype=torch.float64)
        self.halted = torch.zeros(len(self.exit_blocks), dtype=torch.float64)
        # per class pixel counts: by superpatch level, by exit (+ final)
        self.class_level = torch.zeros(num_classes, len(self.levels), dtype=torch.float64)
        self.class_exit = torch.zeros(num_classes, len(self.exit_blocks) + 1, dtype=torch.float64)

    def update(self, flow, labels: torch.Tensor) -> None:
        b = labels.shape[0]
        self.images += b
        self.tokens += float(flow.num_tokens.sum())
        self.tokens_in += float(flow.tokens_in) * b
        for i, s in enumerate(self.levels):
            v = flow.supertokens_per_level.get(s)
            if v is not None:
                self.per_level[i] += float(v.sum())
        self.per_block += flow.tokens_per_block.double().sum(0).cpu()
        self.halted += flow.halted_per_exit.double().sum(0).cpu()[: len(self.exit_blocks)]
        cells = cell_counts(labels, self.num_classes).double().cpu()  # (B, gh, gw, C)
        level = flow.cell_level.cpu()
        depth = flow.cell_exit_depth.cpu()
        for i, s in enumerate(self.levels):
            self.class_level[:, i] += cells[level == s].sum(0)
        for j, blk in enumerate(self.exit_blocks):
            self.class_exit[:, j] += cells[depth == blk].sum(0)
        self.class_exit[:, -1] += cells[depth >= self.depth].sum(0)

    def result(self) -> dict[str, Any]:
        n = max(self.images, 1)
        exits = [f"exit_{b}" for b in self.exit_blocks]
        per_class: dict[str, Any] = {}
        for c, name in enumerate(self.class_names):
            tot_l = float(self.class_level[c].sum())
            tot_e = float(self.class_exit[c].sum())
            if tot_l <= 0:
                continue  # the class has no pixel in the set
            per_class[name] = {
                "pixels": tot_l,
                "level": {str(s): float(v) / tot_l for s, v in zip(self.levels, self.class_level[c], strict=True)},
                "exit": {k: float(v) / tot_e if tot_e else None
                         for k, v in zip([*exits, "final"], self.class_exit[c], strict=True)},
            }
        return {
            "images": self.images,
            "tokens_in": self.tokens_in / n,
            "tokens_mean": self.tokens / n,
            "tokens_per_level": {str(s): float(v) / n for s, v in zip(self.levels, self.per_level, strict=True)},
            "tokens_per_block": [float(v) / n for v in self.per_block],
            "halted_per_exit": {k: float(v) / n for k, v in zip(exits, self.halted, strict=True)},
            "halted_fraction_per_exit": {k: float(v) / self.tokens if self.tokens else None
                                         for k, v in zip(exits, self.halted, strict=True)},
            "per_class": per_class,
        }
