"""Temperature scaling of the exit heads: one temperature per exit, fitted on images.

Which tokens halt is decided by the exit heads' probabilities (``inference.exit_score``),
and the heads can be overconfident, most of all on images unlike their training ones.
Temperature scaling (Guo et al., 2017, "On calibration of modern neural networks")
divides an exit's logits by one number T, fitted to minimise the negative log-likelihood
(NLL) on held-out images: every prediction (argmax) stays, only how sure the scores are
changes. The fitted values are ``inference.exit_temperature``.

Design choices:

* **Targets**: each token's majority label (the most frequent labelled class of its
  pixels), the target the exit heads were trained on
  (:func:`step_model.losses.token_majority_labels`); tokens with no labelled pixel are
  left out.
* **Halting off**, so that every token reaches every exit and a later exit is fitted on
  all the tokens, not only on those that earlier exits let through (which depend on the
  thresholds being fitted for). In evaluation the exit heads run only while halting is
  on, so the forward asks the ablation's count hook to halt zero tokens at every exit
  (:meth:`step_model.StepSegmenter.forward_encoder`'s ``halt_counts``): the heads run,
  nothing halts, no change to the model. The tokens are those of the settings given
  (merging as set): the supertokens the exits will see.
* **One parameter per exit, log T** (T stays positive), fitted by LBFGS with a
  strong-Wolfe line search on all the tokens at once: one scalar, a smooth loss (convex in
  1/T), so a few iterations. log T is bounded to [-4, 4] (T in [0.018, 55]): a head that
  is right on every token with a margin would otherwise drive T to 0.
* Reported per exit, before (T = 1, the raw head) and after: the NLL and the expected
  calibration error (ECE: the token-weighted mean |accuracy - confidence| over 15
  equal-width confidence bins, as torchmetrics' ``multiclass_calibration_error`` with
  ``norm="l1"``).
* ``perturb_levels`` > 0 fits on perturbed copies of the images too
  (:mod:`pipelines.evaluate.perturb`: a temperature meant to hold under domain drift);
  the figures are then over all the copies, and ``clean`` gives the ECE on the images as
  they are, before and after.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from pipelines.common.data import batch_to_device
from pipelines.common.errors import InvalidInput
from step_model.config import IGNORE_INDEX

LOG_T_BOUND = 4.0
ECE_BINS = 15


def every_exit_on_every_token(model, images: torch.Tensor, labels: torch.Tensor):
    """(tokens, encoded) of a forward where the exit heads run and nothing halts: the
    ablation's count hook halts zero tokens at every exit (see the module docstring)."""
    zero = [torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
            for _ in model.exit_blocks]
    with torch.no_grad(), model.inference_scope(halting=True, exit_policy="uniform"):
        tokens = model.forward_tokens(images, labels)
        return tokens, model.forward_encoder(tokens, halt_counts=zero)


def exit_token_logits(model, images: torch.Tensor, labels: torch.Tensor
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per exit, (logits (n, C) float32, majority labels (n,)) of the labelled tokens of
    one batch, every token reaching every exit (nothing halts). On the CPU."""
    from step_model.losses import token_majority_labels

    tokens, encoded = every_exit_on_every_token(model, images, labels)
    target = token_majority_labels(labels, tokens.layout.cell_to_token, tokens.num_tokens,
                                   model.cfg.num_classes)
    out = []
    for logits, present in zip(encoded.exit_logits, encoded.exit_valid, strict=True):
        keep = present & (target != IGNORE_INDEX)
        out.append((logits[keep].float().cpu(), target[keep].cpu()))
    return out


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, max_iter: int = 100) -> float:
    """The T that minimises the NLL of ``logits / T`` (n, C) against ``target`` (n,)."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.clamp(-LOG_T_BOUND, LOG_T_BOUND).exp(), target)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().clamp(-LOG_T_BOUND, LOG_T_BOUND).exp())


def nll(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits / temperature, target))


def calibration_error(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0,
                      bins: int = ECE_BINS) -> float:
    """ECE of the max probability: sum over equal-width confidence bins of
    |correct - confidence| summed in the bin, over all tokens."""
    conf, pred = (logits / temperature).softmax(-1).max(-1)
    edges = torch.linspace(0, 1, bins + 1, dtype=conf.dtype)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, bins - 1)
    right = torch.bincount(idx, weights=(pred == target).double(), minlength=bins)
    sure = torch.bincount(idx, weights=conf.double(), minlength=bins)
    return float((right - sure).abs().sum() / max(len(target), 1))


def fit_exit_temperatures(model, loader: Iterable, *, device: str | torch.device = "cpu",
                          perturb_levels: int = 0) -> dict[str, Any]:
    """Fit one temperature per exit of ``model`` on the images of ``loader`` (its own
    settings, halting aside), and on ``perturb_levels`` perturbed copies of each (module
    docstring). Returns {"images", "exit_temperature" (the flag's text, one value per
    exit), "exits": [{"block", "tokens", "temperature", "nll_before", "nll_after",
    "ece_before", "ece_after"[, "clean"]}]} (+ "perturbation" when perturbed); an exit
    without labelled tokens keeps T = 1 and its figures are None."""
    from pipelines.evaluate.perturb import KINDS, perturbed_copies, strengths

    blocks = list(model.exit_blocks)
    if not blocks:
        raise InvalidInput("the model has no exits: no temperature to fit")
    model.eval()
    # per exit: (the copy is the clean image, logits, targets) of each copy of each batch
    pairs: list[list[tuple[bool, torch.Tensor, torch.Tensor]]] = [[] for _ in blocks]
    images_seen = 0
    for batch in loader:
        images, labels = batch_to_device(batch[0], batch[1], device)
        for kind, _, copy in perturbed_copies(images, images_seen, perturb_levels):
            for acc, (logits, target) in zip(pairs, exit_token_logits(model, copy, labels),
                                             strict=True):
                acc.append((kind == "clean", logits, target))
        images_seen += images.shape[0]
    exits = []
    for block, acc in zip(blocks, pairs, strict=True):
        logits, target = _stack(acc)
        row: dict[str, Any] = {"block": block, "tokens": len(target), "temperature": 1.0}
        if len(target):
            t = fit_temperature(logits, target)
            row.update(temperature=t, nll_before=nll(logits, target),
                       nll_after=nll(logits, target, t),
                       ece_before=calibration_error(logits, target),
                       ece_after=calibration_error(logits, target, t))
            if perturb_levels:
                clean_logits, clean_target = _stack([a for a in acc if a[0]])
                row["clean"] = {"tokens": len(clean_target),
                                "ece_before": calibration_error(clean_logits, clean_target),
                                "ece_after": calibration_error(clean_logits, clean_target, t)}
        else:
            row.update(nll_before=None, nll_after=None, ece_before=None, ece_after=None)
        exits.append(row)
    doc: dict[str, Any] = {"images": images_seen,
                           "exit_temperature": ",".join(f"{r['temperature']:.4g}" for r in exits),
                           "exits": exits}
    if perturb_levels:
        doc["perturbation"] = {"levels": perturb_levels, "kinds": list(KINDS),
                               "strengths": strengths(perturb_levels),
                               "copies_per_image": 1 + perturb_levels}
    return doc


def _stack(acc: list[tuple[bool, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    if not acc:
        return torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)
    return torch.cat([a[1] for a in acc]), torch.cat([a[2] for a in acc])


def fit_checkpoint(checkpoint_uri: str, data_uri: str, *, inference=None,
                   max_samples: int | None = None, device: str = "cpu",
                   perturb_levels: int = 0) -> dict[str, Any]:
    """:func:`fit_exit_temperatures` of a checkpoint (``inference``: changes to its
    settings) on the first ``max_samples`` images of ``data_uri`` (default: all)."""
    from pipelines.evaluate.evaluator import checkpoint_and_loader

    model, _, loader = checkpoint_and_loader(checkpoint_uri, data_uri, inference=inference,
                                             device=device, max_samples=max_samples)
    doc = fit_exit_temperatures(model, loader, device=device, perturb_levels=perturb_levels)
    settings = model.inference.to_dict()
    settings.pop("exit_temperature")  # fitted on the raw heads, whatever was set
    return {**doc, "inference": settings}
