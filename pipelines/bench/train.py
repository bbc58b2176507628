"""``step bench train --config FILE --json PATH``: training samples/s, plain ViT vs STEP.

Three models built from the config's ``model`` and ``inference`` sections, trained in the
same process on the
same real image/label crops (the LoVEDA fixtures by default, or ``--data`` shards) at the
config's crop size and per-worker batch size, interleaved round by round so that machine
noise hits all of them alike:

* ``plain``: the same backbone and decoder, policy ``none``, no exits (the baseline);
* ``step``: the config's model (sharing + exit heads with the auxiliary loss), i.e.
  stage-2 base training;
* ``step_halting``: the same with halting active in training (the fine-tuning phase),
  at ``--halt-thresholds`` (random-init models are never confident, so the config's
  0.9-0.95 halts nothing: pass low values to see what halting can save).

One optimizer step = forward + backward + AdamW step (``grad_accum`` 1), bf16 autocast
on CUDA. Reported: median samples/s over ``--repeats`` rounds, and the mean tokens per
image that the STEP models ran. Single process, no Ray: this measures the model's
training cost, which is what changes between plain and STEP.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from pydantic import Field

from pipelines.common.errors import InputNotFound
from pipelines.common.settings import EXIT_THRESHOLDS_SYNTAX, ExitThresholds, StrictModel
from pipelines.train.config import TrainConfig
from step_model.config import InferenceConfig, StepConfig

# the demo's LoveDA scenes, shipped in the repository (relative to its root, like configs/)
FIXTURES = Path("demo_data/loveda")


class BenchTrainOptions(StrictModel):
    """The benchmark's own knobs (the models and data settings come from the config)."""

    data: str | None = Field(None, description="shard directory for the batches (default: "
                             "the LoveDA fixtures)")
    steps: int = Field(3, ge=1, description="optimizer steps per round")
    repeats: int = Field(3, ge=1, description="interleaved rounds")
    warmup: int = Field(1, ge=0, description="untimed steps per model")
    device: str | None = Field(None, description="cpu or cuda (default: cuda if any)")
    halt_thresholds: ExitThresholds = Field(
        None, description=f"exit thresholds of the step_halting model, {EXIT_THRESHOLDS_SYNTAX} "
        "(default: the fine-tuning phase's, i.e. inference with finetune.inference "
        "applied). An untrained model is never confident: low values show what halting "
        "saves")


def _fixture_batches(crop: int, batch: int, n: int, seed: int = 0):
    """``n`` batches of random crops of the LoveDA fixtures (1024 px scenes) resized so
    that a crop covers a quarter of a scene's side, keeping real content structure."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    names = sorted(p.name for p in (FIXTURES / "img_dir").glob("*.png"))
    if not names:
        raise InputNotFound(f"no LoveDA scenes in {FIXTURES} (run from the repository root); pass --data")
    side = max(crop, min(1024, 2 * crop))
    pairs = []
    for name in names:
        img = torch.from_numpy(np.array(Image.open(FIXTURES / "img_dir" / name).convert("RGB")))
        lab = torch.from_numpy(np.array(Image.open(FIXTURES / "ann_dir" / name))).long()
        img = F.interpolate(img.permute(2, 0, 1)[None].float() / 255, size=(side, side),
                            mode="bilinear", antialias=True)[0]
        lab = F.interpolate(lab[None, None].float(), size=(side, side), mode="nearest")[0, 0].long()
        lab = torch.where(lab == 0, 255, lab - 1)  # LoveDA: 0 = no data; 1..7 -> 0..6
        pairs.append((img, lab))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        imgs, labs = [], []
        for _ in range(batch):
            img, lab = pairs[int(torch.randint(len(pairs), (1,), generator=g))]
            y, x = (int(torch.randint(side - crop + 1, (1,), generator=g)) for _ in range(2))
            imgs.append(img[:, y:y + crop, x:x + crop])
            labs.append(lab[y:y + crop, x:x + crop])
        out.append((torch.stack(imgs), torch.stack(labs)))
    return out


def _shard_batches(cfg, uri: str, n: int):
    from pipelines.train.data import train_loader

    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": uri})})
    out = []
    epoch = 0
    while len(out) < n:
        for batch in train_loader(cfg, epoch=epoch):
            out.append(batch)
            if len(out) == n:
                break
        epoch += 1
    return out


def _loadable(uri: str | None) -> str | None:
    if not uri:
        return None
    from pipelines.common.checkpoint import resolve_checkpoint_dir

    try:
        return resolve_checkpoint_dir(uri)
    except Exception as err:  # missing, unreachable, no credentials: fall back to the oracle
        print(f"step bench train: policy_checkpoint {uri} not usable ({type(err).__name__}); "
              "sharing with the oracle policy")
        return None


# name -> (architecture, inference settings, halting in training)
Variant = tuple[StepConfig, InferenceConfig, bool]


def _variants(cfg: TrainConfig, halt_taus) -> tuple[dict[str, Variant], str, str | None]:
    """The three models (plain, STEP, STEP with halting in training), where the policy
    comes from, and the policy checkpoint to load (None: the oracle)."""
    no_exits = cfg.model.model_copy(update={"exits": cfg.model.exits.model_copy(
        update={"blocks": []})})
    # one exit threshold: the settings must fit a model without exits
    plain = (no_exits, cfg.inference.replace(policy_mode="none",
                                             exit_thresholds=cfg.inference.exit_thresholds[0]),
             False)
    # Sharing needs a trained policy: without a loadable policy_checkpoint the STEP models
    # share with the oracle (an upper bound), as a random policy's choices mean nothing.
    policy_uri = None
    if cfg.inference.policy_mode in ("threshold", "budget"):
        policy_uri = _loadable(cfg.policy_checkpoint)
    step = cfg.inference if policy_uri else cfg.inference.replace(policy_mode="oracle")
    halting = step.replace(halting=True, exit_thresholds=list(halt_taus))
    variants = {"plain": plain, "step": (cfg.model, step, False),
                "step_halting": (cfg.model, halting, True)}
    return variants, policy_uri or "oracle", policy_uri


def _time_variants(cfg: TrainConfig, args: BenchTrainOptions, variants: dict[str, Variant],
                   policy_uri: str | None, data, device):
    """Train every variant on the same batches, interleaved round by round; (samples/s of
    each round, mean tokens per block of each step) per variant."""
    import torch

    from pipelines.common.data import batch_to_device
    from pipelines.common.model import build_model
    from pipelines.common.precision import autocast
    from pipelines.train.optim import build_optimizer
    from step_model import step_loss

    models, optims = {}, {}
    for name, (arch, inference, halt_in_training) in variants.items():
        torch.manual_seed(cfg.train.seed)
        model = build_model(arch, inference).to(device)
        model.halt_in_training(halt_in_training)
        if policy_uri and name != "plain":
            from pipelines.train.stages import load_policy_weights

            load_policy_weights(model, policy_uri)
        model.policy.requires_grad_(False)
        models[name] = model.train()
        optims[name] = build_optimizer(
            [(n, p) for n, p in model.named_parameters() if p.requires_grad], cfg.optim)
    tokens: dict[str, list[float]] = {k: [] for k in variants}

    def step(name: str, images, labels) -> None:
        model, opt = models[name], optims[name]
        images, labels = batch_to_device(images, labels, device)
        with autocast(device, cfg.train.precision):
            out = model(images, labels)
            loss = step_loss(out, labels, model.cfg)["total"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens[name].append(float(out.flow.tokens_per_block.double().mean()))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for name in variants:
        for images, labels in data[: args.warmup]:
            step(name, images, labels)
    timings: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.repeats):
        chunk = data[args.warmup + r * args.steps: args.warmup + (r + 1) * args.steps]
        for name in variants:  # interleaved: every round runs every model
            sync()
            t0 = time.perf_counter()
            for images, labels in chunk:
                step(name, images, labels)
            sync()
            timings[name].append(len(chunk) * cfg.data.batch_size / (time.perf_counter() - t0))
    return timings, tokens


def bench(cfg: TrainConfig, args: BenchTrainOptions, config: str | None = None) -> dict:
    """Run the benchmark; returns the result document (``step bench train --json``)."""
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    crop, batch = cfg.data.crop_size, cfg.data.batch_size
    n_batches = args.warmup + args.steps * args.repeats
    data = (_shard_batches(cfg, args.data, n_batches) if args.data
            else _fixture_batches(crop, batch, n_batches, cfg.train.seed))
    halt_taus = (args.halt_thresholds
                 or cfg.inference.apply(cfg.finetune.inference).exit_thresholds)
    variants, policy_source, policy_uri = _variants(cfg, halt_taus)
    timings, tokens = _time_variants(cfg, args, variants, policy_uri, data, device)

    per_s = {k: statistics.median(v) for k, v in timings.items()}
    grid = (crop // 16) ** 2
    result = {
        "config": str(config), "backbone": cfg.model.backbone, "image_size": crop,
        "batch_size": batch, "device": str(device), "precision": cfg.train.precision,
        "steps_per_round": args.steps, "repeats": args.repeats,
        "data": args.data or str(FIXTURES),
        "halt_thresholds": list(halt_taus),
        "policy": policy_source,
        "plain_samples_per_s": per_s["plain"],
        "step_samples_per_s": per_s["step"],
        "step_halting_samples_per_s": per_s["step_halting"],
        "speedup": per_s["step"] / per_s["plain"],
        "speedup_halting": per_s["step_halting"] / per_s["plain"],
        "tokens_in": grid,
        "tokens_per_block_mean": {k: statistics.fmean(v) for k, v in tokens.items()},
        "samples_per_s_rounds": timings,
    }
    print(f"step bench train: {cfg.model.backbone} at {crop}px, batch {batch}, {device}: "
          f"plain {per_s['plain']:.3g} samples/s, STEP {per_s['step']:.3g} "
          f"({result['speedup']:.2f}x), STEP+halting {per_s['step_halting']:.3g} "
          f"({result['speedup_halting']:.2f}x)")
    return result
