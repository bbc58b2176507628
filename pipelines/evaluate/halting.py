"""Per-class halting: for the cells of each ground-truth majority class, the fraction whose
token halted at each exit (last column: ran to the end of the encoder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipelines.evaluate.metrics import IGNORE_INDEX
from step_model.config import PATCH


class ClassHalting:
    """Counts (num_classes, n_exits + 1) of the exit each labelled cell's token halted at,
    by the cell's majority class."""

    def __init__(self, num_classes: int, exit_blocks: list[int], depth: int) -> None:
        self.num_classes = num_classes
        self.exit_blocks = exit_blocks
        self.depth = depth
        self.table = torch.zeros(num_classes, len(exit_blocks) + 1, dtype=torch.float64)

    def add(self, flow, labels_window: torch.Tensor) -> None:
        """Adds the cells of one forward (``flow``) over its window of the labels."""
        from step_model.policy import cell_histogram

        gh, gw = flow.grid
        lab = labels_window
        ph, pw = gh * PATCH - lab.shape[-2], gw * PATCH - lab.shape[-1]
        if ph > 0 or pw > 0:
            lab = F.pad(lab, (0, max(pw, 0), 0, max(ph, 0)), value=IGNORE_INDEX)
        hist = cell_histogram(lab[..., : gh * PATCH, : gw * PATCH], self.num_classes)
        labelled = hist.sum(-1) > 0  # (B, gh, gw)
        major = hist.argmax(-1)
        depth_map = flow.cell_exit_depth
        cols = [depth_map == blk for blk in self.exit_blocks] + [depth_map >= self.depth]
        for j, sel in enumerate(cols):
            m = sel & labelled
            self.table[:, j] += torch.bincount(major[m].flatten().cpu(),
                                               minlength=self.num_classes).double()

    def vector(self) -> torch.Tensor:
        return self.table.flatten()

    def rates(self, reduced: torch.Tensor, names: list[str]) -> dict[str, dict[str, float | None]]:
        """{class name: {exit_<block> | final: fraction}} from the reduced :meth:`vector`;
        classes without labelled cells are left out."""
        table = reduced.reshape(self.num_classes, len(self.exit_blocks) + 1)
        columns = [*(f"exit_{b}" for b in self.exit_blocks), "final"]
        out: dict[str, dict[str, float | None]] = {}
        for c in range(self.num_classes):
            total = float(table[c].sum())
            if total > 0:
                out[names[c]] = {name: float(table[c, j]) / total
                                 for j, name in enumerate(columns)}
        return out
