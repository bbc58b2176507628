"""Threshold search with Ray Tune: the cheapest inference setting within an mIoU-drop limit.

``search(settings)`` does, in order:

1. evaluates the checkpoint once *unpruned* (no merging, no halting): the reference mIoU
   and GFLOPs every drop is measured against, and its per-image confusion matrices;
2. runs Ray Tune trials. Every knob is an inference-time setting
   (``step_model.config.InferenceConfig``), so a trial only *evaluates* the fixed checkpoint
   with its settings (the checkpoint's own, ``inference`` applied, then the trial's point
   of the space); nothing is trained. Trials run in parallel within the resources given
   (``resources_per_trial``: CPUs here, a GPU each on a cluster). Each reports mIoU, drop
   with its 95 % paired-bootstrap interval (``drop_lo``, ``drop_hi``), GFLOPs, tokens,
   halted fraction and latency. Images held out (``holdout``) never reach a trial;
3. picks the answer over *all* finished trials with :mod:`pipelines.tune.pareto` (cheapest
   feasible, Pareto front, closest when nothing is feasible) rather than trusting the
   searcher's own "best": the searcher optimises a penalised scalar, the answer follows the
   rule the user asked for. Under ``guard: robust`` (default, :mod:`pipelines.tune.guard`)
   feasible means the interval's upper end, the drop on the worst fifth of the images and
   the worst group's drop are within the limit; the point-estimate ("plain") answer is
   reported too;
3a. screens for cliff edges (:mod:`pipelines.tune.cliff`): the cheapest guarded points
   whose neighbours one grid step more aggressive fall off steeply are not chosen;
3b. confirms (:mod:`pipelines.tune.confirm`): the few cheapest feasible trials and the
   reference are evaluated again on every searchable image (not ``max_samples``), and
   the answer is chosen over those figures;
4. logs to MLflow: a parent run for the search, one nested child run per trial
   (``mlflow.parentRunId``), each ended FINISHED or FAILED, the Pareto CSV and plot and the
   best thresholds as params on the parent, and the tuned model registered in the model
   registry with its thresholds and measured mIoU / GFLOPs as tags.

Design choices:

* **Child runs are written by the driver** (:mod:`pipelines.tracking.trials`), not by
  the trials.
* **Objective for the searchers**: ``pareto.penalised_objective`` (relative GFLOPs when
  feasible, 10 + normalised violation otherwise), minimised. Optuna's TPE sees a smooth
  pull towards the feasible boundary instead of a flat wall.
* **Credentials never reach Ray's records** (:mod:`pipelines.tune.credentials`).
* **Progress and failures**: one line per finished trial (:mod:`pipelines.tune.progress`);
  a search in which every trial failed raises :class:`TrialsFailed` with the first
  trial's error instead of reporting "0 trials".
* **Grid search** runs the exhaustive product of the (discretised) space in one sample;
  it is the blind baseline that Optuna has to beat (see docs/pipeline.md for numbers).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from pipelines.common.console import verbose
from pipelines.common.errors import ExpectedFailure
from pipelines.common.groups import Groups
from pipelines.common.holdout import Holdout, fill_group_by
from pipelines.common.settings import StrictModel
from pipelines.tune.confirm import (
    SEARCH_FIGURES,
    Confirmation,
    candidates,
    confirm,
    searchable_images,
)
from pipelines.tune.credentials import keys_out_of_env, tune_storage, upload_results
from pipelines.tune.guard import GuardConfig, GuardSetting, as_guard, checks
from pipelines.tune.latency import LatencySettings
from pipelines.tune.pareto import Selection, mark_choices, pareto_plot, select, trials_csv
from pipelines.tune.progress import error_summary, progress_callback, trial_error
from pipelines.tune.resume import experiment_name, open_tuner, snapshots_every_step
from pipelines.tune.space import SearchSpace, load_space
from pipelines.tune.trial import (
    TRIAL_METRICS,
    TrialContext,
    evaluate_images,
    model_num_exits,
    reference_inference,
    run_trial,
    trial_inference,
)
from step_model.config import InferenceConfig, InferenceOverrides

log = logging.getLogger(__name__)


class TrialsFailed(ExpectedFailure):
    """Every trial of a search failed: there is nothing to choose from (``step tune``
    exits 1 naming the first trial's error; the search's MLflow run ends FAILED)."""


Search = Literal["optuna", "random", "grid"]
# what each answer in the --json document carries besides mIoU, GFLOPs and the interval
GUARD_FIGURES = ("tail_drop", "tail_pixel_drop", "tail_images", "worst_group",
                 "worst_group_drop", "groups",
                 "cliff_step", "cliff_neighbour", "confirm_confidence")


class TrialResources(StrictModel):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class TuneSettings(StrictModel):
    """Everything ``step tune`` needs (also the ``tune`` section of a pipeline config)."""

    checkpoint: str | None = Field(None, description="STEP checkpoint dir (local or s3://)")
    data: str | None = Field(None, description="validation shards written by `step prep`")
    space: str = Field("joint", description="a tune_spaces/ name or a YAML file")
    inference: InferenceOverrides = Field(
        InferenceOverrides(), description="changes to the checkpoint's inference settings, "
        "for the reference and every trial (the space's dimensions override them)")
    max_drop: float = Field(2.0, ge=0, description="largest acceptable mIoU drop (percent)")
    drop_mode: Literal["points", "relative"] = "points"
    cost: Literal["gflops", "latency"] = Field(
        "gflops", description="what the cheapest feasible trial minimises: gflops, or "
        "latency (each trial times its forward against the reference's in the same "
        "trial and reports the ratio and its spread)")
    latency: LatencySettings = Field(LatencySettings(), description="how a trial times "
                                     "latency under cost latency")
    search: Search = "optuna"
    num_samples: int = Field(24, ge=1, description="trials (grid: ignored, the grid decides)")
    max_concurrent: int = Field(2, ge=1)
    resources_per_trial: TrialResources = TrialResources()
    max_samples: int | None = Field(None, ge=1, description="val images per evaluation")
    guard: GuardSetting = Field(
        GuardConfig(), description="which trials count as within max_drop: none (point "
        "drop), ci (upper end of the interval), robust (default: the interval, the worst "
        "group, no cliff one step more aggressive, Bonferroni at the confirmation), strict "
        "(robust and the worst fifth of the images), or a mapping of those checks "
        "(docs/tuning.md)")
    confirm_top: int = Field(3, ge=0, description="cheapest feasible trials (per rule) "
                             "re-evaluated on every searchable image before choosing; 0 = off")
    confirm_rounds: int = Field(5, ge=1, description="when no confirmed candidate passes "
                                "the guard, confirm the next confirm_top cheapest per rule, "
                                "up to this many rounds in all (intervals corrected for every "
                                "candidate confirmed)")
    bootstrap_samples: int = Field(1000, ge=100, description="paired bootstrap resamples")
    bootstrap_block: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1, description="resample runs of this many consecutive images (in key order) "
        "instead of images one by one: frames of one recording are not independent draws "
        "(the circular block bootstrap); auto = round(n ** (1/3)); 1 = one by one")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="level of the drop interval "
                              "(two-sided: 0.95 guards the upper end at 97.5 %)")
    holdout: Holdout | None = Field(None, description="images the search never sees: "
                                    "{fraction: F} of the validation keys, {split: S}, "
                                    "and/or whole {groups: [...]} of `groups`")
    groups: Groups | None = Field(None, description="how sample keys fall into groups "
                                  "(recordings, cities): {pattern: REGEX} or {column: NAME}; "
                                  "every trial reports its drop per group")
    seed: int = 0
    name: str = "step-tune"
    storage_path: str = Field("runs/ray", description="Ray Tune results (local or s3://)")
    tracking_uri: str | None = None
    experiment: str = "step-seg"
    register_name: str | None = Field("step-seg", description="registry name; None = skip")
    allow_oracle: bool = Field(False, description="allow trials in policy mode 'oracle' "
                               "(tokens chosen from the labels: an upper bound)")

    @model_validator(mode="after")
    def _holdout_groups_defined(self) -> TuneSettings:
        fill_group_by(self.holdout, self.groups, "groups")
        return self


@dataclass
class TuneOutcome:
    tracking_uri: str
    parent_run_id: str
    settings: TuneSettings
    baseline: dict[str, Any]
    selection: Selection
    trials: list[dict[str, Any]]
    best_inference: dict[str, Any] | None = None
    registered_model: dict[str, Any] | None = None
    failed_trials: int = 0
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    confirmation: Confirmation | None = None
    inference_of: Any = None  # params -> the trial's full InferenceConfig as a dict

    @property
    def final(self) -> Selection:
        """The selection the answer comes from: over the confirmed candidates when there
        was a confirmation, else over every trial."""
        return self.confirmation.selection if self.confirmation else self.selection

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document of ``step tune`` (and the core of ``step run``'s)."""
        sel, final = self.selection, self.final

        def brief(t: dict[str, Any] | None, inference: bool = False) -> dict[str, Any] | None:
            if t is None:
                return None
            out = {"miou": t["miou"], "gflops": t["gflops"], "drop": t["drop"],
                   "drop_lo": t.get("drop_lo"), "drop_hi": t.get("drop_hi"),
                   "tokens_mean": t.get("tokens_mean"),
                   "halted_fraction": t.get("halted_fraction"),
                   "latency_ms": t.get("latency_ms"), "latency_ratio": t.get("latency_ratio"),
                   "latency_spread": t.get("latency_spread"), "params": t["params"],
                   "trial_id": t.get("trial_id"), "run_id": t.get("run_id")}
            out["num_images"] = t.get("num_images")
            out.update({k: t.get(k) for k in GUARD_FIGURES if k in t})
            if "search_drop" in t:  # confirmed: the figures on the searched images too
                out.update(search={k: t.get(f"search_{k}") for k in SEARCH_FIGURES})
            if inference and self.inference_of is not None:
                out["inference"] = self.inference_of(t["params"])
            return out

        best = brief(final.best)
        if best is not None:
            best["inference"] = self.best_inference
        judged = final.best or final.closest
        verdict = checks(judged, final.guard, final.max_drop) if judged is not None else []
        return {
            "tracking_uri": self.tracking_uri,
            "parent_run_id": self.parent_run_id,
            "max_drop": sel.max_drop,
            "drop_mode": sel.drop_mode,
            "guard": as_guard(final.guard).name,
            "guard_config": as_guard(final.guard).model_dump(mode="json"),
            # each check of the guard on the chosen trial (or the closest one)
            "guard_verdict": verdict,
            "search": self.settings.search,
            "cost": self.settings.cost,
            "space": self.settings.space,
            "baseline": {k: self.baseline.get(k) for k in
                         ("miou", "gflops", "tokens_mean", "halted_fraction", "latency_ms",
                          "num_images")},
            "feasible": final.feasible,
            "message": final.message(),
            "search_message": sel.message(),
            "best": best,
            "plain": brief(final.plain, inference=True),
            "guarded": brief(final.guarded, inference=True),
            "closest": brief(final.closest),
            "confirmation": self.confirmation.to_json() if self.confirmation else None,
            "holdout": self.settings.holdout.model_dump() if self.settings.holdout else None,
            "pareto": [brief(t) for t in sel.front],
            "evaluations": len(self.trials) + 1 + (  # + the reference evaluation(s)
                len(self.confirmation.trials) + 1 if self.confirmation else 0),
            # the search's trials; the neighbours the cliff screen evaluated apart
            "n_trials": sum(t.get("source") != "neighbour" for t in self.trials),
            "n_neighbours": sum(t.get("source") == "neighbour" for t in self.trials),
            "n_feasible": sel.n_feasible,
            "failed_trials": self.failed_trials,
            "registered_model": self.registered_model,
            "wall_s": round(self.wall_s, 2),
            # trials of the label oracle: an upper bound, never a model's result
            "uses_labels": bool(self.extra.get("uses_labels")),
            "upper_bound": bool(self.extra.get("uses_labels")),
        }


# ---------------------------------------------------------------------------------------
# the driver

def _searcher(settings: TuneSettings):
    if settings.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        # TPE's default is 10 random start-up trials: most of a small budget. A third of
        # the budget (3..10) explores, the rest is model-guided.
        startup = min(10, max(3, settings.num_samples // 3))
        sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=startup,
                                             multivariate=True)
        if not verbose():  # Optuna's own switch: its lines to the log file, not the terminal
            optuna.logging.disable_default_handler()
            optuna.logging.enable_propagation()
        from ray.tune.search import ConcurrencyLimiter

        # batches of max_concurrent trials, each suggested from the same completed history:
        # the same trials for the same seed, whichever trial of a batch finishes first, and
        # after a resume (pipelines/tune/resume.py)
        return ConcurrencyLimiter(
            OptunaSearch(metric="objective", mode="min", sampler=sampler),
            max_concurrent=settings.max_concurrent, batch=True)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=settings.seed)


def preflight(settings: TuneSettings) -> tuple[SearchSpace, int]:
    """Check what can be checked before any run or trial starts (the space, the settings
    against the checkpoint, the oracle); (space, exits)."""
    from pipelines.common.settings import ConfigError

    if not settings.checkpoint or not settings.data:
        raise ConfigError("tune: both checkpoint and data are required "
                          f"(given checkpoint={settings.checkpoint!r}, data={settings.data!r})")
    space = load_space(settings.space)
    try:
        num_exits = model_num_exits(settings.checkpoint)
    except FileNotFoundError as err:
        raise ConfigError(f"tune: --checkpoint {settings.checkpoint}: {err}") from None
    space.check_model(num_exits)
    try:
        base_inference(settings).check_exits(num_exits)
    except ValueError as err:
        raise ConfigError(f"tune: {err}") from None
    if uses_oracle_trials(settings, space) and not settings.allow_oracle:
        from pipelines.common.oracle import refuse_oracle

        refuse_oracle("tune", "--allow-oracle (tune.allow_oracle: true in a pipeline config)")
    if settings.search == "grid" and space.grid_size() is None:
        space.tune_param_space("grid")  # raises, naming the continuous dimension
    return space, num_exits


def base_inference(settings: TuneSettings) -> InferenceConfig:
    """The settings the search starts from: the checkpoint's, ``settings.inference``
    applied."""
    from pipelines.common.checkpoint import resolve_checkpoint_dir
    from pipelines.common.oracle import checkpoint_inference

    try:
        return checkpoint_inference(resolve_checkpoint_dir(settings.checkpoint),
                                    settings.inference)
    except ValueError as err:  # a validation error: the settings, not the run, are wrong
        from pipelines.common.settings import ConfigError

        raise ConfigError(f"tune: inference: {err}") from None


def uses_oracle_trials(settings: TuneSettings, space: SearchSpace) -> bool:
    """Whether the trials select tokens with the label oracle: the space's policy modes
    include it, or the space sets no mode of its own (no merge thresholds, no budget, no
    policy_mode) and the settings it starts from are in mode oracle."""
    if space.policy_mode is not None:
        return "oracle" in (space.policy_mode.grid() or [])
    if space.merge_thresholds is not None or space.budget is not None:
        return False
    return base_inference(settings).policy_mode == "oracle"


def search(settings: TuneSettings, *, parent_run_id: str | None = None,
           run_id: str | None = None) -> TuneOutcome:
    """Run the whole search; see the module docstring.

    ``parent_run_id`` nests the search's run under a pipeline run; ``run_id`` reuses an
    existing run as the search's parent run (the workflow's ``tune`` step run), which its
    owner ends. A run the search creates itself ends FINISHED, or FAILED on any error:
    never left RUNNING.
    """
    from pipelines.common import storage
    from pipelines.common.checkpoint import resolve_checkpoint_dir
    from pipelines.tracking.runs import RunLogger, create_run, resolve_tracking_uri

    t0 = time.monotonic()
    space, num_exits = preflight(settings)
    checkpoint = storage.absolute(resolve_checkpoint_dir(settings.checkpoint))
    data = storage.absolute(settings.data)
    tracking_uri = resolve_tracking_uri(settings.tracking_uri)
    owned = run_id is None
    if owned:
        run_id = create_run(tracking_uri, settings.experiment, run_name=settings.name,
                            tags={"step.kind": "tune"}, parent_run_id=parent_run_id)
    tracker = RunLogger(run_id, tracking_uri)
    oracle = uses_oracle_trials(settings, space)
    if oracle:
        from pipelines.common.oracle import ORACLE_TAGS

        tracker.set_tags(ORACLE_TAGS)
        print("tune: the trials use the label oracle: every figure is an upper bound",
              flush=True)
    try:
        outcome = _search(settings, space, num_exits, checkpoint, data, tracker)
        outcome.extra["uses_labels"] = oracle
    except BaseException:
        if owned:
            tracker.end("FAILED")
        raise
    outcome.wall_s = time.monotonic() - t0
    tracker.log_dict(outcome.to_json(), "tune_result.json")
    if owned:
        tracker.end("FINISHED")
    return outcome


def _search(settings: TuneSettings, space: SearchSpace, num_exits: int, checkpoint: str,
            data: str, tracker) -> TuneOutcome:
    """The search proper, recorded on the run of ``tracker`` (a ``RunLogger``)."""
    tracker.log_params({
        "checkpoint": checkpoint, "data": data, "space": space.name,
        "max_drop": settings.max_drop, "drop_mode": settings.drop_mode,
        "search": settings.search, "num_samples": _num_trials(settings, space),
        "max_samples": settings.max_samples, "seed": settings.seed,
        "resources_per_trial": settings.resources_per_trial.model_dump(),
        "guard": settings.guard.describe(), "confirm_top": settings.confirm_top,
        "confirm_rounds": settings.confirm_rounds,
        "bootstrap_samples": settings.bootstrap_samples, "confidence": settings.confidence,
        "bootstrap_block": settings.bootstrap_block,
        "holdout": settings.holdout.model_dump() if settings.holdout else None,
    })
    tracker.log_dict(space.model_dump(mode="json"), "search_space.json")

    ctx = _reference(settings, space, num_exits, checkpoint, data, tracker)
    trials, failed, first_error = _run_trials(settings, space, ctx, tracker.tracking_uri,
                                              tracker.run_id)
    if not trials:
        msg = (f"all {failed} trials failed; the first one's error: {first_error}"
               if failed else "the search ran no trials")
        tracker.log_metrics({"n_trials": 0, "failed_trials": failed})
        tracker.set_tags({"step.tune.result": "failed", "step.tune.message": msg[:4000]})
        raise TrialsFailed(msg)
    if failed:
        print(f"warning: {failed} of {failed + len(trials)} trials failed; the first one's "
              f"error: {first_error}", flush=True)
    return _choose(settings, space, num_exits, ctx, trials, failed, tracker)


def _num_trials(settings: TuneSettings, space: SearchSpace) -> int:
    return space.grid_size() if settings.search == "grid" else settings.num_samples


def _reference(settings: TuneSettings, space: SearchSpace, num_exits: int, checkpoint: str,
               data: str, tracker) -> TrialContext:
    """Start Ray, evaluate the unpruned reference once; the context every trial shares."""
    from data_prep.storage import capture_s3_env
    from pipelines.common.cluster import init_ray

    device = "cuda" if settings.resources_per_trial.gpu > 0 else "cpu"
    s3_env = capture_s3_env()  # before the keys leave the environment
    with keys_out_of_env():
        # a local Ray started here does not inherit the keys either: trials get them
        # from their arguments only
        init_ray()
    log.info("tune: reference evaluation of %s (unpruned)", checkpoint)
    holdout = settings.holdout.model_dump() if settings.holdout else None
    base = base_inference(settings).to_dict()
    baseline, images = evaluate_images(checkpoint, data, reference_inference(base),
                                       max_samples=settings.max_samples, device=device,
                                       holdout=holdout)
    tracker.log_metrics({f"baseline_{k}": baseline[k] for k in
                         ("miou", "gflops", "tokens_mean", "latency_ms", "num_images")
                         if k in baseline})
    tracker.log_dict(baseline, "baseline_eval.json")
    if len(images) < 20:
        print(f"warning: the drop intervals come from {len(images)} image(s); a bootstrap "
              "over so few is too narrow to guard anything (raise max_samples)", flush=True)
    return TrialContext(
        space=space.model_dump(mode="json"), base=base, num_exits=num_exits,
        checkpoint=checkpoint,
        data=data, baseline=baseline, max_drop=settings.max_drop,
        drop_mode=settings.drop_mode, max_samples=settings.max_samples, device=device,
        cpus=settings.resources_per_trial.cpu, s3_env=s3_env, reference=images,
        guard=settings.guard, bootstrap_samples=settings.bootstrap_samples,
        bootstrap_block=settings.bootstrap_block,
        confidence=settings.confidence, seed=settings.seed, holdout=holdout,
        groups=settings.groups.model_dump(mode="json") if settings.groups else None,
        cost=settings.cost, latency=settings.latency.model_dump())


def _run_trials(settings: TuneSettings, space: SearchSpace, ctx: TrialContext,
                tracking_uri: str, run_id: str) -> tuple[list[dict[str, Any]], int, str | None]:
    """Run the Tuner; (finished trials, number failed, the first failure's error)."""
    from ray import tune

    from pipelines.tracking.runs import get_or_create_experiment
    from pipelines.tracking.trials import trial_runs_callback

    res = settings.resources_per_trial
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                    {"cpu": res.cpu, "gpu": res.gpu})
    exp_id = get_or_create_experiment(tracking_uri, settings.experiment)
    callback = trial_runs_callback(tracking_uri, exp_id, run_id, params_of=space.normalise,
                                   metric_names=TRIAL_METRICS, error_of=trial_error)
    total = _num_trials(settings, space)
    progress = progress_callback(total, space, time.monotonic())
    ray_storage, upload_to = tune_storage(settings.storage_path)
    experiment = experiment_name(settings, space, ctx.checkpoint, ctx.data)
    print(f"tune: {total} trials over space {space.name!r} ({settings.search}), "
          f"up to {settings.max_concurrent} at a time; reference mIoU "
          f"{100 * ctx.baseline['miou']:.2f}, GFLOPs {ctx.baseline['gflops']:.3f}", flush=True)
    grid_search = settings.search == "grid"
    tuner = open_tuner(
        trainable,
        param_space=space.tune_param_space(settings.search),
        tune_config=tune.TuneConfig(
            search_alg=None if grid_search else _searcher(settings),
            num_samples=1 if grid_search else settings.num_samples,
            # optuna: its ConcurrencyLimiter limits (Tune warns when both do)
            max_concurrent_trials=None if settings.search == "optuna"
            else settings.max_concurrent,
            metric="objective", mode="min",
        ),
        run_config=tune.RunConfig(name=experiment, storage_path=ray_storage,
                                  callbacks=[callback, progress], verbose=0),
        run_id=run_id, tracking_uri=tracking_uri,
    )
    fitted = False
    try:
        with keys_out_of_env(), snapshots_every_step():
            grid = tuner.fit()
        fitted = True
    finally:
        callback.close_all()
        if upload_to is not None:  # a search that did not end stays staged, to resume
            upload_results(Path(ray_storage), experiment, upload_to, remove=fitted)

    trials: list[dict[str, Any]] = []
    failed, first_error = 0, None
    for result in sorted(grid, key=_creation_order):
        tid = (result.metrics or {}).get("trial_id") or _trial_id_of(result)
        metrics = callback.last.get(tid) or (result.metrics or {})
        if result.error is not None or "miou" not in metrics:
            failed += 1
            if first_error is None:
                first_error = progress.errors.get(tid) or (
                    error_summary(result.error) if result.error is not None
                    else "the trial reported no metrics")
            continue
        trials.append({"trial_id": tid, "run_id": callback.run_ids.get(tid),
                       "params": space.normalise(result.config),
                       "num_images": ctx.baseline.get("num_images"),
                       **{k: metrics[k] for k in TRIAL_METRICS if k in metrics}})
    return trials, failed, first_error


def _choose(settings: TuneSettings, space: SearchSpace, num_exits: int, ctx: TrialContext,
            trials: list[dict[str, Any]], failed: int, tracker) -> TuneOutcome:
    """Select over all trials, confirm the cheapest candidates, record the answer on the
    search's run, register it."""
    from pipelines.tracking.registry import register_tuned_model

    baseline = ctx.baseline
    if settings.guard.cliff is not None:
        from pipelines.tune.cliff import screen

        # as many points as every confirmation round may take (a point whose neighbours were
        # not measured cannot be the guard's choice)
        want = max(1, settings.confirm_top * settings.confirm_rounds)
        trials = screen(trials, space, ctx, settings.guard, want=want,
                        echo=lambda line: print(line, flush=True))
    selection = select(trials, baseline["miou"], settings.max_drop, settings.drop_mode,
                       settings.guard)
    print(selection.message(), flush=True)
    confirmation = _confirm(settings, space, ctx, trials)
    def inference_of(params: dict[str, Any]) -> dict[str, Any]:
        return trial_inference(ctx.base, space.to_inference(params, num_exits)).to_dict()

    outcome = TuneOutcome(tracking_uri=tracker.tracking_uri, parent_run_id=tracker.run_id,
                          settings=settings, baseline=baseline, selection=selection,
                          trials=trials, failed_trials=failed, confirmation=confirmation,
                          inference_of=inference_of)
    final = outcome.final
    if confirmation is not None:
        print(f"after confirmation on {confirmation.images} images: {final.message()}",
              flush=True)
    print(final.choices(), flush=True)
    outcome.best_inference = inference_of(final.best["params"]) if final.best else None
    tracker.log_metrics({"n_trials": sum(t.get("source") != "neighbour" for t in trials),
                         "n_feasible": selection.n_feasible,
                         "failed_trials": failed, "feasible": float(final.feasible)})
    tracker.set_tags({"step.tune.result": "feasible" if final.feasible else "infeasible",
                      "step.tune.message": final.message(),
                      "step.tune.guard": settings.guard.name})
    _log_choices(tracker, final, baseline, confirmation)
    b = final.best
    if b is not None:
        tracker.log_params({f"best.{k}": v for k, v in b["params"].items()})
        tracker.log_params({"best.inference": json.dumps(outcome.best_inference)})
    shown = mark_choices(selection, trials, final.best, final.plain)
    _log_pareto(tracker, shown, trials, baseline)
    if b is not None and settings.register_name:
        outcome.registered_model = register_tuned_model(
            tracker.tracking_uri, tracker.run_id, ctx.checkpoint, outcome.best_inference, b,
            name=settings.register_name, max_drop=final.max_drop,
            drop_mode=final.drop_mode, baseline_miou=final.baseline_miou,
            guard=settings.guard.name)
    return outcome


def _confirm(settings: TuneSettings, space: SearchSpace, ctx: TrialContext,
             trials: list[dict[str, Any]]) -> Confirmation | None:
    """Re-evaluate the cheapest candidates on every searchable image (see
    :mod:`pipelines.tune.confirm`); None when there is nothing to confirm, or the trials
    already saw every such image."""
    if settings.confirm_top == 0 or settings.max_samples is None:
        return None
    seen = int(ctx.baseline.get("num_images") or 0)
    if seen >= searchable_images(ctx.data, ctx.holdout):
        return None
    def cands(top: int) -> list[dict[str, Any]]:
        return candidates(trials, ctx.baseline["miou"], settings.max_drop, settings.drop_mode,
                          top, settings.guard)

    if not cands(settings.confirm_top):
        return None
    return confirm(ctx, space, cands, top=settings.confirm_top,
                   rounds=settings.confirm_rounds, echo=lambda line: print(line, flush=True))


def _log_choices(tracker, final: Selection, baseline: dict[str, Any],
                 confirmation: Confirmation | None) -> None:
    """Both rules' answers (and the one chosen) as metrics of the search's run."""
    metrics: dict[str, float] = {}
    for name, t in (("best", final.best), ("plain", final.plain), ("guarded", final.guarded)):
        if t is None:
            continue
        metrics.update({f"{name}_miou": t["miou"], f"{name}_gflops": t["gflops"],
                        f"{name}_drop": t["drop"]})
        metrics.update({f"{name}_{k}": t[k] for k in ("drop_lo", "drop_hi", "tail_drop",
                                                      "worst_group_drop", "cliff_step",
                                                      "latency_ratio", "latency_spread")
                        if isinstance(t.get(k), (int, float))})
    b = final.best
    if b is not None:
        metrics.update(best_tokens_mean=b.get("tokens_mean", 0),
                       best_halted_fraction=b.get("halted_fraction", 0),
                       gflops_reduction=baseline["gflops"] / max(b["gflops"], 1e-12))
    if confirmation is not None:
        metrics.update(confirm_images=confirmation.images,
                       confirm_candidates=len(confirmation.trials),
                       confirm_baseline_miou=confirmation.reference["miou"])
        tracker.log_dict(confirmation.to_json(), "confirmation.json")
        from pipelines.tracking.runs import RunLogger

        for t in confirmation.trials:  # the full-split figures on each candidate's own run
            if t.get("run_id"):
                RunLogger(t["run_id"], tracker.tracking_uri).log_metrics({
                    f"confirmed_{k}": t[k] for k in ("miou", "drop", "drop_lo", "drop_hi",
                                                     "gflops") if t.get(k) is not None})
    tracker.log_metrics(metrics)


def _creation_order(result) -> int:
    """A trial's index in the order Tune created it (its folder is ``<trainable>_<id>_<index>_
    ...``): a resumed search lists its trials, and breaks ties in the choice, as an
    uninterrupted one does."""
    m = re.search(r"_[0-9a-f]+_(\d+)_", Path(str(getattr(result, "path", "") or "")).name)
    return int(m.group(1)) if m else 1 << 30


def _trial_id_of(result) -> str | None:
    path = getattr(result, "path", "") or ""
    name = Path(str(path)).name
    parts = name.split("_")
    return parts[1] if len(parts) > 2 else None


def _log_pareto(tracker, selection: Selection, trials: list[dict[str, Any]],
                baseline: dict[str, Any]) -> None:
    import tempfile

    tracker.log_text(trials_csv(trials, selection), "pareto/trials.csv")
    tracker.log_text(trials_csv(selection.front, selection), "pareto/pareto_front.csv")
    with tempfile.TemporaryDirectory() as tmp:
        plot = pareto_plot(Path(tmp) / "pareto.png", trials, selection, baseline)
        tracker.log_artifact(plot, "pareto")
