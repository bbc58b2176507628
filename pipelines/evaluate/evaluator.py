"""Evaluation: accuracy and compute figures of a STEP model over a validation set.

Accuracy comes from one confusion matrix (:mod:`pipelines.evaluate.metrics`), summed across DDP
ranks when evaluation runs inside Ray Train, so mIoU is exact, not an average of averages.
Compute figures come from what the model actually executed:

* GFLOPs per image: every forward runs under ``step_model.flop_counter`` (which also
  counts the fused CPU attention kernel that ``FlopCounterMode`` misses), split into
  policy / encoder / exits / decoder. Counting costs no extra forward, but slows it down,
  so latency is timed on separate plain forwards of the first ``latency_samples`` batches
  (after one warm-up), which keeps ``latency_ms`` honest.
* Tokens and halting from the forward's ``TokenFlow``: tokens after sharing, tokens
  entering each block, halted fraction per exit, and per-class halting (for the cells of
  each ground-truth majority class, the fraction whose token halted at each exit).

Inference runs at any resolution: ``whole`` feeds the image as it is (the model pads to a
multiple of 16 and crops back); ``slide`` averages the logits of overlapping square
windows (Segmenter / mmseg ``slide`` mode), for images larger than the training crop.
With the oracle policy the windows get their label crops, as the oracle needs them.

Under DDP the validation *samples* (not shards) are split across ranks, balanced to within
one image (:func:`pipelines.common.data.eval_loader`), so a one-shard validation split still
gives every rank work; a rank with no data at all still joins every reduction with tensors
of the same shapes. ``max_samples`` is a global cap, split across the ranks. Progress goes
to stderr on rank 0: a tqdm bar on a terminal, plain lines every 30 s elsewhere (Ray
worker logs).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F

from pipelines.common.data import batch_to_device
from pipelines.common.precision import Precision, autocast
from pipelines.common.progress import duration
from pipelines.common.storage import json_safe
from pipelines.evaluate.bootstrap import ImageConfusions
from pipelines.evaluate.metrics import (
    IGNORE_INDEX,
    ConfusionMeter,
    all_reduce_sum,
    per_image_confusion,
)
from step_model.config import LEVELS, InferenceOverrides


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


# ---- inference ------------------------------------------------------------------------


def _windows(size: int, crop: int, stride: int) -> list[int]:
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop, stride)) + [size - crop]
    return sorted(set(starts))


class _Counter:
    """Sums of the compute figures over forwards (per image)."""

    def __init__(self) -> None:
        self.flops: dict[str, float] = {}
        self.tokens = 0.0
        self.tokens_in = 0.0
        self.per_block: torch.Tensor | None = None
        self.levels: dict[str, float] = {}
        self.halted: torch.Tensor | None = None
        self.exit_blocks: list[int] = []


def _forward(model, images, labels, counter: _Counter, count_flops: bool):
    """One forward; adds its flops, tokens and halting to ``counter``."""
    if count_flops:
        from step_model.flops import flop_counter, flops_by_part

        with flop_counter() as fc:
            out = model(images, labels)
        split = flops_by_part(fc, type(model).__name__)
        for k, v in split.items():
            counter.flops[k] = counter.flops.get(k, 0.0) + v
    else:
        out = model(images, labels)
    flow = out.flow
    counter.tokens += float(flow.num_tokens.sum())
    counter.tokens_in += float(flow.tokens_in) * images.shape[0]
    per_block = flow.tokens_per_block.double().sum(0).cpu()
    counter.per_block = per_block if counter.per_block is None else counter.per_block + per_block
    for s, v in flow.supertokens_per_level.items():
        counter.levels[str(s)] = counter.levels.get(str(s), 0.0) + float(v.sum())
    halted = flow.halted_per_exit.double().sum(0).cpu()
    counter.halted = halted if counter.halted is None else counter.halted + halted
    counter.exit_blocks = list(flow.exit_blocks)
    return out


def predict(model, images: torch.Tensor, labels: torch.Tensor | None, *, mode: str = "whole",
            crop_size: int | None = None, stride: int | None = None,
            counter: _Counter | None = None, count_flops: bool = False):
    """Logits (B, C, H, W) at the input resolution, and the forward outputs used."""
    counter = counter if counter is not None else _Counter()
    if mode == "whole":
        out = _forward(model, images, labels, counter, count_flops)
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
    for y in _windows(h, crop_size, stride):
        for x in _windows(w, crop_size, stride):
            win = images[..., y:y + crop_size, x:x + crop_size]
            lab = labels[..., y:y + crop_size, x:x + crop_size] if labels is not None else None
            out = _forward(model, win, lab, counter, count_flops)
            logits = out.logits.float()
            if acc is None:
                acc = images.new_zeros(b, logits.shape[1], h, w, dtype=torch.float32)
            acc[..., y:y + win.shape[-2], x:x + win.shape[-1]] += logits
            hits[..., y:y + win.shape[-2], x:x + win.shape[-1]] += 1
            outs.append((out, (y, x)))
    return acc / hits, outs


# ---- evaluation loop ------------------------------------------------------------------


def _per_class_cells(flow, labels_window: torch.Tensor, num_classes: int,
                     exit_blocks: list[int], depth: int, table: torch.Tensor) -> None:
    """Adds, per ground-truth majority class of each cell, counts of the exit where its
    token halted: table (num_classes, n_exits + 1), last column = ran to the end."""
    from step_model.policy import cell_histogram

    gh, gw = flow.grid
    lab = labels_window
    ph, pw = gh * 16 - lab.shape[-2], gw * 16 - lab.shape[-1]
    if ph > 0 or pw > 0:
        lab = F.pad(lab, (0, max(pw, 0), 0, max(ph, 0)), value=IGNORE_INDEX)
    hist = cell_histogram(lab[..., : gh * 16, : gw * 16], num_classes)  # (B, gh, gw, C)
    labelled = hist.sum(-1) > 0
    major = hist.argmax(-1)
    depth_map = flow.cell_exit_depth
    cols = [depth_map == blk for blk in exit_blocks] + [depth_map >= depth]
    for j, sel in enumerate(cols):
        m = sel & labelled
        table[:, j] += torch.bincount(major[m].flatten().cpu(), minlength=num_classes).double()


ALL_LEVELS = (1, *LEVELS)  # supertoken sides (grid cells) any model can use


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _model_layout(model) -> tuple[list[int], int, tuple[int, ...]]:
    """(exit blocks, encoder depth, reported supertoken levels) from the model itself, not
    from the forwards seen: a rank without data must reduce tensors of the same shapes."""
    m = getattr(model, "module", model)  # a DDP wrapper
    exit_blocks = [int(b) for b in getattr(m, "exit_blocks", [])]
    encoder = getattr(m, "encoder", None)
    depth = int(getattr(encoder, "depth", 0) or len(getattr(encoder, "blocks", ()))) \
        if encoder is not None else 0
    cfg_levels = getattr(getattr(getattr(m, "cfg", None), "policy", None), "levels", None)
    levels = tuple(sorted({1, *map(int, cfg_levels)})) if cfg_levels is not None else ALL_LEVELS
    return exit_blocks, depth, levels


class _Progress:
    """Evaluation progress on stderr, from one rank (rank 0 by default).

    On a terminal: a tqdm bar. Anywhere else (Ray worker logs, files, CI): one plain line
    at the start, one every ``every_s`` seconds, and one at the end; no carriage returns.
    Counts are this rank's images; under DDP the other ranks run the same share (to
    within one image), which the lines say.
    """

    def __init__(self, *, enabled: bool, total: int | None, total_all: int | None, rank: int,
                 world: int, every_s: float, stream=None) -> None:
        import sys

        self.enabled = enabled
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.where = f" [rank {rank} of {world}]" if world > 1 else ""
        self.done = 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if not enabled:
            return
        if _isatty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc=f"eval{self.where}", file=self.stream,
                            dynamic_ncols=True, leave=False)
            return
        what = _images(total) if total is not None else "images until the data ends"
        if world > 1:
            what += f" on rank {rank} of {world}"
            if total_all is not None:
                what += f" ({_images(total_all)} on all ranks)"
        self._line(f"eval: {what}")

    def _line(self, text: str) -> None:
        # stream.write, not print: Ray Train patches print and tees a wrapped sys.stderr to
        # its logger too, which prints every line twice in the worker's log
        self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, n: int) -> None:
        if not self.enabled:
            return
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        text = f"eval: {self.done}"
        if self.total:
            text += f"/{self.total} images ({100 * self.done / self.total:.0f}%)"
        else:
            text += " images"
        text += f", {rate:.2f} images/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", {duration((self.total - self.done) / rate)} left"
        self._line(text + self.where)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elapsed = time.perf_counter() - self.t0
        self._line(f"eval: done, {_images(self.done)} in {duration(elapsed)} "
                   f"({self.done / max(elapsed, 1e-9):.2f} images/s){self.where}")


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def evaluate_model(
    model: torch.nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_classes: int,
    device: str | torch.device = "cpu",
    mode: str = "whole",
    crop_size: int | None = None,
    stride: int | None = None,
    max_samples: int | None = None,
    count_flops: bool = True,
    latency_samples: int = 0,
    class_names: list[str] | None = None,
    precision: Precision = "fp32",
    progress: bool | None = None,
    progress_every_s: float = 30.0,
    per_image: bool = False,
) -> EvalResult:
    """Evaluate ``model`` (a StepSegmenter, already configured) on ``loader`` batches.

    Under torch.distributed every rank passes its own loader (its own share of the
    samples: :func:`pipelines.common.data.eval_loader` splits samples, not shards) and all ranks
    get the same, globally reduced result. Every rank joins every collective with tensors
    of the same shapes, whatever data it saw (none included): the exits, depth and
    supertoken levels come from the model, not from the forwards.

    ``max_samples`` is a *global* cap: rank ``r`` of ``W`` evaluates at most
    ``max_samples // W + (r < max_samples % W)`` images, so that ``max_samples`` images
    are evaluated in all (when the data has them). With a loader built with the same cap
    (``eval_loader(..., max_samples=N)``) these are exactly the first ``N`` images of the
    split, the same as in a single-process evaluation.

    ``progress`` (default: on rank 0 only) writes progress to stderr: a tqdm bar on a
    terminal, else a plain line every ``progress_every_s`` seconds (see :class:`_Progress`).
    ``latency_ms`` is the mean over the timed batches of all ranks.

    ``per_image=True`` keeps one confusion matrix per image in ``result.images`` (with the
    sample keys when the loader yields them as a third batch element), for
    :mod:`pipelines.evaluate.bootstrap`; single-process evaluations only.
    """
    device = torch.device(device)
    rank, world = _dist_rank_world()
    if per_image and world > 1:
        raise ValueError("per_image needs a single-process evaluation")
    exit_blocks, depth, report_levels = _model_layout(model)
    cap, bar = _cap_and_progress(loader, max_samples, rank, world, progress, progress_every_s)
    sums = _Sums(num_classes, len(exit_blocks))
    if per_image:
        sums.images, sums.keys = [], []
    cast = autocast(device, precision)
    infer = {"mode": mode, "crop_size": crop_size, "stride": stride}
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
                    _evaluate_batch(model, images, labels, sums, infer, device,
                                    count_flops=count_flops, latency_samples=latency_samples,
                                    exit_blocks=exit_blocks, depth=depth, keys=keys)
                bar.update(images.shape[0])
                if cap is not None and sums.seen >= cap:
                    break
    finally:
        bar.close()
        if was_training:
            model.train()
    result = _reduce(sums, exit_blocks, depth, report_levels, class_names, count_flops, infer)
    if sums.images is not None:
        mats = torch.cat(sums.images) if sums.images \
            else torch.zeros(0, num_classes, num_classes, dtype=torch.int64)
        result.images = ImageConfusions(
            tuple(sums.keys) if sums.keys is not None else None, mats.numpy())
    return result


def _cap_and_progress(loader, max_samples: int | None, rank: int, world: int,
                      progress: bool | None, every_s: float) -> tuple[int | None, _Progress]:
    """This rank's share of the global ``max_samples`` cap, and its progress reporter."""
    from data_prep.loader import rank_sample_range

    cap: int | None = None
    if max_samples is not None:
        lo, hi = rank_sample_range(max(0, max_samples), rank, world)
        cap = hi - lo
    rank_total = getattr(loader, "num_samples", None)
    all_total = getattr(loader, "total_samples", None)
    if cap is not None:
        rank_total = cap if rank_total is None else min(rank_total, cap)
        all_total = max_samples if all_total is None else min(all_total, max_samples)
    bar = _Progress(enabled=rank == 0 if progress is None else progress, total=rank_total,
                    total_all=all_total, rank=rank, world=world, every_s=every_s)
    return cap, bar


class _Sums:
    """What one rank accumulates over its batches (reduced across ranks in :func:`_reduce`)."""

    def __init__(self, num_classes: int, n_exits: int):
        self.num_classes = num_classes
        self.meter = ConfusionMeter(num_classes)
        self.counter = _Counter()
        # per ground-truth majority class of each cell: the exit its token halted at
        self.class_table = torch.zeros(num_classes, n_exits + 1, dtype=torch.float64)
        self.seen = 0
        self.timed: list[float] = []  # ms per image of the latency-timed batches
        self.images: list[torch.Tensor] | None = None  # per-image matrices, when kept
        self.keys: list[str] | None = None


def _evaluate_batch(model, images: torch.Tensor, labels: torch.Tensor, sums: _Sums,
                    infer: dict[str, Any], device: torch.device, *, count_flops: bool,
                    latency_samples: int, exit_blocks: list[int], depth: int,
                    keys: list[str] | None = None) -> None:
    """One batch: predictions (FLOPs counted), latency on the first batches, and sums."""
    logits, outs = predict(model, images, labels, counter=sums.counter,
                           count_flops=count_flops, **infer)
    if len(sums.timed) < latency_samples:
        if not sums.timed:  # warm-up (allocator, kernel selection)
            predict(model, images, labels, **infer)
        _sync(device)
        t0 = time.perf_counter()
        predict(model, images, labels, **infer)
        _sync(device)
        sums.timed.append((time.perf_counter() - t0) * 1000 / images.shape[0])
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
        win = labels[..., y:y + out.logits.shape[-2], x:x + out.logits.shape[-1]]
        _per_class_cells(out.flow, win, sums.num_classes, exit_blocks, depth, sums.class_table)
    sums.seen += images.shape[0]


def _reduce(sums: _Sums, exit_blocks: list[int], depth: int, report_levels: tuple[int, ...],
            class_names: list[str] | None, count_flops: bool,
            infer: dict[str, Any]) -> EvalResult:
    """Two reductions, of fixed shapes on every rank: the confusion matrix (int64) and one
    float64 vector of every sum (compute figures, per-class halting, latency)."""
    num_classes, n_exits, counter = sums.num_classes, len(exit_blocks), sums.counter
    scores = sums.meter.compute()
    flops_keys = ["policy", "encoder", "exits", "decoder", "total"]
    per_block = counter.per_block if counter.per_block is not None \
        else torch.zeros(depth, dtype=torch.float64)
    halted = counter.halted if counter.halted is not None \
        else torch.zeros(n_exits, dtype=torch.float64)
    if per_block.numel() != depth or halted.numel() != n_exits:
        raise RuntimeError(f"the forwards report {per_block.numel()} blocks / {halted.numel()} "
                           f"exits, the model {depth} / {n_exits}")
    unknown = set(counter.levels) - {str(s) for s in ALL_LEVELS}
    if unknown:
        raise RuntimeError(f"supertoken levels {sorted(unknown)} outside {ALL_LEVELS}")
    parts = [
        torch.tensor([sums.seen, counter.tokens, counter.tokens_in, sum(sums.timed),
                      len(sums.timed)], dtype=torch.float64),
        torch.tensor([counter.flops.get(k, 0.0) for k in flops_keys], dtype=torch.float64),
        halted.double(),
        per_block.double(),
        torch.tensor([counter.levels.get(str(s), 0.0) for s in ALL_LEVELS], dtype=torch.float64),
        sums.class_table.flatten(),
    ]
    sizes = [p.numel() for p in parts]
    head, flops, halted, per_block, level_sums, table = all_reduce_sum(torch.cat(parts)).split(sizes)
    class_table = table.reshape(num_classes, n_exits + 1)

    n = float(head[0])
    tokens, tokens_in = float(head[1]), float(head[2])
    timed_sum, timed_n = float(head[3]), float(head[4])
    names = class_names or [str(i) for i in range(num_classes)]
    exit_names = [f"exit_{b}" for b in exit_blocks]
    per_class_halting: dict[str, dict[str, float | None]] = {}
    for c in range(num_classes):
        total_c = float(class_table[c].sum())
        if total_c > 0:
            per_class_halting[names[c]] = {
                name: float(class_table[c, j]) / total_c
                for j, name in enumerate([*exit_names, "final"])}
    levels = {str(s): float(v) for s, v in zip(ALL_LEVELS, level_sums, strict=True)
              if s in report_levels}
    return EvalResult(
        miou=scores.miou,
        per_class_iou={names[i]: v for i, v in enumerate(scores.per_class_iou)},
        pixel_accuracy=scores.pixel_accuracy,
        mean_accuracy=scores.mean_accuracy,
        num_images=int(n),
        majority_miou=scores.majority_miou,
        gflops=float(flops[4]) / n if count_flops and n else None,
        gflops_split={k: float(flops[i]) / n for i, k in enumerate(flops_keys[:4])}
        if count_flops and n else {},
        tokens_in=tokens_in / n if n else None,
        tokens_mean=tokens / n if n else None,
        tokens_per_block=[float(v) / n for v in per_block] if n else [],
        supertokens_per_level={k: v / n for k, v in levels.items()} if n else {},
        halted_fraction=float(halted.sum()) / tokens if tokens else None,
        halted_per_exit={name: float(h) / tokens for name, h in zip(exit_names, halted, strict=True)}
        if tokens else {},
        per_class_halting=per_class_halting,
        latency_ms=timed_sum / timed_n if timed_n else None,
        inference=dict(infer),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_checkpoint(
    checkpoint_uri: str,
    data_uri: str,
    *,
    inference: InferenceOverrides | dict[str, Any] | None = None,
    max_samples: int | None = None,
    device: str = "cpu",
    mode: str = "whole",
    crop_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    num_workers: int = 1,
    count_flops: bool = True,
    latency_samples: int = 3,
    progress: bool | None = None,
    per_image: bool = False,
    holdout=None,
    part: str = "search",
) -> EvalResult:
    """Load a checkpoint, apply ``model.set_inference(inference)`` (changes to the
    checkpoint's own settings), evaluate ``data_uri``
    (the first ``max_samples`` images of it when given; progress on stderr unless
    ``progress=False``). ``holdout`` / ``part``: which images, as
    :func:`pipelines.common.data.eval_loader` takes them; ``per_image``: keep per-image
    confusion matrices and sample keys in ``result.images``."""
    from pipelines.common.checkpoint import load_model
    from pipelines.common.data import dataset_info, eval_loader

    model, _ = load_model(checkpoint_uri, device=device)
    model.set_inference(inference)
    info = dataset_info(data_uri)
    num_classes = model.cfg.num_classes
    if info.num_classes != num_classes:
        raise ValueError(f"{data_uri} has {info.num_classes} classes but the checkpoint "
                         f"{checkpoint_uri} predicts {num_classes}")
    loader = eval_loader(data_uri, batch_size=batch_size, num_workers=num_workers,
                         rank=0, world_size=1, max_samples=max_samples, holdout=holdout,
                         part=part, with_keys=per_image)
    result = evaluate_model(
        model, loader, num_classes=num_classes, device=device, mode=mode, crop_size=crop_size,
        stride=stride, max_samples=max_samples, count_flops=count_flops,
        latency_samples=latency_samples, class_names=list(info.class_names),
        progress=progress, per_image=per_image,
    )
    result.inference.update(model.inference.to_dict())  # the settings that ran, all of them
    return result
