"""The per-worker training function that Ray Train runs on every worker.

It lives in the installed package (not in a script or a test) because Ray pickles it by
reference: workers must be able to import it, or the run hangs (PLATFORM.md).

One function serves both stages:

* ``policy`` (stage 1): only the dCTS policy network trains, with BCE per level against
  the homogeneity ground truth computed from the label crops. The checkpoint holds the
  whole ``StepSegmenter`` (so it is a runnable model whose token counts ``step eval`` can
  measure) plus ``policy.pt`` with the policy's own state dict.
* ``step`` (stage 2): the segmenter trains with sharing active (oracle, or the frozen
  policy of ``policy_checkpoint``), the final pixel cross-entropy plus the auxiliary exit
  losses (``step_model.step_loss``). An optional fine-tuning phase turns halting on
  (DToP's recipe).

Loop design:

* Step-based, not epoch-based: high-resolution recipes are specified in iterations, and
  checkpoints, logging and evaluation fire at fixed optimizer steps on every rank, so the
  collectives (loss all-reduce, evaluation, ``ray.train.report``) line up across ranks.
* Resuming restores model, optimizer, scheduler, step, epoch and the position inside the
  epoch (batches already consumed are skipped), so a restarted worker group continues the
  same sample stream, and the run ends at the same step count.
* Gradient accumulation uses DDP's ``no_sync`` on all but the last micro-batch.
* bf16 autocast only on CUDA (CPU bf16 is slower than fp32 on most CPUs and changes
  numerics for the tests); no GradScaler is needed for bf16.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pipelines.common import checkpoint as ckpt_io
from pipelines.common.data import batch_to_device
from pipelines.common.model import build_model
from pipelines.train.config import TrainConfig


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def total_steps(cfg: TrainConfig, world_size: int) -> int:
    """Base-phase optimizer steps (``train.steps``, or ``train.epochs`` over the data)."""
    if cfg.train.steps is not None:
        return cfg.train.steps
    from pipelines.common.data import dataset_info, resolve_data_uri

    info = dataset_info(cfg.data.train)
    samples = info.num_samples[info.pick_split(resolve_data_uri(cfg.data.train)[1], train=True)]
    per_step = cfg.data.batch_size * world_size * cfg.optim.grad_accum
    return max(1, math.ceil(cfg.train.epochs * samples / per_step))


def final_step(cfg: TrainConfig, world_size: int) -> int:
    """The step of the last checkpoint: base steps plus the fine-tuning phase (stage 2)."""
    return total_steps(cfg, world_size) + (cfg.finetune.steps if cfg.stage == "step" else 0)


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16":  # asked for explicitly on CPU: honour it
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_batches(cfg: TrainConfig, state: LoopState) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless training batches; epochs advance ``state`` so that a resume can skip ahead."""
    from pipelines.common.data import train_loader

    while True:
        loader = train_loader(cfg, epoch=state.epoch)
        seen = 0
        for i, batch in enumerate(loader):
            seen += 1
            if i < state.batches_in_epoch:
                continue  # consumed before the checkpoint we resumed from
            state.batches_in_epoch = i + 1
            yield batch
        if seen == 0:
            raise RuntimeError(f"data.train={cfg.data.train}: the loader yielded no batch "
                               f"for this worker")
        state.epoch += 1
        state.batches_in_epoch = 0


def progress_line(stage: str, step: int, last_step: int, loss: float, samples_per_s: float,
                  seconds_per_step: float) -> str:
    """One line of training progress: step out of total, loss, samples/s and the ETA."""
    eta = max(last_step - step, 0) * seconds_per_step
    hours, rest = divmod(int(round(eta)), 3600)
    return (f"[train {stage}] step {step}/{last_step} ({100 * step / max(last_step, 1):.0f}%)"
            f"  loss {loss:.4f}  {samples_per_s:.1f} samples/s"
            f"  ETA {hours:d}:{rest // 60:02d}:{rest % 60:02d}")


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    t = (t / dist.get_world_size()).cpu()
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from data_prep.storage import apply_s3_env
    from pipelines.tracking.runs import RunLogger
    from pipelines.train import stages
    from pipelines.train.optim import build_optimizer, build_scheduler

    # Workers keep the environment they were started with, which may predate the driver's
    # AWS_* variables (data, policy checkpoints on s3://).
    apply_s3_env(config.get("s3_env"))
    cfg = TrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    tracker = RunLogger(config["run_id"], config["tracking_uri"]) if rank == 0 else None

    _seed_everything(cfg.train.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg.model)
    stage = stages.get(cfg.stage)
    stage.prepare(model, cfg)
    model.to(device)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    base_steps = total_steps(cfg, world)
    last_step = final_step(cfg, world)
    ft_steps = last_step - base_steps
    optimizer = build_optimizer(trainable, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, base_steps=base_steps,
                                finetune_steps=ft_steps, finetune_scale=cfg.finetune.lr_scale)

    state = LoopState()
    restored: dict[str, Any] = {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model.load_state_dict(ckpt_io.load_state_dict(d), strict=True)
            train_state = ckpt_io.load_train_state(d)
        if train_state is None:
            raise RuntimeError(f"checkpoint {checkpoint.path} has no train_state.pt")
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        state = LoopState(**train_state["loop"])
        restored = {"restored_step": state.step,
                    "restored_digest": ckpt_io.state_digest(model.state_dict())}
    # Per-rank random stream (drop path...), a function of the step: a resumed run draws
    # the same numbers as the uninterrupted one would have from here on.
    _seed_everything(cfg.train.seed * 1000 + rank + state.step)

    module = stage.trained_module(model)
    ddp = ray.train.torch.prepare_model(
        module, move_to_device=False,
        # With halting active in training (fine-tuning phase) an exit head can see no
        # token in a step: DDP must then tolerate parameters without gradients. Otherwise
        # every trainable parameter is used, and the extra graph traversal is skipped.
        parallel_strategy_kwargs={"find_unused_parameters": ft_steps > 0},
    )
    if state.step >= base_steps and ft_steps:
        stage.start_finetune(model, cfg)

    batches = train_batches(cfg, state)
    accum = cfg.optim.grad_accum
    params = [p for _, p in trainable]
    window = {"loss_sum": 0.0, "n": 0, "samples": 0, "t0": time.perf_counter()}
    metrics: dict[str, Any] = {}
    may_crash = checkpoint is None  # the injected failure fires once: never after a restore
    # The ETA is timed from this (re)start, so a resumed run does not count restored steps.
    started = {"step": state.step, "t": time.perf_counter()}

    while state.step < last_step:
        if state.step == base_steps and ft_steps:
            stage.start_finetune(model, cfg)
        ddp.train()
        stage.train_mode(model)
        terms: dict[str, float] = {}
        for micro in range(accum):
            images, labels = next(batches)
            images, labels = batch_to_device(images, labels, device)
            sync = (ddp.no_sync() if micro < accum - 1 and hasattr(ddp, "no_sync")
                    else contextlib.nullcontext())
            with sync, _autocast(device, cfg.train.precision):
                losses = stage.losses(ddp, model, images, labels, cfg)
            with sync:
                (losses["total"] / accum).backward()
            for k, v in losses.items():
                terms[k] = terms.get(k, 0.0) + float(v.detach()) / accum
            window["samples"] += images.shape[0]
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                     if cfg.optim.grad_clip else None)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        window["loss_sum"] += terms["total"]
        window["n"] += 1

        if cfg.train.inject_failure_at_step == state.step and may_crash and rank == 0:
            raise RuntimeError(f"injected failure at step {state.step} (train.inject_failure_at_step)")

        is_last = state.step == last_step
        if state.step % cfg.train.log_every == 0 or is_last:
            elapsed = time.perf_counter() - window["t0"]
            logged = _mean_over_ranks({f"train/{k}": v for k, v in terms.items()}
                                      | {"train/loss_avg": window["loss_sum"] / window["n"]})
            group = optimizer.param_groups[0]
            logged["train/lr"] = group["lr"] / group["lr_mult"]  # the base (backbone) lr
            logged["train/samples_per_s"] = window["samples"] * world / max(elapsed, 1e-9)
            if grad_norm is not None:
                logged["train/grad_norm"] = float(grad_norm)
            logged["train/epoch"] = state.epoch
            metrics.update(logged)
            if tracker:
                tracker.log_metrics(logged, step=state.step)
            if rank == 0:  # Ray forwards worker stdout to the driver: long runs are not silent
                done = state.step - started["step"]
                per_step = (time.perf_counter() - started["t"]) / max(done, 1)
                print(progress_line(cfg.stage, state.step, last_step, logged["train/loss_avg"],
                                    logged["train/samples_per_s"], per_step), flush=True)
            window = {"loss_sum": 0.0, "n": 0, "samples": 0, "t0": time.perf_counter()}

        do_eval = is_last or (cfg.train.eval_every and state.step % cfg.train.eval_every == 0)
        if do_eval and cfg.data.val:
            figures = stage.evaluate(model, cfg, device)
            metrics.update(figures)
            if tracker:
                tracker.log_metrics({f"val/{k}": v for k, v in figures.items()
                                     if isinstance(v, int | float) and v is not None},
                                    step=state.step)

        if state.step % cfg.train.checkpoint_every == 0 or is_last:
            report = {k: v for k, v in metrics.items()} | restored | {
                "step": state.step, "epoch": state.epoch, "stage": cfg.stage}
            if tracker:  # rank 0, the rank whose report carries the checkpoint
                # What MLflow lost, in the result itself (the server may be the thing gone),
                # and a digest to check stored weights against (a second or two for ViT-L,
                # once per checkpoint).
                report["tracking_failures"] = tracker.failures
                report["checkpoint_digest"] = ckpt_io.state_digest(
                    ckpt_io.unwrap(model).state_dict())
            train_state = {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "loop": asdict(state),
            }
            _report(rank, model, cfg, train_state, report, state.step)


def _report(rank: int, model: torch.nn.Module, cfg: TrainConfig, train_state: dict[str, Any],
            metrics: dict[str, Any], step: int) -> None:
    """Every rank reports (it is a barrier); only rank 0 writes the checkpoint."""
    import ray.train

    from pipelines.train import stages

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="step-ckpt-") as tmp:
        ckpt_io.save_checkpoint(
            tmp, model, ckpt_io.unwrap(model).cfg.to_dict(), train_state=train_state,
            meta={"stage": cfg.stage, "step": step, "name": cfg.name,
                  "metrics": {k: v for k, v in metrics.items()
                              if isinstance(v, int | float | str)}},
        )
        stages.get(cfg.stage).extra_files(model, tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=ckpt_io.checkpoint_dir_name(step))

