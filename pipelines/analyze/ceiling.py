"""The ceiling of a token layout: the best mIoU any segmenter can reach on it.

Every token gets the majority label of its pixels and is painted back onto the image; the
painted map is scored against the labels. Painting is done exactly at the granularity of
16 x 16 cells, never per pixel: a cell lies inside one token, so all its pixels receive that
token's label, and its class histogram goes whole into one column of the confusion matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipelines.evaluate.metrics import IGNORE_INDEX
from step_model.config import PATCH


def pad_labels(labels: torch.Tensor) -> torch.Tensor:
    """Pad (B, H, W) labels with the ignore index up to multiples of 16, as the model pads."""
    h, w = labels.shape[-2:]
    ph, pw = (-h) % PATCH, (-w) % PATCH
    return F.pad(labels, (0, pw, 0, ph), value=IGNORE_INDEX) if ph or pw else labels


def cell_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class pixel counts per grid cell: (B, H, W) labels -> (B, gh, gw, C) int64."""
    from step_model.policy import cell_histogram

    return cell_histogram(pad_labels(labels), num_classes)


def token_histograms(cells: torch.Tensor, cell_to_token: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Class pixel counts per token: cells (B, G, C), cell_to_token (B, G) -> (B, n_tokens, C)."""
    c = cells.shape[-1]
    out = cells.new_zeros(cells.shape[0], n_tokens, c)
    return out.scatter_add_(1, cell_to_token[..., None].expand(-1, -1, c), cells)


def layout_confusion(cells: torch.Tensor, cell_to_token: torch.Tensor) -> torch.Tensor:
    """Confusion matrix (rows = label, columns = painted majority label) of a layout.

    cells (B, gh, gw, C) or (B, G, C) pixel counts; cell_to_token (B, G). Ties between
    classes go to the lower class id (argmax's first maximum); tokens with no labelled
    pixel paint nothing that is scored.
    """
    b, c = cells.shape[0], cells.shape[-1]
    cells = cells.reshape(b, -1, c)
    n_tokens = int(cell_to_token.max()) + 1
    major = token_histograms(cells, cell_to_token, n_tokens).argmax(-1)  # (B, N)
    painted = major.gather(1, cell_to_token)  # (B, G): the label every pixel of the cell gets
    key = torch.arange(c, device=cells.device) * c + painted[..., None]  # label * C + painted
    # float64 weights hold pixel counts exactly (< 2**53)
    cm = torch.bincount(key.flatten(), weights=cells.flatten().double(), minlength=c * c)
    return cm.round().long().reshape(c, c).cpu()
