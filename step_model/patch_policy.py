"""A dCTS policy on 16-px patch features (``policy.network: patch_features``).

DRAFT: design notes and measurements are written once the experiments are done.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from .config import LEVELS, PATCH
from .policy import check_float_images


class GridBlock(nn.Module):
    """A ConvNeXt block on the cell grid: depthwise 3x3 (context of the neighbouring
    cells), LayerNorm, pointwise MLP, residual."""

    def __init__(self, width: int, expand: int = 2) -> None:
        super().__init__()
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.norm = LayerNorm2d(width)
        self.mlp = nn.Sequential(nn.Conv2d(width, expand * width, 1), nn.GELU(),
                                 nn.Conv2d(expand * width, width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(self.dw(x)))


def window_stats(f: torch.Tensor, s: int) -> torch.Tensor:
    """Per aligned s x s window of cells: the mean of the cells' features, their per-channel
    standard deviation and range (max - min). (B, C, gh, gw) -> (B, 3C, gh/s, gw/s)."""
    mean = F.avg_pool2d(f, s)
    std = (F.avg_pool2d(f * f, s) - mean * mean).clamp_min(1e-6).sqrt()
    spread = F.max_pool2d(f, s) + F.max_pool2d(-f, s)
    return torch.cat([mean, std, spread], dim=1)


class PatchFeaturePolicy(nn.Module):
    """Cell features from a patch embedding, a few grid blocks, window-statistic heads."""

    def __init__(self, levels: tuple[int, ...] = LEVELS, width: int = 64, depth: int = 2,
                 sub_patch: int = 4, stem_width: int = 32, cell_stats: bool = True,
                 head_hidden: int = 64, num_classes: int = 0, class_stats: bool = False) -> None:
        super().__init__()
        if PATCH % sub_patch:
            raise ValueError(f"sub_patch {sub_patch} must divide {PATCH}")
        self.levels = tuple(levels)
        self.sub_patch = sub_patch
        self.cell_stats = cell_stats and sub_patch < PATCH
        if sub_patch == PATCH:
            self.stem = None
            self.embed = nn.Conv2d(3, width, PATCH, stride=PATCH)
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, stem_width, sub_patch, stride=sub_patch),
                                      LayerNorm2d(stem_width), nn.GELU())
            k = PATCH // sub_patch
            self.embed = nn.Conv2d(stem_width, width, k, stride=k)
            if self.cell_stats:
                self.stats_proj = nn.Conv2d(stem_width, width, 1)
        self.norm = LayerNorm2d(width)
        self.blocks = nn.Sequential(*(GridBlock(width) for _ in range(depth)))
        self.classes = nn.Conv2d(width, num_classes, 1) if num_classes else None
        self.class_stats = class_stats and num_classes > 0
        head_in = 3 * (width + (num_classes if self.class_stats else 0))
        self.heads = nn.ModuleDict({
            str(s): nn.Sequential(nn.Conv2d(head_in, head_hidden, 1), nn.GELU(),
                                  nn.Conv2d(head_hidden, 1, 1))
            for s in self.levels})
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5), persistent=False)
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.5), persistent=False)

    def cell_features(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        if self.stem is None:
            f = self.embed(x)
        else:
            sub = self.stem(x)
            f = self.embed(sub)
            if self.cell_stats:
                k = PATCH // self.sub_patch
                m = F.avg_pool2d(sub, k)
                std = (F.avg_pool2d(sub * sub, k) - m * m).clamp_min(1e-6).sqrt()
                f = f + self.stats_proj(std)
        return self.blocks(self.norm(f))

    def forward(self, images: torch.Tensor, with_cells: bool = False):
        check_float_images(images)
        gh, gw = images.shape[-2] // PATCH, images.shape[-1] // PATCH
        f = self.cell_features(images[..., : gh * PATCH, : gw * PATCH])
        cells = self.classes(f) if self.classes is not None else None
        if self.class_stats:
            f = torch.cat([f, cells.softmax(1)], 1)
        out: dict[int, torch.Tensor] = {}
        for s in self.levels:
            h, w = gh // s, gw // s
            if h == 0 or w == 0:
                out[s] = f.new_zeros(f.shape[0], h, w)
                continue
            out[s] = self.heads[str(s)](window_stats(f[..., : h * s, : w * s], s))[:, 0]
        return (out, cells) if with_cells else out


class PatchEntropyPolicy(nn.Module):
    """The training-free baseline: APT's patch entropy, per window, calibrated per level.

    APT (Choudhury et al., 2025) gives a region a large patch when the Shannon entropy of
    its grayscale histogram (ITU-R 601 luma, binned) is below a per-scale threshold. Here
    the entropy of each aligned window of 16s x 16s pixels becomes a homogeneity logit
    through one affine map per level, ``scale_s * (offset_s - H)``: the only parameters (2
    per level), fitted by stage 1 like the other networks' heads, so that one shared merge
    threshold means the same probability at every level (APT tunes a threshold per scale
    instead). ``bins`` = 64 (APT: 512 over 0..255; 64 and 256 ranked CamVid windows alike).
    The histogram is a ``bincount``: no FLOPs in ``FlopCounterMode``'s sense, a few integer
    operations per pixel.
    """

    def __init__(self, levels: tuple[int, ...] = LEVELS, bins: int = 64) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.bins = bins
        # start: P = 0.5 at 3 bits, falling with entropy; stage 1 fits both per level
        self.offset = nn.Parameter(torch.full((len(self.levels),), 3.0))
        self.scale = nn.Parameter(torch.ones(len(self.levels)))

    @torch.no_grad()
    def entropy(self, images: torch.Tensor, s: int) -> torch.Tensor:
        """Bits per pixel of each aligned (16s x 16s) window's luma histogram: (B, gh/s, gw/s)."""
        luma = 0.2989 * images[:, 0] + 0.5870 * images[:, 1] + 0.1140 * images[:, 2]
        b, side = luma.shape[0], PATCH * s
        h, w = luma.shape[-2] // side, luma.shape[-1] // side
        q = (luma[:, : h * side, : w * side].clamp(0, 1) * (self.bins - 1)).round().long()
        rows = torch.arange(h * side, device=q.device) // side
        cols = torch.arange(w * side, device=q.device) // side
        window = (rows[:, None] * w + cols[None, :]) + torch.arange(b, device=q.device).view(b, 1, 1) * (h * w)
        counts = torch.bincount((window * self.bins + q).flatten(), minlength=b * h * w * self.bins)
        p = counts.view(b, h, w, self.bins).float() / (side * side)
        return -(p * torch.log2(p.clamp_min(1e-12))).sum(-1)

    def forward(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        check_float_images(images)
        return {s: self.scale[i] * (self.offset[i] - self.entropy(images.float(), s))
                for i, s in enumerate(self.levels)}
