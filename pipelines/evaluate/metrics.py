"""Segmentation accuracy from a confusion matrix, reducible across DDP workers.

A confusion matrix (rows = ground truth, columns = prediction) is the one sufficient
statistic for mIoU, per-class IoU and pixel accuracy: workers each fill their own and one
``all_reduce(SUM)`` gives the exact global figures (averaging per-worker mIoUs would not).
Pixels labelled ``ignore_index`` (255 everywhere in this project) are dropped before
counting. Classes absent from both ground truth and prediction have an undefined IoU and
are left out of the mean (NaN in the per-class list), as mmseg and torchmetrics
(``MulticlassJaccardIndex(average="macro")`` ignoring absent classes) do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data_prep.conventions import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts; rows = target, columns = prediction."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target {tuple(target.shape)}")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel() and (int(target.max()) >= num_classes or int(target.min()) < 0):
        raise ValueError(f"target labels outside [0, {num_classes}) and != {ignore_index}")
    idx = target * num_classes + pred.clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def per_image_confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, num_classes, num_classes) int64: one :func:`confusion_matrix` per image of the
    batch (their sum is the batch's matrix), from one ``bincount``."""
    if pred.shape != target.shape or pred.dim() < 2:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target {tuple(target.shape)}"
                         " (or no batch dimension)")
    b = pred.shape[0]
    pred = pred.reshape(b, -1).long()
    target = target.reshape(b, -1).long()
    keep = target != ignore_index
    if bool(keep.any()):
        kept = target[keep]
        if int(kept.max()) >= num_classes or int(kept.min()) < 0:
            raise ValueError(f"target labels outside [0, {num_classes}) and != {ignore_index}")
    cc = num_classes * num_classes
    image = torch.arange(b, device=pred.device).unsqueeze(1).expand_as(pred)
    idx = image * cc + target * num_classes + pred.clamp(0, num_classes - 1)
    return torch.bincount(idx[keep], minlength=b * cc).reshape(b, num_classes, num_classes)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over DDP ranks when torch.distributed is initialised; identity otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # NCCL reduces only CUDA tensors; gloo only CPU ones.
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        work = t.to(device=device, dtype=torch.float64 if t.is_floating_point() else torch.int64)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(t.device, t.dtype)
    return t


@dataclass
class SegScores:
    miou: float
    per_class_iou: list[float]
    pixel_accuracy: float
    mean_accuracy: float
    majority_miou: float | None = None


def majority_class_miou(gt: torch.Tensor) -> float | None:
    """mIoU of the constant predictor that answers the split's most frequent class
    everywhere: the floor a segmenter that learned anything must clear. Its IoU is that
    class's pixel share; every other class present scores 0."""
    total = float(gt.sum())
    if total <= 0:
        return None
    return float(gt.max()) / total / int((gt > 0).sum())


def scores_from_confusion(cm: torch.Tensor) -> SegScores:
    cm = cm.double()
    tp = cm.diag()
    gt = cm.sum(1)
    pr = cm.sum(0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    total = cm.sum()
    return SegScores(
        miou=float(torch.nanmean(iou)) if bool((union > 0).any()) else float("nan"),
        per_class_iou=[float(x) for x in iou],
        pixel_accuracy=float(tp.sum() / total) if total > 0 else float("nan"),
        mean_accuracy=float(torch.nanmean(acc)) if bool((gt > 0).any()) else float("nan"),
        majority_miou=majority_class_miou(gt),
    )


class ConfusionMeter:
    """Accumulates a confusion matrix over batches; ``compute()`` reduces across ranks."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.cm += confusion_matrix(pred.detach().cpu(), target.detach().cpu(),
                                    self.num_classes, self.ignore_index)

    def compute(self, reduce: bool = True) -> SegScores:
        cm = all_reduce_sum(self.cm.clone()) if reduce else self.cm
        return scores_from_confusion(cm)
