"""Shared helpers of the step_model tests (tiny models, LoveDA pairs); holds no tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from step_model import ExitConfig, PolicyConfig, StepConfig, build_step_model

LOVEDA = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "real" / "loveda"


def tiny(policy: str = "none", exits: list[int] | None = None, **kw) -> torch.nn.Module:
    """vit_tiny (192 wide, 12 blocks) with a random, untrained policy: fast to build."""
    torch.manual_seed(0)
    exit_kw = kw.pop("exit_kw", {})
    cfg = StepConfig(
        backbone="vit_tiny_patch16_384", num_classes=kw.pop("num_classes", 5),
        policy=PolicyConfig(mode=policy, pretrained=False),
        exits=ExitConfig(blocks=exits or [], **exit_kw), **kw,
    )
    return build_step_model(cfg).eval()


def loveda_pairs() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, image float (1,3,1024,1024), label int64 (1,1024,1024) with 0 -> 255, c -> c-1)."""
    out = []
    for img_path in sorted((LOVEDA / "img_dir").glob("*.png")):
        img = np.asarray(Image.open(img_path).convert("RGB"))
        lab = np.asarray(Image.open(LOVEDA / "ann_dir" / img_path.name)).astype(np.int64)
        lab = np.where(lab == 0, 255, lab - 1)
        out.append((
            img_path.name,
            torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255,
            torch.from_numpy(lab)[None],
        ))
    assert len(out) == 3, f"expected 3 LoveDA fixtures in {LOVEDA}"
    return out


def blocky_labels(h: int, w: int, seed: int) -> torch.Tensor:
    """Random classes per 16-px cell (few homogeneous windows) with one homogeneous square
    of 2 * (seed + 1) cells in the top-left corner: token counts differ with the seed."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, 4, (1, h // 16, w // 16), generator=g)
    side = 2 * (seed + 1)
    cells[:, :side, :side] = 4
    return cells.repeat_interleave(16, 1).repeat_interleave(16, 2)
