"""Initialise a STEP model from a trained Segmenter (Strudel et al., rstrudel/segmenter).

``init_from: "segmenter:PATH"``, PATH = a ``checkpoint.pth`` (a dict whose ``model`` entry
is the Segmenter's state dict, ``encoder.*`` and ``decoder.*``) or the directory holding
it; the ``variant.yml`` next to it is read when present. The Segmenter checkpoints of the
CTS and ALGM code bases use the same layout.

What maps where (docs/model.md has the table):

- ``encoder.*`` (Segmenter's ViT, timm key names) -> ``encoder.vit.*``; the ImageNet
  classifier ``encoder.head.*`` is dropped;
- ``decoder.*`` (``MaskTransformer`` or ``DecoderLinear``) -> ``decoder.*`` (same names);
- the exit heads and the policy are not in a Segmenter: they keep their fresh init.

Every other key, and every tensor whose shape differs, is an error that names it. The
variant's ``image_size`` sizes the position-embedding table (so ``pos_embed`` is copied,
not resampled) and its ``normalization`` (``vit`` / ``deit``) sets the input mean/std.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .config import INIT_FROM_PREFIX

CHECKPOINT = "checkpoint.pth"
VARIANT = "variant.yml"
# segm/data/utils.py STATS
NORMALIZATION = {
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "deit": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
DROPPED = ("encoder.head.", "encoder.head_dist.")  # ImageNet classifiers, unused by Segmenter
_SHOW = 8


class _VariantLoader(yaml.SafeLoader):
    """Segmenter writes variant.yml with ``yaml.dump``: tuples carry ``!!python/tuple``."""


_VariantLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node))
)


@dataclass
class SegmenterCheckpoint:
    path: Path
    state: dict[str, torch.Tensor]
    net: dict[str, Any] = field(default_factory=dict)  # variant.yml net_kwargs ({} without one)

    @property
    def image_size(self) -> int | tuple[int, int]:
        """The encoder's training size: its ``pos_embed`` grid x 16."""
        size = self.net.get("image_size")
        if isinstance(size, int):
            return size
        if isinstance(size, list | tuple) and len(size) == 2:
            return (int(size[0]), int(size[1])) if size[0] != size[1] else int(size[0])
        pos = self.state.get("encoder.pos_embed")
        if pos is None:
            raise ValueError(f"init_from {self.path}: no encoder.pos_embed in the checkpoint")
        cells = pos.shape[1] - 1 - int("encoder.dist_token" in self.state)
        side = math.isqrt(cells)
        if side * side != cells:
            raise ValueError(f"init_from {self.path}: pos_embed has {cells} cells, not a square "
                             f"grid; put the Segmenter's {VARIANT} next to it")
        return side * int(self.net.get("patch_size", 16))

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        name = self.net.get("normalization")
        if name is None:
            return None
        if name not in NORMALIZATION:
            raise ValueError(f"init_from {self.path}: unknown normalization {name!r} in "
                             f"{VARIANT} (known: {', '.join(NORMALIZATION)})")
        return NORMALIZATION[name]

    def describe(self) -> str:
        net, dec = self.net, self.net.get("decoder") or {}
        if not net:
            return f"no {VARIANT} next to {self.path.name}"
        return (f"Segmenter variant: backbone {net.get('backbone')}, d_model {net.get('d_model')}, "
                f"{net.get('n_layers')} blocks, decoder {dec.get('name')} "
                f"({dec.get('n_layers', '-')} layers), {net.get('n_cls')} classes")


def read_segmenter(spec: str) -> SegmenterCheckpoint:
    """``segmenter:PATH`` -> the checkpoint's state dict and the variant's ``net_kwargs``."""
    path = Path(spec.removeprefix(INIT_FROM_PREFIX)).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"init_from: no such file {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"init_from {path}: not loadable with weights_only=True ({err}); "
                         f"save only the 'model' state dict") from None
    state = data.get("model") if isinstance(data, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("encoder.") for k in state):
        raise ValueError(f"init_from {path}: expected a Segmenter checkpoint, a dict whose "
                         f"'model' holds encoder.* / decoder.* tensors")
    net: dict[str, Any] = {}
    variant = path.parent / VARIANT
    if variant.is_file():
        doc = yaml.load(variant.read_text(), Loader=_VariantLoader)  # noqa: S506 - SafeLoader subclass
        net = dict((doc or {}).get("net_kwargs") or {})
    return SegmenterCheckpoint(path=path, state=state, net=net)


def destination(key: str) -> str | None:
    """The STEP state-dict key for a Segmenter key; None = dropped on purpose."""
    if key.startswith(DROPPED):
        return None
    if key.startswith("encoder."):
        return "encoder.vit." + key.removeprefix("encoder.")
    return key  # decoder.* keeps its name; anything else will not be found


def load_segmenter(model: nn.Module, ckpt: SegmenterCheckpoint) -> list[str]:
    """Copy the Segmenter's encoder and decoder into ``model``; returns the STEP keys set.

    Raises ValueError naming every unmatched, missing or mis-shaped key."""
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unmatched, misshaped = [], []
    for key, value in ckpt.state.items():
        dst = destination(key)
        if dst is None:
            continue
        if dst not in target:
            unmatched.append(key)
        elif tuple(target[dst].shape) != tuple(value.shape):
            misshaped.append(f"{key} {tuple(value.shape)} vs {dst} {tuple(target[dst].shape)}")
        else:
            mapped[dst] = value
    missing = [k for k in target if k.startswith(("encoder.vit.", "decoder.")) and k not in mapped]
    if unmatched or misshaped or missing:
        hints = []
        if "encoder.dist_token" in unmatched:
            hints.append("distilled (DeiT) encoders are not supported")
        seg_mask = any(k.startswith("decoder.cls_emb") for k in ckpt.state)
        own_mask = any(k.startswith("decoder.cls_emb") for k in target)
        if seg_mask != own_mask:
            hints.append(f"the checkpoint's decoder is {'mask' if seg_mask else 'linear'}: "
                         f"set decoder: {'mask' if seg_mask else 'linear'}")
        raise ValueError(
            f"init_from {ckpt.path} does not fit this model ({ckpt.describe()}): "
            + "; ".join(
                f"{len(keys)} {what} {keys[:_SHOW]}"
                for what, keys in (("unmatched keys", unmatched), ("mis-shaped", misshaped),
                                   ("missing keys", missing))
                if keys
            )
            + "".join(f"; {h}" for h in hints)
        )
    model.load_state_dict(mapped, strict=False)
    return sorted(mapped)
