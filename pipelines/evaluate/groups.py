"""mIoU and drop per group (recording, city: ``data.groups``), and the worst group.

Built on the per-image confusion matrices an evaluation keeps (:class:`ImageConfusions`,
``EvalOptions(per_image=True)``): a group's figure is the mIoU of its images'
summed matrices, so no image is evaluated twice and every group's figure is an honest
mIoU of its own images. Groups come out sorted by name, so reports and JSON never depend
on the order images were read in.

The *worst group* is the one with the largest drop among the groups of at least
``min_images`` images: the mIoU of a handful of images swings with one object more or
less, so smaller groups are shown but do not decide the verdict.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pipelines.evaluate.bootstrap import DropMode, ImageConfusions, check_paired, drop_of

MIN_IMAGES = 10


def group_indices(images: ImageConfusions, grouper: Callable[[str], str]) -> dict[str, list[int]]:
    """{group: indices of its images}, groups sorted by name."""
    if images.keys is None:
        raise ValueError("figures per group need the sample keys of the evaluation")
    out: dict[str, list[int]] = {}
    for i, key in enumerate(images.keys):
        out.setdefault(grouper(key), []).append(i)
    return dict(sorted(out.items()))


def group_miou(images: ImageConfusions, grouper: Callable[[str], str]) -> dict[str, dict[str, Any]]:
    """{group: {images, miou}} of one evaluation."""
    return {g: {"images": len(idx), "miou": ImageConfusions(None, images.matrices[idx]).miou()}
            for g, idx in group_indices(images, grouper).items()}


def group_drops(reference: ImageConfusions, candidate: ImageConfusions,
                grouper: Callable[[str], str], mode: DropMode = "points"
                ) -> dict[str, dict[str, Any]]:
    """{group: {images, reference_miou, miou, drop}} of ``candidate`` against ``reference``
    (the same images in the same order)."""
    check_paired(reference, candidate)
    out = {}
    for g, idx in group_indices(reference, grouper).items():
        r = ImageConfusions(None, reference.matrices[idx]).miou()
        c = ImageConfusions(None, candidate.matrices[idx]).miou()
        out[g] = {"images": len(idx), "reference_miou": r, "miou": c,
                  "drop": float(drop_of(r, c, mode))}
    return out


def worst_group(drops: dict[str, dict[str, Any]], min_images: int = MIN_IMAGES
                ) -> tuple[str, float] | None:
    """(group, drop) with the largest drop among groups of >= ``min_images`` images (ties:
    the first by name); None when no group is that large."""
    best: tuple[str, float] | None = None
    for g, f in drops.items():
        d = f.get("drop")
        if f["images"] < min_images or d is None or not np.isfinite(d):
            continue
        if best is None or d > best[1]:
            best = (g, float(d))
    return best
