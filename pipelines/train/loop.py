"""The per-worker training function that Ray Train runs on every worker.

It lives in the installed package (not in a script or a test) because Ray pickles it by
reference: workers must be able to import it, or the run hangs (Ray 2.60: `fit()` fails
after ~18 s and the workers never free their CPUs).

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
* bf16 autocast only on CUDA unless asked for (:mod:`pipelines.common.precision`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pipelines.common import checkpoint as ckpt_io
from pipelines.common.console import worker_console
from pipelines.common.data import batch_to_device
from pipelines.common.errors import ExpectedFailure
from pipelines.common.model import build_model
from pipelines.common.precision import autocast
from pipelines.common.progress import Every, duration
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
    if cfg.data.exclude_groups:
        from pipelines.train.data import excluded_keys

        samples -= len(excluded_keys(cfg))
    per_step = cfg.data.batch_size * world_size * cfg.optim.grad_accum
    return max(1, math.ceil(cfg.train.epochs * samples / per_step))


def final_step(cfg: TrainConfig, world_size: int) -> int:
    """The step of the last checkpoint: base steps plus the fine-tuning phase (stage 2)."""
    return total_steps(cfg, world_size) + (cfg.finetune.steps if cfg.stage == "step" else 0)


def train_batches(cfg: TrainConfig, state: LoopState) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless training batches; epochs advance ``state`` so that a resume can skip ahead."""
    from pipelines.train.data import train_loader

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
            raise ExpectedFailure(f"data.train={cfg.data.train}: the loader yielded no batch "
                               f"for this worker")
        state.epoch += 1
        state.batches_in_epoch = 0


def progress_line(stage: str, step: int, last_step: int, loss: float, samples_per_s: float,
                  seconds_per_step: float) -> str:
    """One line of training progress: step out of total, loss, samples/s and the ETA."""
    eta = max(last_step - step, 0) * seconds_per_step
    return (f"[train {stage}] step {step}/{last_step} ({100 * step / max(last_step, 1):.0f}%)"
            f"  loss {loss:.4f}  {samples_per_s:.1f} samples/s  ETA {duration(eta)}")


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


# For tests only, never a user's setting: rank 0 raises once at this optimizer step, in a
# worker group that did not restore from a checkpoint (the resilience tests crash a run on
# purpose). The driver reads it (:func:`injected_failure_step`) and hands it to the workers
# in the loop config: Ray's workers may predate the variable.
FAIL_AT_STEP_ENV = "STEP_TEST_FAIL_AT_STEP"


def injected_failure_step() -> int | None:
    """The step of :data:`FAIL_AT_STEP_ENV`, or None when unset."""
    value = os.environ.get(FAIL_AT_STEP_ENV, "").strip()
    return int(value) if value else None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train entry point: ``config`` = {"cfg", "run_id", "tracking_uri", "s3_env",
    "fail_at_step", "progress_every_s"}."""
    from data_prep.storage import apply_s3_env

    worker_console()
    # Workers keep the environment they were started with, which may predate the driver's
    # AWS_* variables (data, policy checkpoints on s3://).
    apply_s3_env(config.get("s3_env"))
    Worker(TrainConfig.model_validate(config["cfg"]), config["run_id"],
           config["tracking_uri"], fail_at_step=config.get("fail_at_step"),
           progress_every_s=config.get("progress_every_s", 0.0)).run()


class Worker:
    """One training worker: set-up and restore, then optimizer steps, each followed by the
    logging, evaluation and checkpoint that fall due (:meth:`run`)."""

    def __init__(self, cfg: TrainConfig, run_id: str, tracking_uri: str, *,
                 fail_at_step: int | None = None, progress_every_s: float = 0.0):
        import ray.train
        import ray.train.torch

        from pipelines.tracking.runs import RunLogger
        from pipelines.train import stages
        from pipelines.train.optim import build_optimizer, build_scheduler

        self.cfg = cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.tracker = RunLogger(run_id, tracking_uri) if self.rank == 0 else None

        _seed_everything(cfg.train.seed)  # same init on every rank (DDP broadcasts rank 0's)
        self.model = build_model(cfg.model, cfg.inference)
        self.stage = stages.get(cfg.stage)
        self.stage.prepare(self.model, cfg)
        self.model.to(self.device)
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in trainable]

        self.base_steps = total_steps(cfg, self.world)
        self.last_step = final_step(cfg, self.world)
        self.ft_steps = self.last_step - self.base_steps
        self.optimizer = build_optimizer(trainable, cfg.optim)
        self.scheduler = build_scheduler(
            self.optimizer, cfg.optim, base_steps=self.base_steps,
            finetune_steps=self.ft_steps, finetune_scale=cfg.finetune.lr_scale)
        self.state = LoopState()
        self.restored: dict[str, Any] = {}
        self.fail_at_step = fail_at_step
        self.may_crash = not self._restore()  # the injected failure fires once, never after
        # Per-rank random stream (drop path...), a function of the step: a resumed run draws
        # the same numbers as the uninterrupted one would have from here on.
        _seed_everything(cfg.train.seed * 1000 + self.rank + self.state.step)

        self.ddp = ray.train.torch.prepare_model(
            self.stage.trained_module(self.model), move_to_device=False,
            # With halting active in training (fine-tuning phase) an exit head can see no
            # token in a step: DDP must then tolerate parameters without gradients.
            # Otherwise every trainable parameter is used, and the extra graph traversal
            # is skipped. A policy fine-tuned in stage 2 may have a level head without a
            # window in the crop.
            parallel_strategy_kwargs={"find_unused_parameters": self.ft_steps > 0
                                      or cfg.policy_finetune.enabled},
        )
        if self.state.step >= self.base_steps and self.ft_steps:
            self.stage.start_finetune(self.model, cfg)
        self.metrics: dict[str, Any] = {}
        self._new_window()
        # The ETA is timed from this (re)start: a resumed run does not count restored steps.
        self.started = (self.state.step, time.perf_counter())
        # every log_every steps to MLflow; on the terminal at the driver's pace
        self.progress = Every(progress_every_s)

    def _restore(self) -> bool:
        """Model, optimizer, scheduler and loop position from Ray Train's latest checkpoint."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as d:
            self.model.load_state_dict(ckpt_io.load_state_dict(d), strict=True)
            train_state = ckpt_io.load_train_state(d)
        if train_state is None:
            raise ExpectedFailure(f"checkpoint {checkpoint.path} has no train_state.pt")
        self.optimizer.load_state_dict(train_state["optimizer"])
        self.scheduler.load_state_dict(train_state["scheduler"])
        self.state = LoopState(**train_state["loop"])
        self.restored = {"restored_step": self.state.step,
                         "restored_digest": ckpt_io.state_digest(self.model.state_dict())}
        return True

    def _new_window(self) -> None:
        """Sums over the steps since the last log line."""
        self.window = {"loss_sum": 0.0, "n": 0, "samples": 0, "t0": time.perf_counter()}

    def run(self) -> None:
        cfg, state = self.cfg, self.state
        batches = train_batches(cfg, state)
        while state.step < self.last_step:
            if state.step == self.base_steps and self.ft_steps:
                self.stage.start_finetune(self.model, cfg)
            terms, grad_norm = self.optimizer_step(batches)
            if self.fail_at_step == state.step and self.may_crash and self.rank == 0:
                raise RuntimeError(f"injected failure at step {state.step} "
                                   f"({FAIL_AT_STEP_ENV})")
            is_last = state.step == self.last_step
            if state.step % cfg.train.log_every == 0 or is_last:
                self.log(terms, grad_norm)
            do_eval = is_last or (cfg.train.eval_every
                                  and state.step % cfg.train.eval_every == 0)
            if do_eval and cfg.data.val:
                self.evaluate()
            if state.step % cfg.train.checkpoint_every == 0 or is_last:
                self.checkpoint()

    def optimizer_step(self, batches) -> tuple[dict[str, float], torch.Tensor | None]:
        """One optimizer step at the stage's settings for this step; returns the loss terms
        and the gradient norm before clipping."""
        cfg = self.cfg
        self.ddp.train()
        self.stage.train_mode(self.model)
        with self.stage.step_settings(self.model, cfg, self.state.step):
            terms = self._accumulate(batches)
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
                     if cfg.optim.grad_clip else None)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.window["loss_sum"] += terms["total"]
        self.window["n"] += 1
        return terms, grad_norm

    def _accumulate(self, batches) -> dict[str, float]:
        """Forward and backward over ``grad_accum`` micro-batches (DDP's ``no_sync`` on all
        but the last); returns the loss terms averaged over them."""
        cfg, ddp = self.cfg, self.ddp
        accum = cfg.optim.grad_accum
        terms: dict[str, float] = {}
        for micro in range(accum):
            images, labels = batch_to_device(*next(batches), self.device)
            sync = (ddp.no_sync() if micro < accum - 1 and hasattr(ddp, "no_sync")
                    else contextlib.nullcontext())
            with sync, autocast(self.device, cfg.train.precision):
                losses = self.stage.losses(ddp, self.model, images, labels, cfg)
            with sync:
                (losses["total"] / accum).backward()
            for k, v in losses.items():
                terms[k] = terms.get(k, 0.0) + float(v.detach()) / accum
            self.window["samples"] += images.shape[0]
        return terms

    def log(self, terms: dict[str, float], grad_norm: torch.Tensor | None) -> None:
        """Metrics averaged over ranks to MLflow, and rank 0's progress line."""
        w, step = self.window, self.state.step
        elapsed = time.perf_counter() - w["t0"]
        logged = _mean_over_ranks({f"train/{k}": v for k, v in terms.items()}
                                  | {"train/loss_avg": w["loss_sum"] / w["n"]})
        group = self.optimizer.param_groups[0]
        logged["train/lr"] = group["lr"] / group["lr_mult"]  # the base (backbone) lr
        logged["train/samples_per_s"] = w["samples"] * self.world / max(elapsed, 1e-9)
        if grad_norm is not None:
            logged["train/grad_norm"] = float(grad_norm)
        logged["train/epoch"] = self.state.epoch
        self.metrics.update(logged)
        if self.tracker:
            self.tracker.log_metrics(logged, step=step)
        # Ray forwards worker stdout to the driver: long runs say where they are
        if self.rank == 0 and self.progress.due(final=step == self.last_step):
            first, t0 = self.started
            per_step = (time.perf_counter() - t0) / max(step - first, 1)
            # stream.write, not print: Ray Train patches print to also log each line, which
            # doubles it in the driver's output
            sys.stdout.write(progress_line(
                self.cfg.stage, step, self.last_step, logged["train/loss_avg"],
                logged["train/samples_per_s"], per_step) + "\n")
            sys.stdout.flush()
        self._new_window()

    def evaluate(self) -> None:
        figures = self.stage.evaluate(self.model, self.cfg, self.device)
        self.metrics.update(figures)
        if self.tracker:
            self.tracker.log_metrics({f"val/{k}": v for k, v in figures.items()
                                      if isinstance(v, int | float) and v is not None},
                                     step=self.state.step)

    def checkpoint(self) -> None:
        state = self.state
        report = dict(self.metrics) | self.restored | {
            "step": state.step, "epoch": state.epoch, "stage": self.cfg.stage}
        if self.tracker:  # rank 0, the rank whose report carries the checkpoint
            # What MLflow lost, in the result itself (the server may be the thing gone),
            # and a digest to check stored weights against (a second or two for ViT-L,
            # once per checkpoint).
            report["tracking_failures"] = self.tracker.failures
            report["checkpoint_digest"] = ckpt_io.state_digest(
                ckpt_io.unwrap(self.model).state_dict())
        train_state = {"optimizer": self.optimizer.state_dict(),
                       "scheduler": self.scheduler.state_dict(), "loop": asdict(state)}
        _report(self.rank, self.model, self.cfg, train_state, report, state.step)


def _report(rank: int, model: torch.nn.Module, cfg: TrainConfig, train_state: dict[str, Any],
            metrics: dict[str, Any], step: int) -> None:
    """Every rank reports (it is a barrier); only rank 0 writes the checkpoint."""
    import ray.train

    from pipelines.train import stages

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="step-ckpt-") as tmp:
        # the training's inference settings, not the fine-tuning phase's nor a step's draw
        ckpt_io.save_checkpoint(
            tmp, model, cfg.inference, train_state=train_state,
            meta={"stage": cfg.stage, "step": step, "name": cfg.name,
                  "metrics": {k: v for k, v in metrics.items()
                              if isinstance(v, int | float | str)}},
        )
        stages.get(cfg.stage).extra_files(model, tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=ckpt_io.checkpoint_dir_name(step))

