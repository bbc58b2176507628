"""Threshold search with Ray Tune: the cheapest inference setting within an mIoU-drop limit.

``search(settings)`` does, in order:

1. evaluates the checkpoint once *unpruned* (no merging, no halting): the reference mIoU
   and GFLOPs every drop is measured against;
2. runs Ray Tune trials. Every knob is an inference-time setting
   (``StepSegmenter.set_inference``), so a trial only *evaluates* the fixed checkpoint with
   its thresholds; nothing is trained. Trials run in parallel within the resources given
   (``resources_per_trial``: CPUs here, a GPU each on a cluster). Each reports mIoU, drop,
   GFLOPs, tokens, halted fraction and latency;
3. picks the answer over *all* finished trials with :mod:`pipelines.pareto` (cheapest
   feasible, Pareto front, closest when nothing is feasible) rather than trusting the
   searcher's own "best": the searcher optimises a penalised scalar, the answer follows the
   rule the user asked for;
4. logs to MLflow: a parent run for the search, one nested child run per trial
   (``mlflow.parentRunId``), each ended FINISHED or FAILED, the Pareto CSV and plot and the
   best thresholds as params on the parent, and the tuned model registered in the model
   registry with its thresholds and measured mIoU / GFLOPs as tags.

Design choices:

* **Child runs are written by the driver**, from a ``tune.Callback``, not by the trials:
  one writer per store (an embedded SQLite store shared by parallel trial processes
  means lock contention), trials need no MLflow credentials, and a trial process that
  dies cannot leave its run RUNNING: the callback marks it FAILED, and a final sweep
  ends anything still open.
* **Objective for the searchers**: ``pareto.penalised_objective`` (relative GFLOPs when
  feasible, 10 + normalised violation otherwise), minimised. Optuna's TPE sees a smooth
  pull towards the feasible boundary instead of a flat wall.
* **Grid search** runs the exhaustive product of the (discretised) space in one sample;
  it is the blind baseline that Optuna has to beat (see docs/pipeline.md for numbers).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipelines.pareto import Selection, miou_drop, penalised_objective, select
from pipelines.search_space import SearchSpace, load_space
from pipelines.settings import StrictModel

log = logging.getLogger(__name__)

Search = Literal["optuna", "random", "grid"]
# What a trial reports, and what the Pareto CSV carries per trial.
TRIAL_METRICS = ("miou", "drop", "gflops", "tokens_mean", "halted_fraction", "latency_ms",
                 "feasible", "objective")


class TrialResources(StrictModel):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class TuneSettings(StrictModel):
    """Everything ``step tune`` needs (also the ``tune`` section of a pipeline config)."""

    checkpoint: str | None = Field(None, description="STEP checkpoint dir (local or s3://)")
    data: str | None = Field(None, description="validation shards written by `step prep`")
    space: str = Field("joint", description="a tune_spaces/ name or a YAML file")
    max_drop: float = Field(2.0, ge=0, description="largest acceptable mIoU drop (percent)")
    drop_mode: Literal["points", "relative"] = "points"
    search: Search = "optuna"
    num_samples: int = Field(24, ge=1, description="trials (grid: ignored, the grid decides)")
    max_concurrent: int = Field(2, ge=1)
    resources_per_trial: TrialResources = TrialResources()
    max_samples: int | None = Field(None, ge=1, description="val images per evaluation")
    seed: int = 0
    name: str = "step-tune"
    storage_path: str = Field("runs/ray", description="Ray Tune results (local or s3://)")
    tracking_uri: str | None = None
    experiment: str = "step-seg"
    register_name: str | None = Field("step-seg", description="registry name; None = skip")


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

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document of ``step tune`` (and the core of ``step run``'s)."""
        sel = self.selection

        def brief(t: dict[str, Any] | None) -> dict[str, Any] | None:
            if t is None:
                return None
            return {"miou": t["miou"], "gflops": t["gflops"], "drop": t["drop"],
                    "tokens_mean": t.get("tokens_mean"),
                    "halted_fraction": t.get("halted_fraction"),
                    "latency_ms": t.get("latency_ms"), "params": t["params"],
                    "trial_id": t.get("trial_id"), "run_id": t.get("run_id")}

        best = brief(sel.best)
        if best is not None:
            best["inference"] = self.best_inference
        return {
            "tracking_uri": self.tracking_uri,
            "parent_run_id": self.parent_run_id,
            "max_drop": sel.max_drop,
            "drop_mode": sel.drop_mode,
            "search": self.settings.search,
            "space": self.settings.space,
            "baseline": {k: self.baseline.get(k) for k in
                         ("miou", "gflops", "tokens_mean", "halted_fraction", "latency_ms")},
            "feasible": sel.feasible,
            "message": sel.message(),
            "best": best,
            "closest": brief(sel.closest),
            "pareto": [brief(t) for t in sel.front],
            "evaluations": len(self.trials) + 1,  # + the reference evaluation
            "n_trials": len(self.trials),
            "n_feasible": sel.n_feasible,
            "failed_trials": self.failed_trials,
            "registered_model": self.registered_model,
            "wall_s": round(self.wall_s, 2),
        }


# ---------------------------------------------------------------------------------------
# evaluation (runs inside trials and in the driver)

def reference_inference(num_exits: int) -> dict[str, Any]:
    """``set_inference`` kwargs for the unpruned model: plain 16x16 tokens (policy
    ``none``: the policy network does not run) and halting off (the exit heads do not run),
    i.e. the plain ViT + decoder the STEP papers compare against. A threshold of 1.0 would
    not do: fp32 softmax does reach exactly 1.0."""
    return {"policy_mode": "none", "halting": False}


def evaluate(checkpoint: str, data: str, inference: dict[str, Any] | None, *,
             max_samples: int | None, device: str) -> dict[str, Any]:
    from pipelines.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, data, inference=inference,
                                 max_samples=max_samples, device=device)
    return result.to_dict()


def model_num_exits(checkpoint: str) -> int:
    """Exit heads of the checkpoint's model (from its config; builds it only when the
    exit blocks follow the backbone's depth)."""
    from pipelines.checkpoint import load_model, local_dir, read_model_config

    exits = (read_model_config(local_dir(checkpoint)).get("exits") or {})
    if exits.get("blocks") is not None:
        return len(exits["blocks"])
    model, _ = load_model(checkpoint)
    return len(model.exit_blocks)


def trial_metrics(m: dict[str, Any], baseline: dict[str, Any], max_drop: float,
                  drop_mode: str) -> dict[str, float]:
    """The flat metrics a trial reports (and MLflow logs), from an evaluation dict."""
    drop = miou_drop(baseline["miou"], m["miou"], drop_mode)
    out = {
        "miou": float(m["miou"]),
        "drop": float(drop),
        "gflops": float(m["gflops"]),
        "tokens_mean": float(m.get("tokens_mean") or 0.0),
        "halted_fraction": float(m.get("halted_fraction") or 0.0),
        "latency_ms": float(m.get("latency_ms") or 0.0),
        "feasible": float(drop <= max_drop + 1e-9),
        "objective": penalised_objective(m["gflops"], drop, max_drop, baseline["gflops"]),
    }
    return out


def run_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The Ray Tune function trainable: evaluate the fixed checkpoint with ``config``."""
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(ctx["cpus"])))
    space = SearchSpace.model_validate(ctx["space"])
    inference = space.to_inference(config, ctx["num_exits"])
    m = evaluate(ctx["checkpoint"], ctx["data"], inference,
                 max_samples=ctx["max_samples"], device=ctx["device"])
    tune.report(trial_metrics(m, ctx["baseline"], ctx["max_drop"], ctx["drop_mode"]))


# ---------------------------------------------------------------------------------------
# MLflow child runs, written by the driver

def _make_callback(tracking_uri: str, experiment_id: str, parent_run_id: str,
                   space: SearchSpace):
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient
    from ray import tune

    class TrialRuns(tune.Callback):
        """One nested MLflow run per trial, always ended FINISHED or FAILED."""

        def __init__(self) -> None:
            self.client = MlflowClient(tracking_uri)
            self.run_ids: dict[str, str] = {}
            self.last: dict[str, dict[str, Any]] = {}
            self.open: set[str] = set()

        def on_trial_start(self, iteration, trials, trial, **info):
            if trial.trial_id in self.run_ids:
                return
            run = self.client.create_run(
                experiment_id, run_name=f"trial-{trial.trial_id}",
                tags={"mlflow.parentRunId": parent_run_id, "step.kind": "tune-trial",
                      "ray.trial_id": trial.trial_id},
            )
            rid = run.info.run_id
            self.run_ids[trial.trial_id] = rid
            self.open.add(rid)
            params = space.normalise(trial.config)
            self.client.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()])

        def on_trial_result(self, iteration, trials, trial, result, **info):
            rid = self.run_ids.get(trial.trial_id)
            metrics = {k: result[k] for k in TRIAL_METRICS if k in result}
            self.last[trial.trial_id] = metrics
            if rid is None:
                return
            now = int(time.time() * 1000)
            self.client.log_batch(rid, metrics=[
                Metric(k, float(v), now, 0) for k, v in metrics.items()
                if v is not None and math.isfinite(float(v))])

        def _end(self, trial, status: str, error: str | None = None) -> None:
            rid = self.run_ids.get(trial.trial_id)
            if rid is None or rid not in self.open:
                return
            if error:
                self.client.log_batch(rid, tags=[RunTag("step.error", error[:4000])])
            self.client.set_terminated(rid, status)
            self.open.discard(rid)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial, "FINISHED" if trial.trial_id in self.last else "FAILED",
                      None if trial.trial_id in self.last else "trial reported no metrics")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial, "FAILED", str(getattr(trial, "error_file", "") or "trial error"))

        def close_all(self) -> None:
            for rid in list(self.open):
                self.client.set_terminated(rid, "FAILED")
                self.open.discard(rid)

    return TrialRuns()


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
        return OptunaSearch(metric="objective", mode="min", sampler=sampler)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=settings.seed)


def preflight(settings: TuneSettings) -> tuple[SearchSpace, int]:
    """Check what can be checked before any run or trial starts; (space, exits)."""
    from pipelines.settings import ConfigError

    if not settings.checkpoint or not settings.data:
        raise ConfigError("tune: both checkpoint and data are required "
                          f"(given checkpoint={settings.checkpoint!r}, data={settings.data!r})")
    space = load_space(settings.space)
    try:
        num_exits = model_num_exits(settings.checkpoint)
    except FileNotFoundError as err:
        raise ConfigError(f"tune: --checkpoint {settings.checkpoint}: {err}") from None
    space.check_model(num_exits)
    if settings.search == "grid" and space.grid_size() is None:
        space.tune_param_space("grid")  # raises, naming the continuous dimension
    return space, num_exits


def search(settings: TuneSettings, *, parent_run_id: str | None = None,
           run_id: str | None = None) -> TuneOutcome:
    """Run the whole search; see the module docstring.

    ``parent_run_id`` nests the search's run under a pipeline run; ``run_id`` reuses an
    existing run as the search's parent run (the workflow's ``tune`` step run).
    """
    from ray import tune

    from pipelines import storage
    from pipelines.tracking import (
        RunLogger,
        create_run,
        get_or_create_experiment,
        resolve_tracking_uri,
    )
    from pipelines.train import init_ray

    t0 = time.monotonic()
    space, num_exits = preflight(settings)
    checkpoint = storage.absolute(settings.checkpoint)
    data = storage.absolute(settings.data)
    grid_size = space.grid_size()

    tracking_uri = resolve_tracking_uri(settings.tracking_uri)
    exp_id = get_or_create_experiment(tracking_uri, settings.experiment)
    if run_id is None:
        run_id = create_run(tracking_uri, settings.experiment, run_name=settings.name,
                            tags={"step.kind": "tune"}, parent_run_id=parent_run_id)
    tracker = RunLogger(run_id, tracking_uri)
    tracker.log_params({
        "checkpoint": checkpoint, "data": data, "space": space.name,
        "max_drop": settings.max_drop, "drop_mode": settings.drop_mode,
        "search": settings.search,
        "num_samples": grid_size if settings.search == "grid" else settings.num_samples,
        "max_samples": settings.max_samples, "seed": settings.seed,
        "resources_per_trial": settings.resources_per_trial.model_dump(),
    })
    tracker.log_dict(space.model_dump(mode="json"), "search_space.json")

    cpus, gpus = settings.resources_per_trial.cpu, settings.resources_per_trial.gpu
    device = "cuda" if gpus > 0 else "cpu"
    init_ray()

    # 1. the reference: the unpruned model, evaluated once
    log.info("tune: reference evaluation of %s (unpruned)", checkpoint)
    baseline = evaluate(checkpoint, data, reference_inference(num_exits),
                        max_samples=settings.max_samples, device=device)
    tracker.log_metrics({f"baseline_{k}": baseline[k] for k in
                         ("miou", "gflops", "tokens_mean", "latency_ms") if k in baseline})
    tracker.log_dict(baseline, "baseline_eval.json")

    # 2. the trials
    ctx = {"space": space.model_dump(mode="json"), "num_exits": num_exits,
           "checkpoint": checkpoint, "data": data, "max_samples": settings.max_samples,
           "device": device, "cpus": cpus, "baseline": baseline,
           "max_drop": settings.max_drop, "drop_mode": settings.drop_mode}
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                    {"cpu": cpus, "gpu": gpus})
    callback = _make_callback(tracking_uri, exp_id, run_id, space)
    ray_storage, fs = storage.ray_storage(settings.storage_path)
    tuner = tune.Tuner(
        trainable,
        param_space=space.tune_param_space(settings.search),
        tune_config=tune.TuneConfig(
            search_alg=None if settings.search == "grid" else _searcher(settings),
            num_samples=1 if settings.search == "grid" else settings.num_samples,
            max_concurrent_trials=settings.max_concurrent,
            metric="objective", mode="min",
        ),
        run_config=tune.RunConfig(
            name=f"{settings.name}-{run_id[:8]}", storage_path=ray_storage,
            storage_filesystem=fs, callbacks=[callback], verbose=0,
        ),
    )
    try:
        grid = tuner.fit()
    finally:
        callback.close_all()

    trials: list[dict[str, Any]] = []
    failed = 0
    for result in grid:
        tid = result.metrics.get("trial_id") if result.metrics else None
        tid = tid or _trial_id_of(result)
        metrics = callback.last.get(tid) or (result.metrics or {})
        if result.error is not None or "miou" not in metrics:
            failed += 1
            continue
        trials.append({"trial_id": tid, "run_id": callback.run_ids.get(tid),
                       "params": space.normalise(result.config),
                       **{k: metrics[k] for k in TRIAL_METRICS if k in metrics}})

    # 3. the answer
    selection = select(trials, baseline["miou"], settings.max_drop, settings.drop_mode)
    print(selection.message(), flush=True)
    best_inference = space.to_inference(selection.best["params"], num_exits) \
        if selection.best else None

    # 4. the parent run's record
    outcome = TuneOutcome(tracking_uri=tracking_uri, parent_run_id=run_id, settings=settings,
                          baseline=baseline, selection=selection, trials=trials,
                          best_inference=best_inference, failed_trials=failed)
    tracker.log_metrics({"n_trials": len(trials), "n_feasible": selection.n_feasible,
                         "failed_trials": failed, "feasible": float(selection.feasible)})
    tracker.set_tags({"step.tune.result": "feasible" if selection.feasible else "infeasible",
                      "step.tune.message": selection.message()})
    if selection.best is not None:
        b = selection.best
        tracker.log_params({f"best.{k}": v for k, v in b["params"].items()})
        tracker.log_params({"best.inference": json.dumps(best_inference)})
        tracker.log_metrics({"best_miou": b["miou"], "best_gflops": b["gflops"],
                             "best_drop": b["drop"], "best_tokens_mean": b.get("tokens_mean", 0),
                             "best_halted_fraction": b.get("halted_fraction", 0),
                             "gflops_reduction": baseline["gflops"] / max(b["gflops"], 1e-12)})
    _log_pareto(tracker, selection, trials, baseline)
    if selection.best is not None and settings.register_name:
        outcome.registered_model = register_tuned_model(
            tracking_uri, run_id, checkpoint, best_inference, selection, settings)
    outcome.wall_s = time.monotonic() - t0
    tracker.log_dict(outcome.to_json(), "tune_result.json")
    return outcome


def _trial_id_of(result) -> str | None:
    path = getattr(result, "path", "") or ""
    name = Path(str(path)).name
    parts = name.split("_")
    return parts[1] if len(parts) > 2 else None


# ---------------------------------------------------------------------------------------
# artifacts

CSV_FIELDS = ("trial_id", "on_front", "feasible", "miou", "drop", "gflops", "tokens_mean",
              "halted_fraction", "latency_ms")


def trials_csv(trials: list[dict[str, Any]], selection: Selection) -> str:
    """All trials, one row each, with their params and whether they are on the front."""
    front = {id(t) for t in selection.front}
    front_ids = {t.get("trial_id") for t in selection.front}
    names = sorted({k for t in trials for k in t["params"]})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*CSV_FIELDS, *names])
    for t in sorted(trials, key=lambda t: t["gflops"]):
        on_front = id(t) in front or t.get("trial_id") in front_ids
        drop = t.get("drop", miou_drop(selection.baseline_miou, t["miou"], selection.drop_mode))
        feasible = drop <= selection.max_drop + 1e-9
        row = [t.get("trial_id"), int(on_front), int(feasible), t["miou"], drop, t["gflops"],
               t.get("tokens_mean"), t.get("halted_fraction"), t.get("latency_ms")]
        w.writerow(row + [t["params"].get(n) for n in names])
    return buf.getvalue()


def pareto_plot(path: str | Path, trials: list[dict[str, Any]], selection: Selection,
                baseline: dict[str, Any], title: str = "GFLOPs vs mIoU") -> Path:
    """GFLOPs (x) against mIoU (y): all trials, the front, the limit and the answer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ann = [{**t, "feasible": t.get("drop", 0) <= selection.max_drop + 1e-9} for t in trials]
    for feas, colour, label in ((True, "tab:blue", "feasible trial"),
                                (False, "tab:gray", "infeasible trial")):
        pts = [t for t in ann if t["feasible"] == feas]
        if pts:
            ax.scatter([t["gflops"] for t in pts], [100 * t["miou"] for t in pts], s=18,
                       c=colour, alpha=0.7, label=label)
    if selection.front:
        ax.plot([t["gflops"] for t in selection.front],
                [100 * t["miou"] for t in selection.front], "-o", c="tab:orange", ms=4,
                lw=1.2, label="Pareto front")
    ax.scatter([baseline["gflops"]], [100 * baseline["miou"]], marker="*", s=140, c="k",
               label="unpruned reference", zorder=5)
    limit = selection.baseline_miou * 100 - (
        selection.max_drop if selection.drop_mode == "points"
        else selection.max_drop * selection.baseline_miou)
    ax.axhline(limit, ls="--", c="tab:red", lw=1,
               label=f"drop limit {selection.max_drop:g} ({selection.drop_mode})")
    if selection.best is not None:
        ax.scatter([selection.best["gflops"]], [100 * selection.best["miou"]], marker="D",
                   s=60, facecolors="none", edgecolors="tab:green", linewidths=2,
                   label="chosen (cheapest feasible)", zorder=6)
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _log_pareto(tracker, selection: Selection, trials: list[dict[str, Any]],
                baseline: dict[str, Any]) -> None:
    import tempfile

    tracker.log_text(trials_csv(trials, selection), "pareto/trials.csv")
    tracker.log_text(trials_csv(selection.front, selection), "pareto/pareto_front.csv")
    with tempfile.TemporaryDirectory() as tmp:
        plot = pareto_plot(Path(tmp) / "pareto.png", trials, selection, baseline)
        tracker.log_artifact(plot, "pareto")


# ---------------------------------------------------------------------------------------
# the model registry

def register_tuned_model(tracking_uri: str, run_id: str, checkpoint: str,
                         inference: dict[str, Any], selection: Selection,
                         settings: TuneSettings) -> dict[str, Any] | None:
    """Log the checkpoint's model with the chosen thresholds set and register it.

    The registered version carries the thresholds and the measured mIoU / GFLOPs as tags,
    so the registry alone says what a version costs and how accurate it is.
    """
    import mlflow
    import mlflow.pytorch

    from pipelines.checkpoint import load_model

    best = selection.best
    model, _ = load_model(checkpoint)
    model.set_inference(**inference)
    tags = {
        "inference": json.dumps(inference),
        # full precision: the registry is where a deployment reads the measured figures
        "miou": repr(float(best["miou"])),
        "gflops": repr(float(best["gflops"])),
        "miou_drop": repr(float(best["drop"])),
        "max_drop": repr(float(selection.max_drop)),
        "drop_mode": selection.drop_mode,
        "baseline_miou": repr(float(selection.baseline_miou)),
        "checkpoint": checkpoint,
        "tune_run_id": run_id,
    }
    for k, v in inference.items():
        tags[k] = json.dumps(v) if not isinstance(v, str) else v
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id, nested=True):
        info = mlflow.pytorch.log_model(
            # pickle: token counts vary per image, which a traced pt2 graph cannot follow
            model, name="tuned_model", serialization_format="pickle",
            # explicit requirements: skips MLflow's slow dependency inference
            pip_requirements=_requirements(),
        )
    version = mlflow.register_model(info.model_uri, settings.register_name, tags=tags)
    mlflow.tracking.MlflowClient(tracking_uri).set_tag(
        run_id, "step.registered_model", f"{settings.register_name}/{version.version}")
    return {"name": settings.register_name, "version": str(version.version),
            "model_uri": info.model_uri}


def _requirements() -> list[str]:
    from importlib.metadata import version

    out = []
    for pkg in ("torch", "timm"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except Exception:  # noqa: BLE001 - requirements are informative only
            out.append(pkg)
    return out
