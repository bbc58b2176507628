"""Backbone weights through timm's own loader.

``backbone_weights`` is one of

- a local file in a format timm reads: ``.safetensors``; ``.pth`` / ``.pt`` / ``.bin`` (a
  state dict, or a dict holding one under ``state_dict`` / ``model``); ``.npz`` (original
  JAX/Flax weights such as AugReg's, read by timm's ``_load_weights``);
- ``hf-hub:ORG/NAME``: a Hugging Face hub repository in timm's layout (``config.json`` +
  ``model.safetensors``). With ``HF_HUB_OFFLINE=1`` it is read from the local cache
  (``HF_HOME`` / ``HF_HUB_CACHE``) and nothing is downloaded.

(``s3://`` URIs are resolved by ``pipelines`` to a local copy before they reach here.)

The file is given to timm as ``pretrained_cfg_overlay=dict(file=...)``, so the model keeps
the pretrained config of the backbone's tag (``vit_base_patch16_384.augreg_in21k_ft_in1k``)
or of the hub repository's ``config.json``: that is where the input mean/std come from.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import timm
from torch import nn

HF_HUB = "hf-hub:"
STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
NPZ_SUFFIX = ".npz"
_SHOW = 8  # keys listed per error message
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
    r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)"
)
_SKIP_INIT = ("vision_transformer", "deit")  # timm modules whose ViTs take weight_init="skip"


def create_backbone(name: str, weights: str | None = None, *, overwritten: bool = False,
                    **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, then ``weights`` loaded by timm's loader.

    With weights (or ``overwritten``: the caller copies every tensor itself), timm's random
    init is skipped where the model class allows it: ~2 s for a ViT-Ti on this CPU, a
    minute for a ViT-L, for tensors that are replaced anyway (a missing one is an error).

    Why not ``timm.create_model(name, pretrained=True, ...)`` in one call: with
    ``num_classes=0`` timm drops the classifier and therefore loads *non-strictly*, only
    logging the keys that did not match. The two steps below are the ones ``create_model``
    runs (build with the resolved pretrained config, then ``timm.models.load_pretrained``
    with the model's own checkpoint filter, which also resamples ``pos_embed`` to the grid),
    plus a hook that collects the unmatched keys so that a wrong file fails loudly.
    """
    if (weights or overwritten) and name.split(".")[0] in timm.list_models(module=_SKIP_INIT):
        kwargs.setdefault("weight_init", "skip")
    if weights is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    if weights.startswith(HF_HUB):
        vit = timm.create_model(weights, pretrained=False, **kwargs)
        arch = str(vit.pretrained_cfg.get("architecture") or "")
        if arch != name.split(".")[0]:
            raise ValueError(f"backbone_weights {weights}: the repository holds a {arch!r}, "
                             f"but backbone is {name!r}")
    else:
        path = local_weight_file(weights)
        overlay = {"file": str(path), "custom_load": path.suffix == NPZ_SUFFIX}
        vit = timm.create_model(name, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs)
    _load(vit, weights)
    return vit


def local_weight_file(weights: str) -> Path:
    path = Path(weights).expanduser()
    if "://" in weights:
        raise ValueError(f"backbone_weights {weights}: step_model reads local files and "
                         f"{HF_HUB}ORG/NAME only (s3:// is downloaded by the pipelines)")
    if not path.is_file():
        raise FileNotFoundError(f"backbone_weights: no such file {weights}")
    if path.suffix not in (*STATE_DICT_SUFFIXES, NPZ_SUFFIX):
        raise ValueError(f"backbone_weights {weights}: unknown format {path.suffix!r}; use "
                         f"{', '.join((*STATE_DICT_SUFFIXES, NPZ_SUFFIX))} or {HF_HUB}ORG/NAME")
    return path


def input_stats(vit: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the weights' pretrained config; AugReg and the like use 0.5."""
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean") or (0.5,) * 3, cfg.get("std") or (0.5,) * 3
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _load(vit: nn.Module, weights: str) -> None:
    found: dict[str, list[str]] = {}

    def record(_module: nn.Module, incompatible: Any) -> None:
        found["missing"] = list(incompatible.missing_keys)
        found["unexpected"] = list(incompatible.unexpected_keys)

    handle = vit.register_load_state_dict_post_hook(record)
    try:
        # a .npz goes through the model's load_pretrained (custom_load) and never calls
        # load_state_dict: its missing keys surface as KeyError, bad shapes as RuntimeError
        timm.models.load_pretrained(vit, num_classes=0, filter_fn=_filter_fn(vit), strict=False)
    except KeyError as err:
        raise ValueError(f"backbone_weights {weights}: missing key {err} "
                         f"(for timm model {_arch(vit)})") from None
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"backbone_weights {weights}: does not fit timm model {_arch(vit)}: "
                         f"{_short(err)}") from None
    finally:
        handle.remove()
    classifier = vit.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    # the ImageNet classifier is not part of a segmentation backbone: dropped, never an error
    unexpected = [k for k in found.get("unexpected", [])
                  if not k.startswith(tuple(f"{c}." for c in classifier))]
    missing = found.get("missing", [])
    if missing or unexpected:
        raise ValueError(
            f"backbone_weights {weights} does not match timm model {_arch(vit)}: "
            f"{len(missing)} missing keys {missing[:_SHOW]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:_SHOW]}"
        )


def _short(err: Exception) -> str:
    """torch's one line per mis-shaped tensor, folded to ``key (file shape vs model shape)``."""
    found = _SIZE_MISMATCH.findall(str(err))
    if not found:
        return str(err)
    shown = ", ".join(f"{k} ({a} vs {b})" for k, a, b in found[:_SHOW])
    return f"{len(found)} tensors of another shape (file vs model): {shown}"


def _filter_fn(vit: nn.Module) -> Any:
    # the checkpoint filter that timm's factory passes for this family (ViT: conversions of
    # foreign layouts, patch-embedding and pos_embed resampling to the model's grid)
    return getattr(importlib.import_module(type(vit).__module__), "checkpoint_filter_fn", None)


def _arch(vit: nn.Module) -> str:
    return str(vit.pretrained_cfg.get("architecture") or type(vit).__name__)
