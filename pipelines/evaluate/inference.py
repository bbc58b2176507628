"""Whole-image and sliding-window inference at any resolution.

``whole`` feeds the image as it is (the model pads to a multiple of 16 and crops back);
``slide`` averages the logits of overlapping square windows (Segmenter / mmseg ``slide``
mode), for images larger than the training crop. With the oracle policy the windows get
their label crops, as the oracle needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

Mode = Literal["whole", "slide"]
Forward = Callable[[Any, torch.Tensor, torch.Tensor | None], Any]


def windows(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of ``crop``-wide windows every ``stride`` pixels, the last one flush
    with the border, so that every pixel is covered."""
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop, stride)) + [size - crop]
    return sorted(set(starts))


def _plain(model, images: torch.Tensor, labels: torch.Tensor | None):
    return model(images, labels)


def predict(model, images: torch.Tensor, labels: torch.Tensor | None, *, mode: Mode = "whole",
            crop_size: int | None = None, stride: int | None = None,
            forward: Forward | None = None):
    """Logits (B, C, H, W) at the input resolution, and the forward outputs used with the
    (y, x) offset of their window. ``forward(model, images, labels)`` runs one window
    (default: the model itself); the evaluator passes one that counts compute."""
    forward = forward or _plain
    if mode == "whole":
        out = forward(model, images, labels)
        return out.logits.float(), [(out, (0, 0))]
    if mode != "slide":
        raise ValueError(f"eval mode must be 'whole' or 'slide', got {mode!r}")
    if not crop_size:
        raise ValueError("slide mode needs crop_size")
    stride = stride or max(1, (2 * crop_size) // 3)
    b, _, h, w = images.shape
    acc: torch.Tensor | None = None
    hits = torch.zeros(1, 1, h, w, device=images.device)
    outs = []
    for y in windows(h, crop_size, stride):
        for x in windows(w, crop_size, stride):
            win = images[..., y:y + crop_size, x:x + crop_size]
            lab = labels[..., y:y + crop_size, x:x + crop_size] if labels is not None else None
            out = forward(model, win, lab)
            logits = out.logits.float()
            if acc is None:
                acc = images.new_zeros(b, logits.shape[1], h, w, dtype=torch.float32)
            acc[..., y:y + win.shape[-2], x:x + win.shape[-1]] += logits
            hits[..., y:y + win.shape[-2], x:x + win.shape[-1]] += 1
            outs.append((out, (y, x)))
    return acc / hits, outs
