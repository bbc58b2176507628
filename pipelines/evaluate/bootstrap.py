"""How sure a measured mIoU drop is: a paired bootstrap over images.

An evaluation keeps one confusion matrix per image (:class:`ImageConfusions`, C x C int64
each: ~1 KB per image for 11 classes). Resampling the *images* with replacement and
summing their matrices gives the confusion matrix, hence the mIoU, of another plausible
validation set of the same size. *Paired*: the reference and the candidate are summed over
the same resample, so the drop's spread holds only what the images change in the
*difference* of the two models, not each model's own spread over images (which is much
larger and mostly shared). mIoU is not a mean over images, so resampling whole matrices
(not per-image IoUs) is what keeps each resample's figure an honest mIoU.

No extra forward pass: all of it is numpy over the kept matrices. mIoU needs only the
diagonal, the row sums and the column sums of a matrix, which add up over images like the
matrix does, so each image is reduced to those 3 x C counts. A resample is a row of counts
(how often each image is drawn), so all resamples at once are one matrix product
``counts (B, n) @ stats (n, 3C)``, in float64: exact for integer sums below 2**53
(101 images x 11 classes, B = 1000: 0.03 s; 2000 x 150: 2.3 s on 2 busy cores).

The interval is the percentile interval of the resampled drops. The seed is fixed, so every
trial of a search is resampled with the *same* image draws, and two trials' intervals are
comparable.

**Frames of a video are not independent draws.** Resampling images one by one assumes they
are; consecutive frames of one recording (CamVid's, Cityscapes' sequences) share their
scene, so a configuration's gain or loss on one frame repeats on its neighbours and the
one-by-one bootstrap is too narrow. ``block`` > 1 is the circular block bootstrap (Politis
and Romano, 1992): the images in key order (frame order within a recording), each resample
made of ``ceil(n / block)`` runs of ``block`` consecutive images from uniformly drawn
starts (wrapping round), cut to ``n`` images. ``block="auto"`` takes ``round(n ** (1/3))``,
the rate of the block length that minimises the error of a bootstrap variance (Hall,
Horowitz and Jing, 1995): 4 for 50-76 images, 5 for 101. ``block=1`` is the one-by-one
bootstrap with the draws it always had.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

DropMode = Literal["points", "relative"]
Block = int | Literal["auto"]


@dataclass(frozen=True)
class ImageConfusions:
    """Per-image confusion matrices of one evaluation, in the order the images came."""

    keys: tuple[str, ...] | None  # sample keys (None: the loader gave none)
    matrices: np.ndarray  # (n, C, C) int64, rows = ground truth, columns = prediction

    def __post_init__(self) -> None:
        m = self.matrices
        if m.ndim != 3 or m.shape[1] != m.shape[2]:
            raise ValueError(f"matrices must be (n, C, C), got {m.shape}")
        if self.keys is not None and len(self.keys) != m.shape[0]:
            raise ValueError(f"{len(self.keys)} keys for {m.shape[0]} matrices")

    def __len__(self) -> int:
        return int(self.matrices.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.matrices.shape[1])

    def miou(self) -> float:
        return float(miou_of(self.matrices.sum(0)))

    def subset(self, keep) -> ImageConfusions:
        """The images whose key ``keep(key)`` accepts (needs keys)."""
        if self.keys is None:
            raise ValueError("selecting images by key needs the keys of the evaluation")
        idx = [i for i, k in enumerate(self.keys) if keep(k)]
        return ImageConfusions(tuple(self.keys[i] for i in idx), self.matrices[idx])


def class_stats(cms: np.ndarray) -> np.ndarray:
    """(..., C, C) matrices -> (..., 3, C): true positives, ground-truth and predicted
    pixels per class; all mIoU needs, and additive over images."""
    cms = np.asarray(cms)
    return np.stack([np.diagonal(cms, axis1=-2, axis2=-1), cms.sum(-1), cms.sum(-2)], axis=-2)


def miou_of(cms: np.ndarray) -> np.ndarray:
    """mIoU of each (C, C) matrix in ``cms`` (shape (..., C, C) -> (...)); classes absent
    from both ground truth and prediction are left out of the mean, as in
    :func:`pipelines.evaluate.metrics.scores_from_confusion`; NaN when none is present."""
    return miou_of_stats(class_stats(cms))


def miou_of_stats(stats: np.ndarray) -> np.ndarray:
    """mIoU from :func:`class_stats` (..., 3, C) -> (...)."""
    stats = np.asarray(stats, dtype=np.float64)
    tp, gt, pr = stats[..., 0, :], stats[..., 1, :], stats[..., 2, :]
    union = gt + pr - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), 0.0)
    n = present.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, iou.sum(-1) / np.maximum(n, 1), np.nan)


def drop_of(reference: np.ndarray | float, candidate: np.ndarray | float,
            mode: DropMode = "points") -> np.ndarray:
    """The drop in percent, as :func:`pipelines.tune.pareto.miou_drop` defines it."""
    reference, candidate = np.asarray(reference, float), np.asarray(candidate, float)
    if mode == "points":
        return 100.0 * (reference - candidate)
    if mode == "relative":
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(reference > 0, 100.0 * (reference - candidate) / reference, np.nan)
    raise ValueError(f"drop mode must be 'points' or 'relative', got {mode!r}")


def resample_indices(n: int, samples: int, seed: int, block: int = 1) -> np.ndarray:
    """(samples, n) image indices drawn with replacement, in runs of ``block`` consecutive
    indices from uniform starts, wrapping round (``block`` 1: one by one); the same for a
    given seed."""
    rng = np.random.default_rng(seed)
    if block <= 1:
        return rng.integers(0, n, size=(samples, n))
    runs = -(-n // block)
    starts = rng.integers(0, n, size=(samples, runs, 1))
    return ((starts + np.arange(block)) % n).reshape(samples, runs * block)[:, :n]


def block_length(block: Block, n: int) -> int:
    """The run length ``block`` means for ``n`` images (``auto``: ``round(n ** (1/3))``)."""
    if block == "auto":
        return max(1, round(n ** (1 / 3)))
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer or 'auto', got {block!r}")
    return block


def resample_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """(samples, n): how often each image is drawn in each resample."""
    samples = indices.shape[0]
    flat = (np.arange(samples)[:, None] * n + indices).ravel()
    return np.bincount(flat, minlength=samples * n).reshape(samples, n)


@dataclass(frozen=True)
class DropInterval:
    drop: float  # on the images themselves
    lo: float
    hi: float
    confidence: float
    samples: int
    images: int
    block: int = 1  # run length of the resamples (1: image by image)

    def to_dict(self) -> dict[str, Any]:
        return {"drop": self.drop, "drop_lo": self.lo, "drop_hi": self.hi,
                "confidence": self.confidence, "bootstrap_samples": self.samples,
                "bootstrap_block": self.block, "num_images": self.images}


def check_paired(reference: ImageConfusions, candidate: ImageConfusions) -> None:
    """The two evaluations must cover the same images in the same order."""
    if reference.matrices.shape != candidate.matrices.shape:
        raise ValueError(f"the reference has {len(reference)} images of "
                         f"{reference.num_classes} classes, the candidate {len(candidate)} of "
                         f"{candidate.num_classes}: not the same evaluation set")
    if reference.keys is not None and candidate.keys is not None \
            and reference.keys != candidate.keys:
        first = next(i for i, (a, b) in enumerate(zip(reference.keys, candidate.keys,
                                                       strict=True)) if a != b)
        raise ValueError(f"the candidate evaluated other images than the reference (image "
                         f"{first}: {candidate.keys[first]!r}, reference "
                         f"{reference.keys[first]!r})")


def bootstrap_drops(reference: ImageConfusions, candidate: ImageConfusions, *,
                    mode: DropMode = "points", samples: int = 1000, seed: int = 0,
                    block: Block = 1, chunk: int = 256) -> np.ndarray:
    """The drop of each of ``samples`` paired resamples (NaN where undefined); ``block``:
    see the module's docstring (runs of consecutive images in key order)."""
    check_paired(reference, candidate)
    n, c = len(reference), reference.num_classes
    if n == 0:
        raise ValueError("no images to resample")
    length = block_length(block, n)
    order = np.arange(n)
    if length > 1:
        if reference.keys is None:
            raise ValueError("a block bootstrap runs over the images in key order: the "
                             "evaluation kept no sample keys")
        order = np.argsort(np.asarray(reference.keys), kind="stable")
    counts = resample_counts(resample_indices(n, samples, seed, length), n)
    ref = class_stats(reference.matrices[order]).reshape(n, 3 * c).astype(np.float64)
    cand = class_stats(candidate.matrices[order]).reshape(n, 3 * c).astype(np.float64)
    out = np.empty(samples)
    for start in range(0, samples, chunk):  # bounded memory: chunk x 3C per model
        w = counts[start:start + chunk].astype(np.float64)
        r = miou_of_stats((w @ ref).reshape(-1, 3, c))
        k = miou_of_stats((w @ cand).reshape(-1, 3, c))
        out[start:start + chunk] = drop_of(r, k, mode)
    return out


def paired_bootstrap(reference: ImageConfusions, candidate: ImageConfusions, *,
                     mode: DropMode = "points", samples: int = 1000,
                     confidence: float = 0.95, seed: int = 0,
                     block: Block = 1) -> DropInterval:
    """The drop of ``candidate`` against ``reference`` and its percentile interval
    (``block``: runs of consecutive images, see the module's docstring)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    drops = bootstrap_drops(reference, candidate, mode=mode, samples=samples, seed=seed,
                            block=block)
    tail = 100 * (1 - confidence) / 2
    finite = drops[np.isfinite(drops)]
    lo, hi = (np.percentile(finite, [tail, 100 - tail]) if finite.size
              else (np.nan, np.nan))
    point = drop_of(reference.miou(), candidate.miou(), mode)
    return DropInterval(drop=float(point), lo=float(lo), hi=float(hi), confidence=confidence,
                        samples=samples, images=len(reference),
                        block=block_length(block, len(reference)))
