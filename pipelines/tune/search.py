"""Threshold search with Ray Tune: the cheapest inference setting within an mIoU-drop limit.

``search(settings)`` does, in order:

1. evaluates the checkpoint once *unpruned* (no merging, no halting): the reference mIoU
   and GFLOPs every drop is measured against;
2. runs Ray Tune trials. Every knob is an inference-time setting
   (``StepSegmenter.set_inference``), so a trial only *evaluates* the fixed checkpoint with
   its thresholds; nothing is trained. Trials run in parallel within the resources given
   (``resources_per_trial``: CPUs here, a GPU each on a cluster). Each reports mIoU, drop,
   GFLOPs, tokens, halted fraction and latency;
3. picks the answer over *all* finished trials with :mod:`pipelines.tune.pareto` (cheapest
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
* **Credentials never reach Ray's records.** Ray Tune copies the driver's AWS keys into
  every trial's ``runtime_env``, which ``runtime_env_agent.log`` prints, and pickles its
  storage filesystem into ``tuner.pkl`` and the searcher's state. So the driver starts
  Ray and runs ``Tuner.fit()`` with the keys out of its environment
  (:func:`keys_out_of_env`), hands them to the trials inside their arguments (``S3Env``),
  and lets Tune write to local storage, uploaded to an ``s3://`` storage path afterwards
  (:func:`tune_storage`). See docs/pipeline.md, "Credentials on a cluster".
* **Progress and failures**: one line per finished trial (parameters, mIoU, GFLOPs,
  elapsed, ETA, or the trial's exception); a search in which every trial failed raises
  :class:`TrialsFailed` with the first trial's error instead of reporting "0 trials".
* **Grid search** runs the exhaustive product of the (discretised) space in one sample;
  it is the blind baseline that Optuna has to beat (see docs/pipeline.md for numbers).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipelines.common.settings import StrictModel
from pipelines.tune.pareto import Selection, miou_drop, penalised_objective, select
from pipelines.tune.space import SearchSpace, load_space

log = logging.getLogger(__name__)


class TrialsFailed(RuntimeError):
    """Every trial of a search failed: there is nothing to choose from (``step tune``
    exits 1 naming the first trial's error; the search's MLflow run ends FAILED)."""


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
    from pipelines.evaluate.evaluator import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, data, inference=inference,
                                 max_samples=max_samples, device=device)
    return result.to_dict()


def model_num_exits(checkpoint: str) -> int:
    """Exit heads of the checkpoint's model (from its config; builds it only when the
    exit blocks follow the backbone's depth)."""
    from pipelines.common.checkpoint import load_model, local_dir, read_model_config

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

    from data_prep.storage import apply_s3_env

    # The driver runs the Tuner without AWS keys in its environment (see keys_out_of_env):
    # they arrive here inside the trainable's arguments, never through a runtime_env.
    apply_s3_env(ctx.get("s3_env"))
    torch.set_num_threads(max(1, int(ctx["cpus"])))
    space = SearchSpace.model_validate(ctx["space"])
    inference = space.to_inference(config, ctx["num_exits"])
    m = evaluate(ctx["checkpoint"], ctx["data"], inference,
                 max_samples=ctx["max_samples"], device=ctx["device"])
    tune.report(trial_metrics(m, ctx["baseline"], ctx["max_drop"], ctx["drop_mode"]))


# ---------------------------------------------------------------------------------------
# credentials: never in a trial's runtime_env

# Ray Tune copies these from the driver's environment into every trial's runtime_env
# (ray/tune/execution/class_cache.py, ENV_VARS_TO_PROPAGATE), and Ray's
# runtime_env_agent.log prints runtime_envs in plain text.
SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "AWS_SECURITY_TOKEN")


@contextlib.contextmanager
def keys_out_of_env() -> Iterator[None]:
    """Remove the AWS keys from this process's environment for the block, then restore
    them (also on errors). The trials get them in their arguments (``ctx["s3_env"]``);
    Tune's storage is local meanwhile (:func:`tune_storage`)."""
    saved = {k: os.environ.pop(k) for k in SECRET_ENV_VARS if k in os.environ}
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ[k] = v


def tune_storage(storage_path: str) -> tuple[str, str | None]:
    """(local storage_path for Tune's ``RunConfig``, the ``s3://`` URI to upload it to).

    Tune never gets an S3 filesystem with keys inside: it pickles its ``RunConfig`` into
    ``tuner.pkl`` and its searcher's state (with the storage filesystem) into
    ``*-state-*.json``, in the Ray session directory and in the storage itself, so keys
    in the filesystem object end up in plain files (measured with Ray 2.60). For an
    ``s3://`` storage path Tune therefore writes to a local staging directory on the
    driver and :func:`search` uploads it with the driver's credentials once the trials
    are done. The trials need no storage: they only report metrics (no checkpoints), and
    Tune's loggers and error files are written by the driver.
    """
    from pipelines.common import storage

    if storage.is_s3(storage_path):
        import tempfile

        return tempfile.mkdtemp(prefix="step-tune-"), storage_path.rstrip("/")
    return storage.absolute(storage_path), None


def _upload_results(local: Path, uri: str) -> None:
    """Tune's experiment directory to ``uri`` (best effort: the search's record is in
    MLflow, Tune's files are for inspection)."""
    from pipelines.common import storage

    if not local.is_dir():
        return
    try:
        storage.upload_dir(local, uri)
    except Exception as err:  # a failed copy must not hide the result
        log.warning("tune: could not upload Ray Tune's results to %s: %s", uri, err)


# ---------------------------------------------------------------------------------------
# trial errors and progress

# ``pydantic_core._pydantic_core.ValidationError: ...`` -> ("ValidationError", ": ...")
_EXC_LINE = re.compile(
    r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt))\b(.*)$")


def error_summary(error: BaseException | str | None) -> str:
    """The exception a trial died of, as ``Type: message``, from a Ray error or the text
    of a trial's error file (whose traceback and Ray wrapper lines are dropped)."""
    if error is None:
        return "unknown error"
    cause = getattr(error, "cause", None)  # RayTaskError / RayActorError
    if isinstance(cause, BaseException):
        error = cause
    if isinstance(error, BaseException) and not type(error).__name__.startswith(
            ("RayTaskError", "TuneError")):
        return f"{type(error).__name__}: {error}".strip()[:4000]
    lines = [ln.rstrip() for ln in str(error).strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        m = _EXC_LINE.match(lines[i])
        if m and not m.group(1).startswith(("RayTaskError", "TuneError")):
            rest = "\n".join([m.group(1) + m.group(2), *lines[i + 1:]])
            return rest.strip()[:4000]
    return next((ln for ln in reversed(lines) if ln.strip()), "unknown error")[:4000]


def _trial_error(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        return error_summary(Path(path).read_text(errors="replace"))
    return "trial error (no error file)"


def _short(params: dict[str, Any]) -> str:
    """``exit=0.9,0.8 merge=0.5 top_k=5``: a trial's parameters on one line."""
    groups: dict[str, list[str]] = {}
    for name, value in params.items():
        key = {"exit_threshold": "exit", "merge_threshold": "merge"}.get(
            re.sub(r"_\d+$", "", name), name)
        groups.setdefault(key, []).append(f"{value:g}" if isinstance(value, float)
                                          else str(value))
    return " ".join(f"{k}={','.join(v)}" for k, v in groups.items() if k != "exit_policy")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _make_progress(total: int, space: SearchSpace, start: float):
    """One line per finished trial: ``trial 3/24: exit=.. merge=.. miou=.. gflops=..
    (elapsed 1m05s, ETA 7m30s)``; failed trials print their error instead."""
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self) -> None:
            self.done = 0
            self.errors: dict[str, str] = {}

        def _line(self, trial, tail: str) -> None:
            self.done += 1
            elapsed = time.monotonic() - start
            eta = elapsed / self.done * max(0, total - self.done)
            try:
                params = _short(space.normalise(trial.config))
            except Exception:  # a config the space cannot read: show the error anyway
                params = ""
            print(f"trial {self.done}/{total}: {params} {tail} "
                  f"(elapsed {_duration(elapsed)}, ETA {_duration(eta)})", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            if "miou" not in r:
                self._line(trial, "FAILED: reported no metrics")
                return
            self._line(trial, f"miou={100 * r['miou']:.2f} drop={r['drop']:.2f} "
                              f"gflops={r['gflops']:.3f}"
                              + ("" if r.get("feasible") else " (infeasible)"))

        def on_trial_error(self, iteration, trials, trial, **info):
            err = _trial_error(trial)
            self.errors[trial.trial_id] = err
            one_line = " ".join(err.split())
            self._line(trial, "FAILED: " + (one_line[:160] + "..." if len(one_line) > 160
                                            else one_line))

    return Progress()


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
            self._end(trial, "FAILED", _trial_error(trial))

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

    from data_prep.storage import capture_s3_env
    from pipelines.common import storage
    from pipelines.tracking.runs import (
        RunLogger,
        create_run,
        get_or_create_experiment,
        resolve_tracking_uri,
    )
    from pipelines.train.trainer import init_ray

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
    s3_env = capture_s3_env()  # before the keys leave the environment
    with keys_out_of_env():
        # a local Ray started here does not inherit the keys either: trials get them
        # from their arguments only
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
           "max_drop": settings.max_drop, "drop_mode": settings.drop_mode,
           # S3Env: its repr shows names only; never logged, never in a runtime_env
           "s3_env": s3_env}
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                    {"cpu": cpus, "gpu": gpus})
    callback = _make_callback(tracking_uri, exp_id, run_id, space)
    total = grid_size if settings.search == "grid" else settings.num_samples
    progress = _make_progress(total, space, time.monotonic())
    ray_storage, upload_to = tune_storage(settings.storage_path)
    experiment = f"{settings.name}-{run_id[:8]}"
    print(f"tune: {total} trials over space {space.name!r} ({settings.search}), "
          f"up to {settings.max_concurrent} at a time; reference mIoU "
          f"{100 * baseline['miou']:.2f}, GFLOPs {baseline['gflops']:.3f}", flush=True)
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
            name=experiment, storage_path=ray_storage, callbacks=[callback, progress],
            verbose=0,
        ),
    )
    try:
        with keys_out_of_env():
            grid = tuner.fit()
    finally:
        callback.close_all()
        if upload_to is not None:
            import shutil

            _upload_results(Path(ray_storage, experiment), f"{upload_to}/{experiment}")
            shutil.rmtree(ray_storage, ignore_errors=True)

    trials: list[dict[str, Any]] = []
    failed = 0
    first_error: str | None = None
    for result in grid:
        tid = result.metrics.get("trial_id") if result.metrics else None
        tid = tid or _trial_id_of(result)
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
                       **{k: metrics[k] for k in TRIAL_METRICS if k in metrics}})
    if not trials:
        msg = (f"all {failed} trials failed; the first one's error: {first_error}"
               if failed else "the search ran no trials")
        tracker.log_metrics({"n_trials": 0, "failed_trials": failed})
        tracker.set_tags({"step.tune.result": "failed", "step.tune.message": msg[:4000]})
        raise TrialsFailed(msg)
    if failed:
        print(f"warning: {failed} of {failed + len(trials)} trials failed; the first one's "
              f"error: {first_error}", flush=True)

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

    from pipelines.common.checkpoint import load_model

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
