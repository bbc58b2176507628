"""One trial of the threshold search: evaluate the fixed checkpoint with one setting.

Nothing is trained: every knob is an inference-time setting
(``step_model.config.InferenceConfig``). A trial evaluates the settings the search starts
from (``TrialContext.base``: the checkpoint's own with the search's ``inference``
applied) with its space point applied; the same evaluation gives the search its
reference (the unpruned model, :func:`reference_inference`). Each evaluation keeps its per-image
confusion matrices; a trial resamples them with the reference's (same images, same order,
checked by sample key) into its drop's interval (:mod:`pipelines.evaluate.bootstrap`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.tune.pareto import is_feasible, miou_drop, penalised_objective, rule_drop
from pipelines.tune.space import SearchSpace
from step_model.config import InferenceConfig, InferenceOverrides, overrides_given

# What a trial reports, and what the Pareto CSV carries per trial (``groups``, a dict, and
# ``worst_group``, a name, are kept in the trial's record, not logged as metrics).
TRIAL_METRICS = ("miou", "drop", "gflops", "tokens_mean", "halted_fraction", "latency_ms",
                 "latency_ratio", "latency_spread", "latency_ms_reference", "cost",
                 "feasible", "objective", "drop_lo", "drop_hi", "tail_drop",
                 "tail_pixel_drop", "tail_images", "worst_group_drop", "worst_group", "groups")


def reference_inference(settings: Any = None) -> InferenceOverrides:
    """The unpruned model: plain 16x16 tokens (policy ``none``: the policy network does not
    run) and halting off (the exit heads do not run), i.e. the plain ViT + decoder the
    STEP papers compare against; the other settings of ``settings`` (changes, or an
    InferenceConfig's dict: upsampling, varlen ...) kept, so that a drop compares like with
    like. A threshold of 1.0 would not do: fp32 softmax does reach exactly 1.0. The exit
    thresholds are left to the model's own: with halting off they decide nothing, and a
    model without exits (the plain ViT baseline) refuses one per exit of another."""
    given = {k: v for k, v in overrides_given(settings).items() if k != "exit_thresholds"}
    return InferenceOverrides.model_validate({**given, "policy_mode": "none", "halting": False})


def trial_inference(base: dict[str, Any], changes: InferenceOverrides | None) -> InferenceConfig:
    """The full settings a trial (or the reference) runs with: ``changes`` applied to the
    search's starting settings ``base`` (an InferenceConfig's dict)."""
    return InferenceConfig.model_validate(base).apply(changes)


def evaluate(checkpoint: str, data: str, inference: Any, *,
             max_samples: int | None, device: str, progress: bool = False,
             holdout: dict[str, Any] | None = None) -> dict[str, Any]:
    """One evaluation as a plain dict. Quiet by default: a search shows one line per
    trial (:mod:`pipelines.tune.progress`), not each evaluation's own progress."""
    return evaluate_images(checkpoint, data, inference, max_samples=max_samples,
                           device=device, progress=progress, holdout=holdout)[0]


def evaluate_images(checkpoint: str, data: str, inference: Any, *,
                    max_samples: int | None, device: str, progress: bool = False,
                    holdout: dict[str, Any] | None = None, part: str = "search"):
    """(evaluation dict, :class:`~pipelines.evaluate.bootstrap.ImageConfusions`) with
    ``inference`` (an InferenceConfig, or changes to the checkpoint's own settings): the
    images of ``data`` the search may see (``holdout`` left out), or with
    ``part="holdout"`` only the held-out ones."""
    from pipelines.evaluate.evaluator import EvalOptions, evaluate_checkpoint

    options = EvalOptions(max_samples=max_samples, latency_samples=3, progress=progress,
                          per_image=True)
    result = evaluate_checkpoint(checkpoint, data, inference=inference, options=options,
                                 device=device, holdout=holdout, part=part)
    return result.to_dict(), result.images


def model_num_exits(checkpoint: str) -> int:
    """Exit heads of the checkpoint's model (from its config; builds it only when the
    exit blocks follow the backbone's depth)."""
    from pipelines.common.checkpoint import load_model, read_configs, resolve_checkpoint_dir

    checkpoint = resolve_checkpoint_dir(checkpoint)
    blocks = read_configs(checkpoint)[0].exits.blocks
    if blocks is not None:
        return len(blocks)
    model, _ = load_model(checkpoint)
    return len(model.exit_blocks)


def trial_metrics(m: dict[str, Any], baseline: dict[str, Any], max_drop: float,
                  drop_mode: str, interval=None, guard: Any = "none",
                  slices: dict[str, Any] | None = None,
                  latency: dict[str, float] | None = None) -> dict[str, Any]:
    """The flat metrics a trial reports (and MLflow logs), from an evaluation dict and,
    when given, the drop's bootstrap interval (a ``DropInterval``) and its tail and group
    figures (:func:`slice_figures`). ``feasible`` and the searcher's ``objective`` follow
    the guard, so that the searcher is pulled towards configurations the guarded rule can
    pick. ``latency`` (``tune.cost: latency``: :func:`pipelines.tune.latency.
    latency_figures`) makes the latency ratio the trial's ``cost`` and the objective's."""
    drop = miou_drop(baseline["miou"], m["miou"], drop_mode)
    out = {
        "miou": float(m["miou"]),
        "drop": float(drop),
        "gflops": float(m["gflops"]),
        "tokens_mean": float(m.get("tokens_mean") or 0.0),
        "halted_fraction": float(m.get("halted_fraction") or 0.0),
        "latency_ms": float(m.get("latency_ms") or 0.0),
    }
    if interval is not None:
        out.update(drop_lo=float(interval.lo), drop_hi=float(interval.hi))
    out.update(slices or {})
    ruled = rule_drop(out, guard, max_drop)
    out["feasible"] = float(is_feasible(ruled, max_drop))
    if latency is not None:
        out.update(latency)
        out["cost"] = float(latency["latency_ratio"])
        out["objective"] = penalised_objective(out["cost"], ruled, max_drop, 1.0)
    else:
        out["objective"] = penalised_objective(m["gflops"], ruled, max_drop, baseline["gflops"])
    return out


@dataclass(frozen=True)
class TrialContext:
    """What every trial shares: the fixed checkpoint, the data, the reference figures.

    Travels to the trials pickled inside the trainable's arguments (``tune.with_parameters``);
    ``s3_env`` holds the driver's S3 credentials (an ``S3Env``, whose ``repr`` shows names
    only), because the Tuner runs without them in its environment
    (:func:`pipelines.tune.credentials.keys_out_of_env`).
    """

    space: dict[str, Any]  # SearchSpace.model_dump(mode="json")
    base: dict[str, Any]  # InferenceConfig.to_dict(): the settings every trial changes
    num_exits: int
    checkpoint: str
    data: str
    baseline: dict[str, Any]
    max_drop: float
    drop_mode: str
    max_samples: int | None = None
    device: str = "cpu"
    cpus: float = 1.0
    s3_env: dict[str, str] | None = None
    # the reference's per-image confusion matrices (an ImageConfusions): what each trial
    # is resampled against; None = no interval
    reference: Any = None
    guard: Any = "none"  # a preset name or a GuardConfig (pipelines.tune.guard)
    bootstrap_samples: int = 1000
    bootstrap_block: int | str = 1  # runs of consecutive images (pipelines.evaluate.bootstrap)
    confidence: float = 0.95
    seed: int = 0
    holdout: dict[str, Any] | None = None  # Holdout.model_dump(): images the trials skip
    groups: dict[str, Any] | None = None  # Groups.model_dump(): figures per group
    cost: str = "gflops"  # gflops | latency: what "cheapest" means (tune.cost)
    latency: dict[str, Any] | None = None  # LatencySettings.model_dump() under cost latency


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """The Ray Tune function trainable: evaluate the fixed checkpoint with ``config``."""
    import torch
    from ray import tune

    from data_prep.storage import apply_s3_env
    from pipelines.common.console import worker_console

    worker_console()
    apply_s3_env(ctx.s3_env)
    torch.set_num_threads(max(1, int(ctx.cpus)))
    space = SearchSpace.model_validate(ctx.space)
    inference = trial_inference(ctx.base, space.to_inference(config, ctx.num_exits))
    m, images = evaluate_images(ctx.checkpoint, ctx.data, inference,
                                max_samples=ctx.max_samples, device=ctx.device,
                                holdout=ctx.holdout)
    latency = None
    if ctx.cost == "latency":
        from pipelines.tune.latency import LatencySettings, latency_figures

        latency = latency_figures(ctx.checkpoint, ctx.data, reference_inference(ctx.base),
                                  inference, device=ctx.device, holdout=ctx.holdout,
                                  settings=LatencySettings.model_validate(ctx.latency or {}))
    tune.report(trial_metrics(m, ctx.baseline, ctx.max_drop, ctx.drop_mode,
                              interval=drop_interval(ctx, images), guard=ctx.guard,
                              slices=slice_figures(ctx, images), latency=latency))


def slice_figures(ctx: TrialContext, images) -> dict[str, Any]:
    """The tail and group figures of ``images`` against the reference's (empty without a
    reference): ``tail_drop`` / ``tail_pixel_drop`` on the worst fraction of the images
    (the guard's ``tail.fraction``, else 0.2), ``groups`` (per group: images, reference and
    trial mIoU, drop) and ``worst_group_drop`` / ``worst_group`` (groups of at least the
    guard's ``groups.min_images``), when ``ctx.groups`` is set."""
    from pipelines.evaluate.groups import MIN_IMAGES, group_drops, worst_group
    from pipelines.evaluate.tail import tail_drop
    from pipelines.tune.guard import TailCheck, as_guard

    if ctx.reference is None:
        return {}
    g = as_guard(ctx.guard)
    tail = tail_drop(ctx.reference, images, (g.tail or TailCheck()).fraction,
                     ctx.drop_mode)  # type: ignore[arg-type]
    out: dict[str, Any] = {"tail_drop": tail["drop"], "tail_pixel_drop": tail["pixel_drop"],
                           "tail_images": tail["images"]}
    if ctx.groups is not None:
        from pipelines.common.data import resolve_data_uri
        from pipelines.common.groups import key_grouper

        grouper = key_grouper(resolve_data_uri(ctx.data)[0], ctx.groups)
        drops = group_drops(ctx.reference, images, grouper,
                            ctx.drop_mode)  # type: ignore[arg-type]
        worst = worst_group(drops, g.groups.min_images if g.groups else MIN_IMAGES)
        out.update(groups=drops, worst_group=worst[0] if worst else None,
                   worst_group_drop=worst[1] if worst else None)
    return out


def drop_interval(ctx: TrialContext, images):
    """The paired bootstrap of ``images`` against the reference's (None without one)."""
    from pipelines.evaluate.bootstrap import paired_bootstrap

    if ctx.reference is None:
        return None
    return paired_bootstrap(ctx.reference, images, mode=ctx.drop_mode,  # type: ignore[arg-type]
                            samples=ctx.bootstrap_samples, block=ctx.bootstrap_block,
                            confidence=ctx.confidence,
                            seed=ctx.seed)
