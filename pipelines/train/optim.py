"""AdamW with a head learning-rate multiplier, linear warm-up and polynomial decay.

Choices (Segmenter / mmseg recipes for ViT segmentation):

* **Two lr groups.** The backbone starts from pretrained weights and takes ``lr``; the
  randomly initialised heads (decoder, exit heads, policy heads) take ``lr *
  head_lr_mult``. A parameter is a head parameter unless its name starts with a backbone
  prefix (``backbone.``, ``vit.``, ``encoder.``, or the policy's ``net.`` feature
  extractor).
* **No weight decay** on biases, norms, position embeddings and class/register tokens
  (1-d tensors and the names ``pos_embed``/``cls_token``/``reg_token``), the usual ViT
  practice.
* **Schedule per optimizer step**: ``warmup_ratio -> 1`` linearly over ``warmup_steps``,
  then ``(1 - t)^poly_power`` down to ``min_lr``. The optional fine-tuning phase (halting
  active) restarts a poly decay from ``lr * finetune.lr_scale``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

BACKBONE_PREFIXES = ("backbone.", "vit.", "encoder.", "policy.net.", "net.")
NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token")


def is_head(name: str) -> bool:
    return not name.startswith(BACKBONE_PREFIXES)


def param_groups(named: Iterable[tuple[str, torch.nn.Parameter]], *, lr: float,
                 weight_decay: float, head_lr_mult: float) -> list[dict]:
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and not any(k in name for k in NO_DECAY_NAMES)
        groups.setdefault((is_head(name), decay), []).append(p)
    return [
        {"params": ps, "lr": lr * (head_lr_mult if head else 1.0),
         "weight_decay": weight_decay if decay else 0.0, "lr_mult": head_lr_mult if head else 1.0}
        for (head, decay), ps in sorted(groups.items())
    ]


def lr_factor(step: int, *, base_steps: int, warmup_steps: int, warmup_ratio: float,
              poly_power: float, min_ratio: float, finetune_steps: int = 0,
              finetune_scale: float = 1.0) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based)."""
    if step >= base_steps and finetune_steps:
        t = min(1.0, (step - base_steps) / finetune_steps)
        return finetune_scale * (min_ratio + (1 - min_ratio) * (1 - t) ** poly_power)
    if warmup_steps and step < warmup_steps:
        return warmup_ratio + (1 - warmup_ratio) * step / warmup_steps
    span = max(1, base_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * (1 - t) ** poly_power


def build_optimizer(named, cfg) -> torch.optim.AdamW:
    """``cfg`` is ``TrainConfig.optim``."""
    groups = param_groups(named, lr=cfg.lr, weight_decay=cfg.weight_decay,
                          head_lr_mult=cfg.head_lr_mult)
    if not groups:
        raise ValueError("no trainable parameters")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def build_scheduler(optimizer, optim_cfg, *, base_steps: int, finetune_steps: int = 0,
                    finetune_scale: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    min_ratio = optim_cfg.min_lr / optim_cfg.lr

    def factor(step: int) -> float:
        return lr_factor(step, base_steps=base_steps, warmup_steps=optim_cfg.warmup_steps,
                         warmup_ratio=optim_cfg.warmup_ratio, poly_power=optim_cfg.poly_power,
                         min_ratio=min_ratio, finetune_steps=finetune_steps,
                         finetune_scale=finetune_scale)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
