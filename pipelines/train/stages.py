"""What differs between the two trainings, behind one small interface for the train loop.

``policy`` (stage 1) trains ``model.policy`` alone against the homogeneity ground truth;
``step`` (stage 2) trains the segmenter with the policy frozen.

Choices:

* Stage 1 keeps the policy's BatchNorm layers in eval mode (ImageNet statistics; the
  affine parameters still train). Per-GPU batches at 512-1024 px are 1-2 images, far too
  few for batch statistics (mmseg's ``norm_eval``).
* Stage 1 is evaluated by the policy's accuracy against its ground truth, per level, over
  windows that fit the image: plain accuracy and balanced accuracy (the mean of the
  recalls of homogeneous and mixed windows, since at coarse levels most windows are
  mixed), the BCE, and the token count that threshold selection gives on the val set.
* Stage 2 freezes the policy, unless ``policy_finetune.enabled``: then its stage-1 loss
  (weighted) joins the segmenter's, and the model runs it with gradient in every training
  forward, whatever the sharing of the step (so DDP sees its parameters used every step).
  It comes from ``policy_checkpoint`` (its ``policy.*`` tensors; the other tensors of a
  stage-1 checkpoint are untrained and ignored) or is not used at all (oracle / none).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from pipelines.common.data import batch_to_device
from pipelines.common.errors import InvalidInput
from pipelines.train.config import TrainConfig, policy_mismatch


def _freeze_bn(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _val_loader(cfg: TrainConfig):
    from pipelines.common.data import eval_loader

    # samples (not shards) are split across ranks; the cap is global, so every world
    # size evaluates the same images
    return eval_loader(cfg.data.val, batch_size=cfg.data.val_batch_size,
                       num_workers=min(1, cfg.data.num_workers),
                       max_samples=cfg.eval.max_samples)


class PolicyStage:
    name = "policy"

    def prepare(self, model, cfg: TrainConfig) -> None:
        model.requires_grad_(False)
        model.policy.requires_grad_(True)

    def trained_module(self, model):
        return model.policy

    def train_mode(self, model) -> None:
        model.eval()
        model.policy.train()
        _freeze_bn(model.policy)

    def start_finetune(self, model, cfg: TrainConfig) -> None:  # stage 2 only
        pass

    @contextlib.contextmanager
    def step_settings(self, model, cfg: TrainConfig, step: int):  # stage 2 only
        yield

    def losses(self, ddp, model, images, labels, cfg: TrainConfig) -> dict[str, torch.Tensor]:
        from step_model import policy_loss

        pcfg = model.cfg.policy
        if getattr(model.policy, "classifies_cells", False):  # patch_features
            logits, cells = ddp(images, with_cells=True)
        else:
            logits, cells = ddp(images), None
        return policy_loss(logits, labels, purity=pcfg.purity, num_classes=model.cfg.num_classes,
                           cell_logits=cells, homogeneity=pcfg.homogeneity)

    def evaluate(self, model, cfg: TrainConfig, device) -> dict[str, Any]:
        return evaluate_policy(model, _val_loader(cfg), device=device)

    def extra_files(self, model, directory: str | Path) -> None:
        from pipelines.common.checkpoint import unwrap

        state = {k: v.detach().cpu() for k, v in unwrap(model).policy.state_dict().items()}
        torch.save(state, Path(directory) / "policy.pt")


class StepStage:
    name = "step"

    def prepare(self, model, cfg: TrainConfig) -> None:
        if cfg.policy_checkpoint:
            load_policy_weights(model, cfg.policy_checkpoint)
        model.policy.requires_grad_(cfg.policy_finetune.enabled)

    def trained_module(self, model):
        return model

    def train_mode(self, model) -> None:
        model.train()
        model.policy.eval()

    def start_finetune(self, model, cfg: TrainConfig) -> None:
        """DToP's second phase: halting active during training, at the phase's settings
        (the training's, with ``finetune.inference`` applied)."""
        model.set_inference(cfg.finetune.inference, halting=True)
        model.halt_in_training(True)

    @contextlib.contextmanager
    def step_settings(self, model, cfg: TrainConfig, step: int):
        """The optimizer step's sharing and halting: a merge threshold drawn from
        ``sharing_mix.thresholds`` and, in the fine-tuning phase, an exit threshold drawn
        from ``finetune.exit_mix`` (1.0 = off for that step). The phase's settings are
        restored afterwards, so that evaluation and checkpoints keep them."""
        gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
        settings: dict[str, Any] = {}
        if choices := cfg.sharing_mix.thresholds:
            tau = _draw(choices, gen)
            if tau >= 1.0:
                settings["policy_mode"] = "none"
            else:
                settings["merge_thresholds"] = tau  # every level
        if (choices := cfg.finetune.exit_mix) and model.halts_in_training:
            tau = _draw(choices, gen)  # after the sharing draw: its sequence is unchanged
            if tau >= 1.0:
                settings["halting"] = False
            else:
                settings["exit_thresholds"] = tau  # every exit
        with model.inference_scope(**settings):
            yield

    def losses(self, ddp, model, images, labels, cfg: TrainConfig) -> dict[str, torch.Tensor]:
        from step_model import policy_loss, step_loss

        out = ddp(images, labels)
        losses = step_loss(out, labels, model.cfg)
        if cfg.policy_finetune.enabled:
            pcfg = model.cfg.policy
            term = policy_loss(out.policy_logits, labels, purity=pcfg.purity,
                               num_classes=model.cfg.num_classes,
                               homogeneity=pcfg.homogeneity)["total"]
            losses["policy"] = term
            losses["total"] = losses["total"] + cfg.policy_finetune.weight * term
        return losses

    def evaluate(self, model, cfg: TrainConfig, device) -> dict[str, Any]:
        from pipelines.evaluate.evaluator import EvalOptions, evaluate_model

        options = EvalOptions(
            mode=cfg.eval.mode, crop_size=cfg.eval.crop_size or cfg.data.crop_size,
            stride=cfg.eval.stride, max_samples=cfg.eval.max_samples, count_flops=True,
            precision=cfg.train.precision,  # the training's autocast rule
        )
        result = evaluate_model(model, _val_loader(cfg), num_classes=model.cfg.num_classes,
                                device=device, options=options)
        return {k: v for k, v in result.headline().items() if v is not None}

    def extra_files(self, model, directory: str | Path) -> None:
        pass


def _draw(choices: list[float], gen: torch.Generator) -> float:
    return float(choices[int(torch.randint(len(choices), (1,), generator=gen))])


STAGES = {"policy": PolicyStage(), "step": StepStage()}


def get(name: str | None):
    if name not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {name!r}")
    return STAGES[name]


def load_policy_weights(model, uri: str) -> None:
    """Copy the ``policy.*`` tensors of a (stage-1) checkpoint into ``model.policy``."""
    from pipelines.common.checkpoint import (
        check_checkpoint,
        load_state_dict,
        read_configs,
        resolve_checkpoint_dir,
    )

    path = check_checkpoint(resolve_checkpoint_dir(uri))
    # a shape mismatch deep in load_state_dict would not say which setting to change
    differ = policy_mismatch(model.cfg, read_configs(path)[0])
    if differ:
        raise InvalidInput(f"policy_checkpoint {uri} was trained with another policy network; "
                         "set these as in stage 1: " + "; ".join(differ))
    state = load_state_dict(path)
    policy = {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}
    if not policy:
        raise InvalidInput(f"policy_checkpoint {uri}: no policy.* tensors in model.pt")
    model.policy.load_state_dict(policy, strict=True)


@torch.no_grad()
def evaluate_policy(model, loader, *, device, max_samples: int | None = None) -> dict[str, Any]:
    """Policy accuracy against its ground truth, reduced across ranks."""
    from pipelines.evaluate.metrics import all_reduce_sum
    from step_model import policy_targets
    from step_model.model import pad_to_patch

    policy = model.policy
    was = policy.training
    policy.eval()
    levels = tuple(policy.levels)
    taus = model.inference.merge_thresholds
    # per level: tp, tn, fp, fn, bce_sum, windows
    stats = torch.zeros(len(levels), 6, dtype=torch.float64)
    tokens = torch.zeros(3, dtype=torch.float64)  # images, tokens, tokens_in
    seen = 0
    for images, labels in loader:
        if max_samples is not None and seen >= max_samples:
            break
        images, labels = pad_to_patch(*batch_to_device(images, labels, device))
        logits = policy(images)
        targets = policy_targets(labels, levels, model.cfg.policy.purity, model.cfg.num_classes,
                                 homogeneity=model.cfg.policy.homogeneity)
        for i, s in enumerate(levels):
            lg = logits[s].float()
            t = targets[s][:, : lg.shape[1], : lg.shape[2]]
            if not t.numel():
                continue
            pred = lg.sigmoid() >= taus.get(s, 0.5)
            pos = t > 0.5
            stats[i, 0] += float((pred & pos).sum())
            stats[i, 1] += float((~pred & ~pos).sum())
            stats[i, 2] += float((pred & ~pos).sum())
            stats[i, 3] += float((~pred & pos).sum())
            stats[i, 4] += float(torch.nn.functional.binary_cross_entropy_with_logits(
                lg, t, reduction="sum"))
            stats[i, 5] += t.numel()
        layout, _ = model.select(images, None) if model.inference.policy_mode in ("threshold", "budget") \
            else (None, None)
        if layout is not None:
            tokens += torch.tensor([images.shape[0], float(layout.num_tokens.sum()),
                                    images.shape[0] * layout.grid[0] * layout.grid[1]],
                                   dtype=torch.float64)
        seen += images.shape[0]
    if was:
        policy.train()
    stats = all_reduce_sum(stats)
    tokens = all_reduce_sum(tokens)
    out: dict[str, Any] = {}
    accs, baccs, bces = [], [], []
    for i, s in enumerate(levels):
        tp, tn, fp, fn, bce, n = stats[i].tolist()
        if not n:
            continue
        acc = (tp + tn) / n
        recalls = [r for r in (tp / (tp + fn) if tp + fn else None,
                               tn / (tn + fp) if tn + fp else None) if r is not None]
        bacc = sum(recalls) / len(recalls)
        out[f"policy_acc_{s}"], out[f"policy_bacc_{s}"], out[f"policy_bce_{s}"] = acc, bacc, bce / n
        out[f"policy_homogeneous_{s}"] = (tp + fn) / n
        accs.append(acc)
        baccs.append(bacc)
        bces.append(bce / n)
    if accs:
        out["policy_acc"] = sum(accs) / len(accs)
        out["policy_bacc"] = sum(baccs) / len(baccs)
        out["policy_bce"] = sum(bces) / len(bces)
    if tokens[0] > 0:
        out["tokens_mean"] = float(tokens[1] / tokens[0])
        out["tokens_in"] = float(tokens[2] / tokens[0])
    return out
