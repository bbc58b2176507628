"""Exit thresholds with a bound on what halting costs: conformal risk control per exit.

The search picks exit thresholds that keep the mIoU drop within a limit on average over
the searched images; nothing bounds what halting costs a *new* image. Conformal risk
control (Angelopoulos, Bates, Fisch, Lei and Schuster, "Conformal risk control", ICLR 2024)
chooses a threshold from calibration images so that, for a new image exchangeable with
them, the *expected* loss is at most a chosen ``alpha``, whatever the model:

    lambda_hat = min { lambda : (n * R_n(lambda) + B) / (n + 1) <= alpha }

for a loss L_i(lambda) in [0, B] that does not increase with lambda, R_n its mean over the
n calibration images. Here:

* **The loss of an image at exit k** is the share of its labelled pixels that halting at
  exit k makes wrong: over the tokens that reach exit k and halt there (score >= lambda),
  the pixels the model gets right without halting less those it gets right with the exit's
  prediction, each token's difference floored at 0 (a token whose exit prediction is as good
  costs nothing; one that gains does not pay for another's loss), divided by the image's
  labelled pixels. In [0, 1] (B = 1); a higher threshold halts fewer tokens, so the loss
  does not increase. Pixels, not mIoU: mIoU is not a sum over images, a per-image loss must
  be, and pixel accuracy is what a halted token's prediction is right or wrong on.
* **Exits in order**, each with ``alpha / K`` (K exits): the expected costs add up to at
  most ``alpha``. Exit k is fitted on the tokens that the thresholds already chosen for the
  exits before it let through.
* **Measured without halting**: one forward per batch with every exit head on every token
  (as the temperature fit: nothing halts), then the thresholds on a grid of 0.01, all at
  once. What this leaves out, in the safe direction or documented: ``top_k`` keeps tokens
  active that the threshold alone would halt (fewer halts: the loss can only be lower); the
  active tokens lose context when others halt (not in this loss: ``step analyze
  --halting-only`` measures the whole drop at the chosen thresholds).

The guarantee holds for images exchangeable with the calibration ones: new frames of the
recordings calibrated on, not a recording at dusk. ``docs/camvid.md`` measures both.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.common.data import batch_to_device
from pipelines.common.errors import InvalidInput
from step_model.config import IGNORE_INDEX, PATCH

GRID = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)  # candidate thresholds
LOSS_BOUND = 1.0  # B: a share of an image's pixels


@dataclass
class ExitTokens:
    """One image's tokens at one exit: ``score`` (n,) in [0, 1] (-1 where the score lets
    no token halt: ``agreement`` without agreement), ``cost`` (n,) pixels that halting
    there makes wrong (>= 0)."""

    score: torch.Tensor
    cost: torch.Tensor


@dataclass
class ImageTokens:
    """What one calibration image contributes: its labelled pixels and, per exit, its
    tokens."""

    pixels: int
    exits: list[ExitTokens]


def image_tokens(model, images: torch.Tensor, labels: torch.Tensor) -> list[ImageTokens]:
    """Per image of the batch: labelled pixels and, per exit, each token's exit score
    (the model's ``exit_score`` and ``exit_temperature``) and cost (module docstring);
    every token reaches every exit (nothing halts). On the CPU."""
    from pipelines.evaluate.temperature import every_exit_on_every_token
    from step_model.exits import exit_scores

    inf = model.inference
    temps = inf.temperatures_per_exit(len(model.exit_blocks))
    tokens, encoded = every_exit_on_every_token(model, images, labels)
    with torch.no_grad():
        final, _ = model.forward_head(tokens, encoded)
        exit_pixels = [model.pixel_logits(tokens, logits.float())
                       for logits in encoded.exit_logits]
    h, w = labels.shape[-2:]
    labelled = labels != IGNORE_INDEX
    right_final = (final.argmax(1) == labels) & labelled
    gw = tokens.layout.grid[1]
    cells = ((torch.arange(h, device=labels.device) // PATCH)[:, None] * gw
             + (torch.arange(w, device=labels.device) // PATCH)[None, :]).reshape(-1)
    token_of_pixel = tokens.layout.cell_to_token[:, cells]  # (B, H*W)
    n_tok = tokens.num_tokens
    out = []
    prev = None
    per_exit = []
    for e, (logits, pixel_logits) in enumerate(zip(encoded.exit_logits, exit_pixels,
                                                   strict=True)):
        score, pred, eligible = exit_scores(logits, inf.exit_score, temps[e], previous=prev)
        prev = pred
        right_exit = (pixel_logits.argmax(1) == labels) & labelled
        diff = (right_final.long() - right_exit.long()).reshape(len(labels), -1)
        net = torch.zeros(len(labels), n_tok, dtype=torch.long, device=labels.device)
        net.scatter_add_(1, token_of_pixel, diff)
        score = torch.where(eligible & encoded.exit_valid[e], score.double(), -1.0)
        per_exit.append((score.cpu(), net.clamp(min=0).double().cpu()))
    for b in range(len(labels)):
        n = int(tokens.layout.num_tokens[b])
        out.append(ImageTokens(int(labelled[b].sum()),
                               [ExitTokens(s[b, :n], c[b, :n]) for s, c in per_exit]))
    return out


def _reaching(im: ImageTokens, exit_index: int, thresholds_before: list[float]) -> torch.Tensor:
    """(n,) bool: the image's tokens that no earlier exit halts."""
    reach = torch.ones_like(im.exits[exit_index].score, dtype=torch.bool)
    for j, t in enumerate(thresholds_before):
        reach &= im.exits[j].score < t
    return reach


def image_losses(images: list[ImageTokens], exit_index: int,
                 thresholds_before: list[float], grid: torch.Tensor = GRID) -> torch.Tensor:
    """(n images, len(grid)): each image's loss at exit ``exit_index`` for every candidate
    threshold of ``grid``, its tokens reaching the exit under ``thresholds_before`` (one
    per earlier exit)."""
    rows = []
    for im in images:
        ex = im.exits[exit_index]
        score = torch.where(_reaching(im, exit_index, thresholds_before), ex.score, -1.0)
        halted = score[None, :] >= grid[:, None]  # (grid, n)
        rows.append((halted.double() * ex.cost[None, :]).sum(1) / max(im.pixels, 1))
    return torch.stack(rows)


def crc_threshold(losses: torch.Tensor, alpha: float, bound: float = LOSS_BOUND
                  ) -> tuple[float | None, int]:
    """The smallest candidate threshold whose conformal bound ``(n R_n + B) / (n + 1)`` is
    at most ``alpha``, and its index in :data:`GRID`; (None, -1) when none is (n too small
    for this alpha: B / (n + 1) > alpha)."""
    n = losses.shape[0]
    bound_at = (n * losses.mean(0) + bound) / (n + 1)
    ok = (bound_at <= alpha).nonzero()
    if len(ok) == 0:
        return None, -1
    # the loss does not increase with the threshold: from the first threshold that is
    # within alpha, every higher one is too (checked, so a non-monotone loss is caught)
    i = int(ok[0])
    if not bool((bound_at[i:] <= alpha + 1e-12).all()):
        raise AssertionError("the halting loss increased with the threshold")
    return float(GRID[i]), i


def fit_exit_thresholds(model, loader: Iterable, alpha: float, *,
                        device: str | torch.device = "cpu") -> dict[str, Any]:
    """Conformal risk control of every exit of ``model`` on the images of ``loader``
    (module docstring). Returns {"images", "alpha", "exit_thresholds" (the flag's text),
    "exits": [{"block", "alpha", "threshold", "feasible", "bound", "empirical",
    "halted_tokens"}]}; an exit where no threshold is feasible gets 1.0 (halting all but
    off: only tokens of score exactly 1 halt) and ``feasible`` False."""
    if not 0.0 < alpha < 1.0:
        raise InvalidInput(f"halting_risk: expected a share of pixels in (0, 1), got {alpha}")
    blocks = list(model.exit_blocks)
    if not blocks:
        raise InvalidInput("the model has no exits: no threshold to fit")
    model.eval()
    images: list[ImageTokens] = []
    for batch in loader:
        x, y = batch_to_device(batch[0], batch[1], device)
        images.extend(image_tokens(model, x, y))
    if not images:
        raise InvalidInput("no calibration image was read")
    per_exit = alpha / len(blocks)
    chosen: list[float] = []
    exits = []
    n = len(images)
    for e, block in enumerate(blocks):
        losses = image_losses(images, e, chosen)
        threshold, i = crc_threshold(losses, per_exit)
        feasible = threshold is not None
        if not feasible:
            threshold, i = 1.0, len(GRID) - 1
        chosen.append(threshold)
        halted = sum(int((_reaching(im, e, chosen[:-1]) & (im.exits[e].score >= threshold)).sum())
                     for im in images)
        tokens = sum(len(im.exits[e].score) for im in images)
        exits.append({"block": block, "alpha": per_exit, "threshold": threshold,
                      "feasible": feasible,
                      "bound": float((n * losses[:, i].mean() + LOSS_BOUND) / (n + 1)),
                      "empirical": float(losses[:, i].mean()),
                      "halted_tokens": halted / max(tokens, 1)})
    return {"images": n, "alpha": alpha, "method": "conformal risk control",
            "exit_thresholds": ",".join(f"{t:.2f}" for t in chosen), "exits": exits}


def realised_risk(images: list[ImageTokens], thresholds: list[float]) -> list[float]:
    """The mean loss per exit of ``images`` at ``thresholds``: what the bound promises on
    new images, measured on images that were not calibrated on."""
    return [float(image_losses(images, e, thresholds[:e],
                               torch.tensor([t], dtype=torch.float64)).mean())
            for e, t in enumerate(thresholds)]


def fit_checkpoint(checkpoint_uri: str, data_uri: str, alpha: float, *, inference=None,
                   max_samples: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """:func:`fit_exit_thresholds` of a checkpoint (``inference``: changes to its settings:
    the exit score and temperatures the thresholds are for, the merging) on the first
    ``max_samples`` images of ``data_uri`` (default: all)."""
    from pipelines.evaluate.evaluator import checkpoint_and_loader

    model, _, loader = checkpoint_and_loader(checkpoint_uri, data_uri, inference=inference,
                                             device=device, max_samples=max_samples)
    doc = fit_exit_thresholds(model, loader, alpha, device=device)
    settings = model.inference.to_dict()
    settings["exit_thresholds"] = [e["threshold"] for e in doc["exits"]]
    return {**doc, "inference": settings}
