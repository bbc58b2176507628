"""The confusion-matrix metrics agree with an independent implementation (torchmetrics)."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from pipelines.evaluate.metrics import ConfusionMeter, confusion_matrix, scores_from_confusion


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_matches_torchmetrics_with_ignore_pixels(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    num_classes = 7
    meter = ConfusionMeter(num_classes)
    jaccard = MulticlassJaccardIndex(num_classes, average="none", ignore_index=255)
    acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=255)
    for _ in range(3):  # several batches: the meter must accumulate, not overwrite
        target = torch.randint(0, num_classes, (2, 33, 47), generator=g)
        # Skew predictions towards the target so that IoUs are not all ~1/C.
        pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target,
                           torch.randint(0, num_classes, target.shape, generator=g))
        target[torch.rand(target.shape, generator=g) < 0.2] = 255
        meter.update(pred, target)
        jaccard.update(pred, target)
        acc.update(pred, target)
    scores = meter.compute()
    expected = jaccard.compute()
    assert torch.allclose(torch.tensor(scores.per_class_iou, dtype=torch.float64),
                          expected.double(), atol=1e-6)
    assert math.isclose(scores.miou, float(expected.mean()), abs_tol=1e-6)
    assert math.isclose(scores.pixel_accuracy, float(acc.compute()), abs_tol=1e-6)


def test_absent_classes_do_not_count_in_the_mean() -> None:
    target = torch.tensor([[0, 0, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 3]])
    scores = scores_from_confusion(confusion_matrix(pred, target, num_classes=4))
    # class 0: tp 1, union 2; class 1: tp 1, union 2; classes 2, 3 absent (the 3 is ignored)
    assert scores.per_class_iou[:2] == [0.5, 0.5]
    assert all(math.isnan(x) for x in scores.per_class_iou[2:])
    assert scores.miou == 0.5
    assert scores.pixel_accuracy == pytest.approx(2 / 3)


def test_labels_out_of_range_are_an_error() -> None:
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 9, 255]), 4)


def test_majority_class_predictor_is_its_share_over_the_classes_present():
    from pipelines.evaluate.metrics import majority_class_miou, scores_from_confusion

    # ground truth: 6 pixels of class 0, 4 of class 1, none of class 2
    cm = torch.tensor([[5, 1, 0], [2, 2, 0], [0, 0, 0]])
    direct = scores_from_confusion(torch.tensor([[6, 0, 0], [4, 0, 0], [0, 0, 0]])).miou
    assert majority_class_miou(cm.sum(1)) == pytest.approx(direct) == pytest.approx(0.3)
    assert scores_from_confusion(cm).majority_miou == pytest.approx(0.3)
    assert majority_class_miou(torch.zeros(3)) is None
