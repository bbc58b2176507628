"""Calibration of a confidence: reliability table and expected calibration error (ECE).

A prediction's *confidence* (for an exit head: its maximum softmax probability) should
equal the chance that it is right. :class:`Reliability` sorts predictions into equal-width
confidence bins and keeps, per bin, the weight of its predictions, their weighted
confidence and the weight of the right ones; from those come the reliability table (per
bin: weight, mean confidence, accuracy) and

    ECE = sum over bins of (bin weight / total weight) * |accuracy - mean confidence|,

0 for a perfectly calibrated confidence, and the mean confidence against the accuracy.

Every prediction carries a *weight*, and ``correct`` is the part of that weight that is
right: a token's prediction covers many labelled pixels and is right on some of them, so
passing (pixels covered, pixels of its predicted class) measures calibration per pixel
without one sample per pixel. With weight 1 and ``correct`` 0 / 1 it is the usual ECE per
prediction, the same figure as torchmetrics' ``binary_calibration_error`` (same bins:
``linspace(0, 1, n + 1)``, a bin holding its lower edge; a confidence of exactly 1 falls
into the last bin, where torchmetrics opens a bin of its own). torchmetrics itself keeps
every sample until the end and takes no weights, which a pass over whole images at pixel
weight cannot afford; the sums here stream, and merge by addition (groups, ranks).
"""

from __future__ import annotations

from typing import Any

import torch

DEFAULT_BINS = 15


class Reliability:
    """Streaming sums of one confidence, binned: :meth:`add` predictions, :meth:`result`."""

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        self.bins = bins
        self.edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
        # per bin: predictions, weight, weight x confidence, weight right
        self.count = torch.zeros(bins, dtype=torch.float64)
        self.weight = torch.zeros(bins, dtype=torch.float64)
        self.confidence = torch.zeros(bins, dtype=torch.float64)
        self.correct = torch.zeros(bins, dtype=torch.float64)

    def add(self, confidence: torch.Tensor, correct: torch.Tensor,
            weight: torch.Tensor | None = None) -> None:
        """Predictions of confidence ``confidence`` (in [0, 1]), each of weight ``weight``
        (default 1), ``correct`` of which is right (0 / 1 with weight 1)."""
        conf = confidence.detach().reshape(-1).double().cpu()
        right = correct.detach().reshape(-1).double().cpu()
        w = torch.ones_like(conf) if weight is None else weight.detach().reshape(-1).double().cpu()
        if not conf.shape == right.shape == w.shape:
            raise ValueError(f"confidence {tuple(conf.shape)}, correct {tuple(right.shape)} "
                             f"and weight {tuple(w.shape)} differ")
        idx = torch.bucketize(conf, self.edges[1:-1], right=True)
        self.count += torch.bincount(idx, minlength=self.bins).double()
        self.weight.index_add_(0, idx, w)
        self.confidence.index_add_(0, idx, w * conf)
        self.correct.index_add_(0, idx, right)

    def merge(self, other: Reliability) -> Reliability:
        """The sums of both (a new object): a group's figure from its parts."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge {self.bins} bins with {other.bins}")
        out = Reliability(self.bins)
        for name in ("count", "weight", "confidence", "correct"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def ece(self) -> float | None:
        """Expected calibration error; None when nothing was added."""
        total = float(self.weight.sum())
        if total <= 0:
            return None
        return float((self.correct - self.confidence).abs().sum()) / total

    def result(self) -> dict[str, Any]:
        """``{ece, mean_confidence, accuracy, weight, count, bins: {edges, count, weight,
        confidence, accuracy}}``; a bin's mean confidence and accuracy are None when it
        is empty."""
        total = float(self.weight.sum())

        def per_bin(values: torch.Tensor) -> list[float | None]:
            return [float(v) / float(w) if w > 0 else None
                    for v, w in zip(values, self.weight, strict=True)]

        return {
            "ece": self.ece(),
            "mean_confidence": float(self.confidence.sum()) / total if total > 0 else None,
            "accuracy": float(self.correct.sum()) / total if total > 0 else None,
            "weight": total,
            "count": int(self.count.sum()),
            "bins": {"edges": [float(e) for e in self.edges],
                     "count": [int(c) for c in self.count],
                     "weight": [float(w) for w in self.weight],
                     "confidence": per_bin(self.confidence),
                     "accuracy": per_bin(self.correct)},
        }
