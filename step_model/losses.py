"""Training losses of the two stages (the stages and their schedules: docs/training.md).

* Policy (stage 1): binary cross-entropy per level against :func:`policy_targets`.
* Segmenter (stage 2): pixel cross-entropy with the ignore index, plus, for every exit, an
  auxiliary cross-entropy of the exit head against each token's *majority* label (the most
  frequent non-ignore class of the pixels it covers; all-ignore tokens are ignored), over the
  tokens present at that exit, weighted by ``exits.aux_weight`` and averaged over exits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import IGNORE_INDEX, LEVELS, StepConfig
from .model import StepOutput, pad_to_patch
from .policy import cell_histogram, policy_targets


def token_majority_labels(
    labels: torch.Tensor, cell_to_token: torch.Tensor, n_tokens: int, num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """(B, n_tokens) majority class per token; ``ignore_index`` where no pixel is labelled."""
    _, labels = pad_to_patch(labels[:, None].float(), labels)
    cells = cell_histogram(labels, num_classes, ignore_index)
    b = cells.shape[0]
    cells = cells.view(b, -1, num_classes)
    hist = cells.new_zeros(b, n_tokens, num_classes)
    hist.scatter_add_(1, cell_to_token[..., None].expand(-1, -1, num_classes), cells)
    major = hist.argmax(-1)
    return torch.where(hist.sum(-1) > 0, major, torch.full_like(major, ignore_index))


def step_loss(out: StepOutput, labels: torch.Tensor, cfg: StepConfig) -> dict[str, torch.Tensor]:
    """{"seg", "exit_<block>" ..., "total"}; ``total`` is what to back-propagate."""
    losses = {"seg": F.cross_entropy(out.logits.float(), labels, ignore_index=IGNORE_INDEX)}
    total = losses["seg"]
    if out.exit_logits:
        n_tok = out.token_logits.shape[1]
        target = token_majority_labels(labels, out.flow.cell_to_token, n_tok, cfg.num_classes)
        aux = []
        for block, logits, present in zip(out.flow.exit_blocks, out.exit_logits, out.exit_valid, strict=False):
            t = torch.where(present, target, torch.full_like(target, IGNORE_INDEX))
            if bool((t != IGNORE_INDEX).any()):
                term = F.cross_entropy(logits.float().flatten(0, 1), t.flatten(), ignore_index=IGNORE_INDEX)
            else:
                term = logits.sum() * 0.0
            losses[f"exit_{block}"] = term
            aux.append(term)
        total = total + cfg.exits.aux_weight * torch.stack(aux).mean()
    losses["total"] = total
    return losses


def policy_loss(
    policy_logits: dict[int, torch.Tensor], labels: torch.Tensor, purity: float = 1.0,
    ignore_index: int = IGNORE_INDEX, num_classes: int | None = None,
    cell_logits: torch.Tensor | None = None, homogeneity: str = "pixels",
) -> dict[str, torch.Tensor]:
    """{"policy_<s>" per level, "total" (mean over levels)}: BCE against the ground truth.

    ``cell_logits`` (B, C, gh, gw), from a policy that also classifies its cells
    (``patch_features``), adds ``policy_cells``: the cross-entropy of each cell's predicted
    class distribution against its pixels' (cells without a labelled pixel do not count),
    to the total with weight 1."""
    _, labels = pad_to_patch(labels[:, None].float(), labels)
    levels = tuple(s for s in LEVELS if s in policy_logits)
    targets = policy_targets(labels, levels, purity, num_classes, ignore_index, homogeneity)
    losses: dict[str, torch.Tensor] = {}
    for s in levels:
        logit = policy_logits[s].float()
        target = targets[s][:, : logit.shape[1], : logit.shape[2]]
        losses[f"policy_{s}"] = F.binary_cross_entropy_with_logits(logit, target)
    losses["total"] = torch.stack([losses[f"policy_{s}"] for s in levels]).mean()
    if cell_logits is not None:
        hist = cell_histogram(labels, cell_logits.shape[1], ignore_index).float()  # (B, gh, gw, C)
        pixels = hist.sum(-1)
        target = (hist / pixels.clamp_min(1)[..., None]).permute(0, 3, 1, 2)
        gh, gw = target.shape[-2:]
        ce = -(target * cell_logits[..., :gh, :gw].float().log_softmax(1)).sum(1)
        labelled = pixels > 0
        losses["policy_cells"] = (ce * labelled).sum() / labelled.sum().clamp_min(1)
        losses["total"] = losses["total"] + losses["policy_cells"]
    return losses
