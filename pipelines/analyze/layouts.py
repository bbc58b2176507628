"""The layout-quality curve: token count against ceiling, for the oracle and the learned policy.

Only the policy network and the labels are needed (no ViT forward): per batch the policy
runs once, and every setting (oracle purities, learned thresholds and budgets) selects its
layout from the same scores with the model's own selection functions. Each setting sums a
confusion matrix of its painted layout (:mod:`pipelines.analyze.ceiling`) and its tokens
over the whole set, so ``tokens_fraction`` is tokens / grid cells over all images and the
ceiling is one mIoU over all pixels, not a mean of per-image figures.

``predict`` (optional) adds the *predicted* layouts: the oracle's rule at each purity,
applied to a segmenter's own predicted masks instead of the labels. They use no label,
so they are not an upper bound; they say what a policy that knew the classes as well as
that segmenter (its 16-px patch features, every block) would merge, hence how much of
the gap to the oracle a better predictor of classes could close at all
(``predicted_vs_oracle``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines.analyze.ceiling import cell_counts, layout_confusion
from pipelines.evaluate.metrics import scores_from_confusion

ORACLE = "oracle"
PREDICTED = "predicted"
LEARNED = ("threshold", "budget")


@dataclass
class _Acc:
    layout: str
    setting: float
    cm: torch.Tensor
    tokens: int = 0
    cells: int = 0


@dataclass
class LayoutSweep:
    """Accumulates every setting's layouts over batches; :meth:`rows` gives the curve."""

    model: Any  # a StepSegmenter: its policy network and levels
    num_classes: int
    purities: list[float]
    thresholds: list[float]
    budgets: list[float]
    # images (B, 3, H, W) -> predicted masks (B, H, W): the predicted layouts' classes
    predict: Callable[[torch.Tensor], torch.Tensor] | None = None
    accs: list[_Acc] = field(default_factory=list)
    images: int = 0

    def __post_init__(self) -> None:
        settings = ([(ORACLE, p) for p in self.purities]
                    + [("threshold", t) for t in self.thresholds]
                    + [("budget", b) for b in self.budgets]
                    + ([(PREDICTED, p) for p in self.purities] if self.predict else []))
        self.accs = [_Acc(k, float(v), torch.zeros(self.num_classes, self.num_classes,
                                                   dtype=torch.int64)) for k, v in settings]

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(self.model.cfg.policy.levels)

    def update(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        from step_model.model import pad_to_patch

        predicted = None
        if self.predict is not None:
            with torch.no_grad():
                masks = self.predict(images)
            predicted = cell_counts(masks, self.num_classes)  # padded as the labels are
        images, labels = pad_to_patch(images, labels)
        cells = cell_counts(labels, self.num_classes)
        b, gh, gw = cells.shape[:3]
        learned = self._learned_scores(images) if self.thresholds or self.budgets else None
        for acc in self.accs:
            layout = self._layout(acc, predicted if acc.layout == PREDICTED else cells,
                                  learned, (gh, gw), b, images.device)
            acc.cm += layout_confusion(cells, layout.cell_to_token)
            acc.tokens += int(layout.num_tokens.sum())
            acc.cells += b * gh * gw
        self.images += b

    def _learned_scores(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """P(homogeneous) per level, as ``StepSegmenter.select`` computes it."""
        policy = self.model.policy
        was_training = policy.training
        with torch.no_grad():
            logits = policy.eval()(images)
        policy.train(was_training)
        return {s: v.float().sigmoid() for s, v in logits.items()}

    def _layout(self, acc: _Acc, cells, learned, grid, batch: int, device):
        from step_model.policy import homogeneous, window_histogram
        from step_model.selection import build_layout, select_by_budget, select_by_threshold

        if acc.layout in (ORACLE, PREDICTED):  # the same rule, on labels or on predictions
            scores = {s: homogeneous(window_histogram(cells, s), acc.setting).float()
                      for s in self.levels}
            accepted = select_by_threshold(scores, dict.fromkeys(scores, 0.5), grid)
        elif acc.layout == "threshold":
            accepted = select_by_threshold(learned, dict.fromkeys(learned, acc.setting), grid)
        else:
            accepted = select_by_budget(learned, acc.setting, grid)
        return build_layout(accepted, grid, batch, device)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for acc in self.accs:
            frac = acc.tokens / acc.cells if acc.cells else None
            miou = scores_from_confusion(acc.cm).miou if acc.cells else None
            out.append({
                "layout": acc.layout, "setting": acc.setting, "tokens_fraction": frac,
                "ceiling_miou": miou if miou == miou else None,  # NaN: nothing labelled
                "token_cut": 1.0 / frac if frac else None,
                # the oracle reads the labels: an upper bound, not a policy's result
                "uses_labels": acc.layout == ORACLE,
            })
        return out


def policy_vs_oracle(rows: list[dict[str, Any]], purity: float = 0.95,
                     layouts: tuple[str, ...] = LEARNED) -> dict[str, Any]:
    """The learned policy's token cut as a fraction of the oracle's, at the ceiling the
    oracle reaches with ``purity``: the best cut (grid cells / tokens) among learned
    settings whose ceiling is at least the oracle's, over the oracle's cut. ``layouts``:
    which rows compete (``(PREDICTED,)``: the predicted layouts' figure).

    ``value`` is None (with ``reason``) when the oracle row is missing or no learned setting
    reaches its ceiling; ``best_ceiling`` then names the learned setting that came closest.
    """
    oracle = next((r for r in rows if r["layout"] == ORACLE
                   and abs(r["setting"] - purity) < 1e-9), None)
    learned = [r for r in rows if r["layout"] in layouts and r["ceiling_miou"] is not None
               and r["token_cut"] is not None]
    out: dict[str, Any] = {"value": None, "oracle_purity": purity, "oracle_ceiling": None,
                           "oracle_cut": None, "best": None, "best_ceiling": None,
                           "reason": None}
    if learned:
        top = max(learned, key=lambda r: (r["ceiling_miou"], r["token_cut"]))
        out["best_ceiling"] = _brief(top)
    if oracle is None or oracle["ceiling_miou"] is None:
        out["reason"] = f"no oracle layout at purity {purity} was measured"
        return out
    out["oracle_ceiling"], out["oracle_cut"] = oracle["ceiling_miou"], oracle["token_cut"]
    reaching = [r for r in learned if r["ceiling_miou"] >= oracle["ceiling_miou"] - 1e-12]
    if not reaching:
        kind = "learned" if layouts == LEARNED else "/".join(layouts)
        out["reason"] = (f"no {kind} setting reaches the oracle's ceiling "
                         f"(mIoU {100 * oracle['ceiling_miou']:.2f} %) at purity {purity}")
        return out
    best = max(reaching, key=lambda r: (r["token_cut"], r["ceiling_miou"]))
    out["best"] = _brief(best)
    out["value"] = best["token_cut"] / oracle["token_cut"]
    return out


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r[k] for k in ("layout", "setting", "tokens_fraction", "ceiling_miou", "token_cut")}
