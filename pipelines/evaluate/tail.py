"""The drop on the images a candidate hurts most: a look past the mean.

A mean drop within the limit can hide a tenth of the images that lose far more, and a
change of conditions (a recording at dusk, another city) is made of such images. The
*tail drop* at fraction ``alpha`` is the mIoU drop measured on the ``ceil(alpha * n)``
images whose accuracy the candidate lowers most, their confusion matrices pooled per model.

Why this measure:

* **What ranks the images: the per-image drop in pixel accuracy.** Per-image mIoU is
  noisy on small images and small objects: a class with 40 pixels in an image swings its
  IoU, and that image's mIoU, by 1/C for one pole more or less. Pixel accuracy counts
  every labelled pixel once (~170 k in a CamVid image), so its per-image drop is stable,
  and it is paired: a candidate equal to the reference drops exactly 0 on every image.
* **What is measured on them: mIoU, pooled.** The images' matrices are summed per model
  and scored like any evaluation, so the tail drop is in the unit of the limit (mIoU points
  or percent) and is the honest mIoU of that subset, with every class present in the
  subset counted (small classes included), not a mean of noisy per-image figures.
* **Why a worst fraction (CVaR) and not a quantile or the worst image.** The mean loss over
  the worst ``alpha`` of a population is the largest mean loss over *any* subpopulation
  that makes up at least ``alpha`` of it (the CVaR's dual form, the basis of
  distributionally robust evaluation over subpopulations). So "tail drop <= limit" reads
  "no condition covering at least ``alpha`` of the images loses more than the limit",
  which is the statement a change of conditions needs. The worst single image is one
  image's noise; a quantile ignores how bad the tail is.

Pixel-accuracy ranking makes the pooled subset an approximation of the worst subset in
mIoU (finding that exactly is combinatorial); the pixel figure itself is reported too
(``pixel_drop``: the mean per-image pixel-accuracy drop over the same images, the plain
CVaR). Ties go to the sample key, so the subset never depends on evaluation order.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipelines.evaluate.bootstrap import DropMode, ImageConfusions, check_paired, drop_of


def pixel_accuracy(matrices: np.ndarray) -> np.ndarray:
    """(n, C, C) -> (n,) share of each image's labelled pixels predicted right (NaN for an
    image without labelled pixels)."""
    m = np.asarray(matrices, dtype=np.float64)
    total = m.sum(axis=(-2, -1))
    right = np.trace(m, axis1=-2, axis2=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, right / np.maximum(total, 1), np.nan)


def worst_images(reference: ImageConfusions, candidate: ImageConfusions,
                 fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the ``ceil(fraction * n)`` images whose pixel accuracy drops most,
    worst first; every image's pixel-accuracy drop in points). Images without labelled
    pixels are never picked."""
    check_paired(reference, candidate)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    drops = 100.0 * (pixel_accuracy(reference.matrices) - pixel_accuracy(candidate.matrices))
    scored = [i for i in range(len(drops)) if np.isfinite(drops[i])]
    keys = reference.keys or candidate.keys
    # worst first; ties by key (else by position): the same subset in any evaluation order
    scored.sort(key=lambda i: (-drops[i], keys[i] if keys is not None else "", i))
    k = min(len(scored), max(1, math.ceil(fraction * len(drops)))) if scored else 0
    return np.asarray(scored[:k], dtype=np.int64), drops


def tail_drop(reference: ImageConfusions, candidate: ImageConfusions, fraction: float,
              mode: DropMode = "points") -> dict[str, Any]:
    """The tail figures of ``candidate`` against ``reference`` (same images, same order):
    ``drop`` (pooled mIoU drop on the worst ``fraction``), ``pixel_drop`` (their mean
    pixel-accuracy drop, points), ``images`` (how many), ``fraction``, ``keys`` (which)."""
    idx, drops = worst_images(reference, candidate, fraction)
    out: dict[str, Any] = {"fraction": fraction, "images": int(len(idx)), "drop": None,
                           "pixel_drop": None, "keys": []}
    if not len(idx):
        return out
    ref = ImageConfusions(None, reference.matrices[idx])
    cand = ImageConfusions(None, candidate.matrices[idx])
    out.update(drop=float(drop_of(ref.miou(), cand.miou(), mode)),
               pixel_drop=float(np.mean(drops[idx])),
               keys=[reference.keys[i] for i in idx] if reference.keys is not None else [])
    return out
