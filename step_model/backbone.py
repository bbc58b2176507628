"""The ViT backbone: any timm ViT with 16 x 16 patches, by name.

STEP never calls the ViT's own ``forward``: it borrows its pieces (patch-embedding conv,
position embeddings resampled to the input grid with timm's own resampler, blocks, final
norm) and runs them on a variable set of (super)tokens. Using timm's resampler keeps the
policy-``none`` path bit-for-bit the plain ``timm`` forward (tested).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from .config import PATCH


def create_vit(name: str, drop_path_rate: float = 0.0, weights: str | None = None) -> nn.Module:
    """``timm.create_model(name)`` for a ViT with 16 x 16 patches and any input size."""
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models("vit_*"), n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(f"backbone: unknown timm model {name!r}{hint}")
    vit = timm.create_model(
        name, pretrained=False, num_classes=0, dynamic_img_size=True,
        drop_path_rate=drop_path_rate,
    )
    patch = getattr(getattr(vit, "patch_embed", None), "patch_size", None)
    if patch is None or tuple(patch) != (PATCH, PATCH) or not hasattr(vit, "blocks"):
        raise ValueError(f"backbone: {name!r} is not a ViT with {PATCH}x{PATCH} patches")
    if getattr(vit, "pos_embed", None) is None or getattr(vit, "reg_token", None) is not None:
        raise ValueError(f"backbone: {name!r} needs absolute position embeddings and no registers")
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"backbone_weights: no such file {weights}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        if "pos_embed" in state and state["pos_embed"].shape != vit.pos_embed.shape:
            state["pos_embed"] = resample_abs_pos_embed(
                state["pos_embed"], new_size=vit.patch_embed.grid_size,
                num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens,
            )
        missing, unexpected = vit.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"backbone_weights {weights}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return vit


class ViTParts(nn.Module):
    """The borrowed pieces of a timm ViT, plus its input normalisation."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        cfg = getattr(vit, "pretrained_cfg", {}) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.5,) * 3)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.5,) * 3)).view(1, 3, 1, 1), persistent=False)
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
