"""Evaluation: run a STEP model over a loader and accumulate its confusion and figures.

Accuracy comes from one confusion matrix (:mod:`pipelines.evaluate.metrics`), summed across
DDP ranks when evaluation runs inside Ray Train, so mIoU is exact, not an average of
averages. The other jobs live next door: whole / sliding-window inference
(:mod:`~pipelines.evaluate.inference`), FLOPs, tokens and halting
(:mod:`~pipelines.evaluate.compute`), per-class halting (:mod:`~pipelines.evaluate.halting`),
latency (:mod:`~pipelines.evaluate.latency`), progress (:mod:`~pipelines.evaluate.progress`)
and each rank's share of the images (:mod:`~pipelines.evaluate.ranks`). A rank with no data
at all still joins every reduction with tensors of the same shapes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from pipelines.common.data import batch_to_device
from pipelines.common.errors import InvalidInput
from pipelines.common.precision import Precision, autocast
from pipelines.common.storage import json_safe
from pipelines.evaluate.bootstrap import ImageConfusions
from pipelines.evaluate.compute import ComputeCounter, model_layout
from pipelines.evaluate.halting import ClassHalting
from pipelines.evaluate.inference import Mode, predict
from pipelines.evaluate.latency import LatencyTimer
from pipelines.evaluate.metrics import ConfusionMeter, all_reduce_sum, per_image_confusion
from pipelines.evaluate.progress import EvalProgress
from pipelines.evaluate.ranks import rank_share, rank_world
from step_model.config import InferenceOverrides


@dataclass(frozen=True)
class EvalOptions:
    """How :func:`evaluate_model` runs (the model's own inference settings are the model's).

    ``mode`` / ``crop_size`` / ``stride``: whole images or sliding windows
    (:func:`pipelines.evaluate.inference.predict`). ``max_samples``: a global cap over all
    ranks (:mod:`pipelines.evaluate.ranks`). ``count_flops``: count every forward's FLOPs.
    ``latency_samples``: batches timed on separate plain forwards. ``precision``: the
    autocast rule (:func:`pipelines.common.precision.autocast`). ``progress`` (None: rank 0
    only) and ``progress_every_s``: :class:`pipelines.evaluate.progress.EvalProgress`.
    ``per_image``: keep one confusion matrix per image (single-process evaluations only).
    """

    mode: Mode = "whole"
    crop_size: int | None = None
    stride: int | None = None
    max_samples: int | None = None
    count_flops: bool = True
    latency_samples: int = 0
    precision: Precision = "fp32"
    progress: bool | None = None
    progress_every_s: float = 30.0
    per_image: bool = False

    def window(self) -> dict[str, Any]:
        """The inference mode and window, as :func:`predict` takes them."""
        return {"mode": self.mode, "crop_size": self.crop_size, "stride": self.stride}


@dataclass
class EvalResult:
    miou: float
    per_class_iou: dict[str, float | None]
    pixel_accuracy: float
    mean_accuracy: float
    num_images: int
    majority_miou: float | None = None  # the most frequent class everywhere (a floor)
    gflops: float | None = None
    gflops_split: dict[str, float] = field(default_factory=dict)
    tokens_in: float | None = None
    tokens_mean: float | None = None
    tokens_per_block: list[float] = field(default_factory=list)
    supertokens_per_level: dict[str, float] = field(default_factory=dict)
    halted_fraction: float | None = None
    halted_per_exit: dict[str, float] = field(default_factory=dict)
    per_class_halting: dict[str, dict[str, float | None]] = field(default_factory=dict)
    latency_ms: float | None = None
    inference: dict[str, Any] = field(default_factory=dict)
    # per-image confusion matrices (``per_image=True``): arrays, not part of to_dict()
    images: ImageConfusions | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return json_safe({f.name: getattr(self, f.name) for f in fields(self)
                           if f.name != "images"})

    def headline(self) -> dict[str, float | None]:
        """Flat scalar metrics (MLflow, ``--json``, Tune reports)."""
        out: dict[str, float | None] = {
            "miou": self.miou, "pixel_accuracy": self.pixel_accuracy,
            "majority_miou": self.majority_miou, "gflops": self.gflops, "tokens_mean": self.tokens_mean,
            "tokens_in": self.tokens_in, "halted_fraction": self.halted_fraction,
            "latency_ms": self.latency_ms,
        }
        out.update({f"gflops_{k}": v for k, v in self.gflops_split.items()})
        out.update({f"halted_fraction_{k}": v for k, v in self.halted_per_exit.items()})
        return json_safe(out)


def evaluate_model(
    model: torch.nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_classes: int,
    device: str | torch.device = "cpu",
    class_names: list[str] | None = None,
    options: EvalOptions = EvalOptions(),
) -> EvalResult:
    """Evaluate ``model`` (a StepSegmenter, already configured) on ``loader`` batches.

    Under torch.distributed every rank passes its own loader (its own share of the
    samples: :func:`pipelines.common.data.eval_loader` splits samples, not shards) and all
    ranks get the same, globally reduced result. Every rank joins every collective with
    tensors of the same shapes, whatever data it saw (none included): the exits, depth and
    supertoken levels come from the model, not from the forwards. With a loader built with
    the same cap (``eval_loader(..., max_samples=N)``) the evaluated images are exactly the
    first ``N`` of the split, as in a single-process evaluation. ``latency_ms`` is the mean
    over the timed batches of all ranks.

    With ``options.per_image`` ``result.images`` keeps one confusion matrix per image (with
    the sample keys when the loader yields them as a third batch element), for
    :mod:`pipelines.evaluate.bootstrap`.
    """
    device = torch.device(device)
    rank, world = rank_world()
    if options.per_image and world > 1:
        raise ValueError("per_image needs a single-process evaluation")
    exit_blocks, depth, report_levels = model_layout(model)
    share = rank_share(loader, options.max_samples, rank, world)
    cap = share.cap
    bar = EvalProgress(enabled=rank == 0 if options.progress is None else options.progress,
                       total=share.rank_total, total_all=share.all_total, rank=rank,
                       world=world, every_s=options.progress_every_s)
    sums = _Sums(num_classes, ComputeCounter(exit_blocks, depth, report_levels,
                                             options.count_flops),
                 ClassHalting(num_classes, exit_blocks, depth),
                 LatencyTimer(options.latency_samples, device), options.per_image)
    cast = autocast(device, options.precision)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in ([] if cap == 0 else loader):
                images, labels = batch[0], batch[1]
                keys = list(batch[2]) if len(batch) > 2 else None
                if cap is not None:
                    images, labels = images[: cap - sums.seen], labels[: cap - sums.seen]
                    keys = keys[: cap - sums.seen] if keys is not None else None
                images, labels = batch_to_device(images, labels, device)
                with cast:
                    _evaluate_batch(model, images, labels, sums, options.window(), keys)
                bar.update(images.shape[0])
                if cap is not None and sums.seen >= cap:
                    break
    finally:
        bar.close()
        if was_training:
            model.train()
    return _reduce(sums, class_names, options.window())


class _Sums:
    """What one rank accumulates over its batches (reduced across ranks in :func:`_reduce`)."""

    def __init__(self, num_classes: int, compute: ComputeCounter, halting: ClassHalting,
                 latency: LatencyTimer, per_image: bool) -> None:
        self.num_classes = num_classes
        self.meter = ConfusionMeter(num_classes)
        self.compute = compute
        self.halting = halting
        self.latency = latency
        self.seen = 0
        self.images: list[torch.Tensor] | None = [] if per_image else None
        self.keys: list[str] | None = [] if per_image else None


def _evaluate_batch(model, images: torch.Tensor, labels: torch.Tensor, sums: _Sums,
                    window: dict[str, Any], keys: list[str] | None) -> None:
    """One batch: predictions (compute counted), latency on the first batches, and sums."""
    logits, outs = predict(model, images, labels, forward=sums.compute.forward, **window)
    sums.latency.time(lambda: predict(model, images, labels, **window), images.shape[0])
    if sums.images is None:
        sums.meter.update(logits.argmax(1), labels)
    else:  # the same sum, image by image
        per = per_image_confusion(logits.argmax(1).cpu(), labels.cpu(), sums.num_classes)
        sums.meter.cm += per.sum(0)
        sums.images.append(per)
        if sums.keys is not None and keys is not None:
            sums.keys.extend(keys)
        else:
            sums.keys = None
    for out, (y, x) in outs:
        sums.halting.add(out.flow, labels[..., y:y + out.logits.shape[-2],
                                          x:x + out.logits.shape[-1]])
    sums.seen += images.shape[0]


def _reduce(sums: _Sums, class_names: list[str] | None, window: dict[str, Any]) -> EvalResult:
    """Two reductions, of fixed shapes on every rank: the confusion matrix (int64) and one
    float64 vector of every sum (images, latency, compute figures, per-class halting)."""
    scores = sums.meter.compute()
    timed = sums.latency.timed
    parts = [torch.tensor([sums.seen, sum(timed), len(timed)], dtype=torch.float64),
             sums.compute.vector(), sums.halting.vector()]
    head, compute, halting = all_reduce_sum(torch.cat(parts)).split(
        [p.numel() for p in parts])
    n, timed_sum, timed_n = float(head[0]), float(head[1]), float(head[2])
    names = class_names or [str(i) for i in range(sums.num_classes)]
    result = EvalResult(
        miou=scores.miou,
        per_class_iou={names[i]: v for i, v in enumerate(scores.per_class_iou)},
        pixel_accuracy=scores.pixel_accuracy,
        mean_accuracy=scores.mean_accuracy,
        num_images=int(n),
        majority_miou=scores.majority_miou,
        per_class_halting=sums.halting.rates(halting, names),
        latency_ms=timed_sum / timed_n if timed_n else None,
        inference=dict(window),
        **sums.compute.figures(compute, n),
    )
    if sums.images is not None:
        mats = torch.cat(sums.images) if sums.images \
            else torch.zeros(0, sums.num_classes, sums.num_classes, dtype=torch.int64)
        result.images = ImageConfusions(
            tuple(sums.keys) if sums.keys is not None else None, mats.numpy())
    return result


def evaluate_checkpoint(
    checkpoint_uri: str,
    data_uri: str,
    *,
    inference: InferenceOverrides | dict[str, Any] | None = None,
    options: EvalOptions = EvalOptions(latency_samples=3),
    device: str = "cpu",
    batch_size: int = 1,
    num_workers: int = 1,
    holdout=None,
    part: str = "search",
) -> EvalResult:
    """Load a checkpoint, apply ``model.set_inference(inference)`` (changes to the
    checkpoint's own settings) and evaluate ``data_uri`` with ``options`` (the first
    ``options.max_samples`` images when given). ``holdout`` / ``part``: which images, as
    :func:`pipelines.common.data.eval_loader` takes them; ``options.per_image`` also keeps
    the sample keys in ``result.images``."""
    model, info, loader = checkpoint_and_loader(
        checkpoint_uri, data_uri, inference=inference, device=device,
        max_samples=options.max_samples, batch_size=batch_size, num_workers=num_workers,
        holdout=holdout, part=part, with_keys=options.per_image)
    result = evaluate_model(model, loader, num_classes=model.cfg.num_classes, device=device,
                            class_names=list(info.class_names), options=options)
    result.inference.update(model.inference.to_dict())  # the settings that ran, all of them
    return result


def checkpoint_and_loader(checkpoint_uri: str, data_uri: str, *,
                          inference: InferenceOverrides | dict[str, Any] | None,
                          device: str, max_samples: int | None, batch_size: int = 1,
                          num_workers: int = 1, holdout=None, part: str = "search",
                          with_keys: bool = False):
    """(model with ``inference`` applied, the data's info, a single-process eval loader of
    ``data_uri``); :class:`InvalidInput` when the data's classes are not the model's."""
    from pipelines.common.checkpoint import load_model
    from pipelines.common.data import dataset_info, eval_loader

    model, _ = load_model(checkpoint_uri, device=device)
    model.set_inference(inference)
    info = dataset_info(data_uri)
    num_classes = model.cfg.num_classes
    if info.num_classes != num_classes:
        raise InvalidInput(f"{data_uri} has {info.num_classes} classes but the checkpoint "
                         f"{checkpoint_uri} predicts {num_classes}")
    loader = eval_loader(data_uri, batch_size=batch_size, num_workers=num_workers,
                         rank=0, world_size=1, max_samples=max_samples,
                         holdout=holdout, part=part, with_keys=with_keys)
    return model, info, loader
