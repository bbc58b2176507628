"""The ViT backbone: any timm ViT with 16 x 16 patches, by name.

STEP never calls the ViT's own ``forward``: it borrows its pieces (patch-embedding conv,
position embeddings resampled to the input grid with timm's own resampler, blocks, final
norm) and runs them on a variable set of (super)tokens. Using timm's resampler keeps the
policy-``none`` path bit-for-bit the plain ``timm`` forward (tested). Pretrained weights
come through timm's own loader (:mod:`step_model.pretrained`); :func:`build_encoder` also
applies ``init_from`` (:mod:`step_model.segmenter_init`).
"""

from __future__ import annotations

import difflib

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from .config import PATCH, StepConfig
from .pretrained import create_backbone, input_stats
from .segmenter_init import SegmenterCheckpoint, read_segmenter


def create_vit(name: str, drop_path_rate: float = 0.0, weights: str | None = None,
               img_size: int | tuple[int, int] | None = None, overwritten: bool = False) -> nn.Module:
    """``timm.create_model(name)`` for a ViT with 16 x 16 patches and any input size.

    ``name`` may carry a pretrained tag (``vit_base_patch16_384.augreg_in21k_ft_in1k``): the
    tag chooses the pretrained config (input mean/std). ``weights``: see
    :mod:`step_model.pretrained`. ``img_size`` sets the size of the position-embedding table
    (default: timm's for the name); inputs of any size still work (resampled per grid).
    """
    arch, _, tag = name.partition(".")
    if arch not in timm.list_models():
        close = difflib.get_close_matches(arch, timm.list_models("vit_*"), n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(f"backbone: unknown timm model {name!r}{hint}")
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise ValueError(f"backbone: timm has no tag {tag!r} for {arch!r}; tags: {', '.join(tags) or 'none'}")
    extra = {} if img_size is None else {"img_size": img_size}
    vit = create_backbone(
        name, weights, overwritten=overwritten, num_classes=0, dynamic_img_size=True,
        drop_path_rate=drop_path_rate, **extra,
    )
    patch = getattr(getattr(vit, "patch_embed", None), "patch_size", None)
    if patch is None or tuple(patch) != (PATCH, PATCH) or not hasattr(vit, "blocks"):
        raise ValueError(f"backbone: {name!r} is not a ViT with {PATCH}x{PATCH} patches")
    if getattr(vit, "pos_embed", None) is None or getattr(vit, "reg_token", None) is not None:
        raise ValueError(f"backbone: {name!r} needs absolute position embeddings and no registers")
    return vit


def build_encoder(cfg: StepConfig) -> tuple[ViTParts, StepConfig, SegmenterCheckpoint | None]:
    """The encoder of ``cfg``; the config with what the weights decided filled in; the
    Segmenter checkpoint to copy once the whole model exists (``init_from``), or None.

    With weights, the position-table size and the mean/std are written into the config: a
    checkpoint is rebuilt without its weight files (``backbone_weights`` and ``init_from``
    cleared) and must still get the same ``pos_embed`` shape and the same normalisation.
    """
    segmenter = read_segmenter(cfg.init_from) if cfg.init_from else None
    img_size = cfg.backbone_img_size or (segmenter.image_size if segmenter else None)
    vit = create_vit(cfg.backbone, cfg.drop_path_rate, cfg.backbone_weights, img_size=img_size,
                     overwritten=segmenter is not None)
    norm = segmenter.normalization if segmenter else None
    encoder = ViTParts(vit, cfg.input_mean or (norm[0] if norm else None),
                       cfg.input_std or (norm[1] if norm else None))
    if cfg.backbone_weights or segmenter:
        h, w = (int(v) for v in vit.patch_embed.img_size)
        cfg = StepConfig.model_validate({
            **cfg.to_dict(), "backbone_img_size": h if h == w else (h, w),
            "input_mean": encoder.input_mean, "input_std": encoder.input_std,
        })
    return encoder, cfg, segmenter


class ViTParts(nn.Module):
    """The borrowed pieces of a timm ViT, plus its input normalisation: ``mean`` / ``std``
    given, else those of the weights' pretrained config (timm ``pretrained_cfg``)."""

    def __init__(self, vit: nn.Module, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None) -> None:
        super().__init__()
        self.vit = vit
        cfg_mean, cfg_std = input_stats(vit)
        self.input_mean, self.input_std = tuple(mean or cfg_mean), tuple(std or cfg_std)
        self.register_buffer("mean", torch.tensor(self.input_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.input_std).view(1, 3, 1, 1), persistent=False)
        self._pos_cache: tuple | None = None

    @property
    def blocks(self) -> nn.Sequential:
        return self.vit.blocks

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def grid_pos_embed(self, gh: int, gw: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(prefix position embedding (1, P, D) or None, grid position embedding (gh*gw, D))."""
        vit = self.vit
        prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        # inference re-uses the resampled table (bicubic + antialias: ~30 ms at 64x64 on
        # this CPU, every forward); the key holds the parameter's version, so an optimizer
        # step or a new state dict invalidates it
        key = (gh, gw, vit.pos_embed._version, vit.pos_embed.data_ptr(), vit.pos_embed.dtype)
        if not torch.is_grad_enabled() and self._pos_cache is not None and self._pos_cache[0] == key:
            pos = self._pos_cache[1]
            return (pos[:, :prefix] if prefix else None), pos[0, prefix:]
        pos = resample_abs_pos_embed(
            vit.pos_embed, new_size=(gh, gw), old_size=vit.patch_embed.grid_size,
            num_prefix_tokens=prefix,
        )
        self._pos_cache = (key, pos.detach()) if not torch.is_grad_enabled() else None
        return (pos[:, :prefix] if prefix else None), pos[0, prefix:]

    def prefix_tokens(self, batch: int) -> torch.Tensor | None:
        vit = self.vit
        if vit.cls_token is None:
            return None
        return vit.cls_token.expand(batch, -1, -1)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch embedding of flattened (…, 3*16*16) pixel patches with the ViT's own conv."""
        proj = self.vit.patch_embed.proj
        return nn.functional.linear(patches, proj.weight.flatten(1), proj.bias)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.norm(x)
