"""dCTS policies that read 16-px patches: ``policy.network: patch_features | patch_entropy``.

**patch_features** (:class:`PatchFeaturePolicy`) predicts the layout from one feature
vector per 16-px cell, the grid the ViT tokenises, in the spirit of its patch embedding:

1. *A factorised patch embedding.* A 4 x 4 / stride 4 convolution embeds 4-px sub-patches
   (``width / 2`` channels, LayerNorm, GELU), a 4 x 4 / stride 4 convolution turns the 16
   sub-patches of a cell into its ``width``-channel vector, and the per-channel standard
   deviation of those 16 sub-patch features is added through a 1 x 1 convolution: an edge
   or a pole inside a cell shows as spread among its sub-patches, which one 16 x 16 filter
   bank of ``width`` filters cannot resolve for every position and orientation (compared
   with a plain 16 x 16 embedding of the same width, at about the same FLOPs:
   docs/camvid.md, "Policies on 16-px patches").
2. *Context over the grid.* ``depth`` ConvNeXt blocks (depthwise 3 x 3, LayerNorm, MLP) on
   the cell grid: each cell sees its neighbours, so that a boundary is judged with the
   regions on both sides.
3. *A cell classifier.* A 1 x 1 convolution gives every cell class logits, trained in stage 1
   against the class distribution of its pixels (``policy_loss``'s ``policy_cells``). The
   binary homogeneity targets say little (one bit per window); the class of each cell is
   what decides whether a window is one region, and it is a dense signal.
4. *Heads that see the window's similarity.* For a level-s window the head (1 x 1 MLP)
   reads the mean, the per-channel standard deviation and the per-channel range (max - min,
   the largest pairwise distance along each channel) of its cells' features and class
   probabilities, not a pooled vector alone: a window is homogeneous when its cells are
   alike.

What was taken from the published alternatives:

* ALGM (Norouzi et al., CVPR 2024) merges tokens of a local window after the first
  transformer layer when their cosine similarity passes a threshold. Taken: homogeneity
  read from the *similarity of the window's cells* (the window statistics of 4.). Not
  taken: similarity of the ViT's own tokens with a fixed threshold. A ViT that starts
  from random init (CamVid) has no meaningful similarity before stage 2, and stage 1 runs
  first, so the features here are the policy's own and the decision is learned.
* APT (Choudhury et al., 2025) gives a region a larger patch when the entropy of its
  grayscale histogram is below a per-scale threshold, coarse to fine over a quadtree.
  Taken: the training-free baseline, **patch_entropy** (:class:`PatchEntropyPolicy`); the
  quadtree is STEP's already.
* CTS (Lu et al., CVPR 2023) and STEP use a separate CNN (EfficientNet-Lite0) trained
  against label-derived homogeneity before the segmenter. Taken: a separate network with
  its own weights and heads per level, trained in stage 1; only its input is the patch
  grid instead of an ImageNet CNN's stride-32 map.

**Its own patch embedding, not the ViT's.** The policy owns its weights and its input
normalisation. (a) Stage 1 runs before the segmenter trains: on CamVid the ViT is a random
init, so its patch embedding holds nothing to read yet. (b) Stage 2 trains the ViT's
patch embedding: a shared embedding would move the input of a frozen policy's heads away
from what they were trained on (and stage 1 would train the segmenter's first layer for
another task). (c) The policy embeds 4-px sub-patches (1.), which the ViT's 16 x 16
filters cannot initialise; with pretrained ViT weights nothing is copied either. The
price is the embedding's FLOPs, counted as the policy's: 0.136 GFLOPs at 480 x 368 for
width 64, depth 2 (about 116 k parameters), against 0.71 for the paper's policy at half
input size.

What the cell classifier and ``policy.homogeneity: cells`` add, measured on CamVid:
docs/camvid.md, "Policies on 16-px patches".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from .config import LEVELS, PATCH
from .policy import check_float_images

SUB_PATCH = 4  # side of the sub-patches the stem embeds: 16 of them per cell


class GridBlock(nn.Module):
    """A ConvNeXt block on the cell grid: depthwise 3 x 3 (the neighbouring cells), LayerNorm,
    pointwise MLP, residual."""

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
    """16-px cell features from a factorised patch embedding, ``depth`` grid blocks, a cell
    classifier and one window-statistics head per level (see the module docstring)."""

    def __init__(self, levels: tuple[int, ...] = LEVELS, width: int = 64, depth: int = 2,
                 num_classes: int = 0) -> None:
        super().__init__()
        self.levels = tuple(levels)
        stem = max(4, width // 2)
        k = PATCH // SUB_PATCH
        self.stem = nn.Sequential(nn.Conv2d(3, stem, SUB_PATCH, stride=SUB_PATCH),
                                  LayerNorm2d(stem), nn.GELU())
        self.embed = nn.Conv2d(stem, width, k, stride=k)
        self.edges = nn.Conv2d(stem, width, 1)
        self.norm = LayerNorm2d(width)
        self.blocks = nn.Sequential(*(GridBlock(width) for _ in range(depth)))
        self.classes = nn.Conv2d(width, num_classes, 1) if num_classes else None
        self.classifies_cells = num_classes > 0
        head_in = 3 * (width + num_classes)
        self.heads = nn.ModuleDict({
            str(s): nn.Sequential(nn.Conv2d(head_in, width, 1), nn.GELU(), nn.Conv2d(width, 1, 1))
            for s in self.levels})
        # its own normalisation (not the ViT's: the two are trained apart)
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5), persistent=False)
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.5), persistent=False)

    def cell_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float [0, 1], H, W multiples of 16 -> (B, width, H/16, W/16)."""
        sub = self.stem((images - self.mean) / self.std)
        k = PATCH // SUB_PATCH
        mean = F.avg_pool2d(sub, k)
        spread = (F.avg_pool2d(sub * sub, k) - mean * mean).clamp_min(1e-6).sqrt()
        return self.blocks(self.norm(self.embed(sub) + self.edges(spread)))

    def forward(self, images: torch.Tensor, with_cells: bool = False):
        """images float [0, 1] (B, 3, H, W) -> {s: logits (B, gh/s, gw/s)}; with
        ``with_cells`` also the cells' class logits (B, num_classes, gh, gw) (stage 1's
        auxiliary loss)."""
        check_float_images(images)
        gh, gw = images.shape[-2] // PATCH, images.shape[-1] // PATCH
        f = self.cell_features(images[..., : gh * PATCH, : gw * PATCH])
        cells = self.classes(f) if self.classes is not None else None
        if cells is not None:
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
