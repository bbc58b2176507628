"""``step run``: prepare data -> train policy -> train STEP -> (train the plain ViT
baseline) -> tune -> evaluate -> report -> analyze (``step analyze`` on the tuned
checkpoint; ``analyze.enabled: false`` drops it).

One MLflow parent run per pipeline, one child run per step; under them the runs the steps
make themselves (the training runs, the search's trial runs). The same code runs on a
laptop (local Ray, SQLite MLflow, local storage) and as a Ray job on a cluster (S3
storage, a shared tracking server): only the config and the environment differ.

Design choices:

* **Plain calls on one Ray driver**, no workflow engine: ``ray.workflow`` is gone from
  Ray 2.60, and each step already is a Ray program of its own (Ray Data for ``prepare``,
  Ray Train for the trainings, Ray Tune for the search, a Ray task for ``evaluate``), so a
  sequential driver with explicit state is simpler and easier to reason about.
* **Fingerprints decide what runs.** A step's fingerprint is the sha256 of its resolved
  settings plus the fingerprints of the steps it reads from (and, for ``prepare``, the
  listing of the source files). It is recorded as the ``step.fingerprint`` tag of the
  step's child run (and in ``<storage>/<name>/pipeline_state.json``). A step is skipped
  when a FINISHED run of the same pipeline and step carries the same fingerprint *and*
  its outputs still exist; its outputs (URIs, a few numbers; the ``step.outputs`` tag) are
  reused. A skipped step still gets a (FINISHED, ``step.skipped=true``) child run pointing
  at the run it reuses, so every pipeline run shows all its steps.
* **Resume.** A pipeline that died leaves its parent run and the running step's run
  RUNNING and the state file saying ``running``. The next ``step run`` with the same
  config (same resolved config, same tracking URI) reopens that parent run, marks the
  dead step's runs FAILED, skips the finished steps by fingerprint, and restarts the
  unfinished one; a training restarts from its
  latest Ray Train checkpoint, because its Ray run name includes its fingerprint
  (``<pipeline>-step-<fp8>``) and Ray Train resumes a run of the same name and storage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.common.settings import ConfigError, dump_config
from pipelines.common.storage import read_json, write_json
from pipelines.workflow.config import PipelineConfig

log = logging.getLogger(__name__)

STEPS = ("prepare", "train_policy", "train_step", "train_baseline", "tune", "evaluate",
         "report", "analyze")
STATE_FILE = "pipeline_state.json"
SUMMARY_KEYS = ("miou", "gflops", "tokens_mean", "halted_fraction", "latency_ms")


def fingerprint(payload: Any) -> str:
    """sha256 of a JSON-able payload with sorted keys (stable across runs and machines)."""
    blob = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class StepRecord:
    name: str
    fingerprint: str
    run_id: str
    status: str
    outputs: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False
    reused_run_id: str | None = None
    seconds: float = 0.0


@dataclass
class PipelineResult:
    tracking_uri: str
    parent_run_id: str
    steps: dict[str, StepRecord]
    summary: dict[str, Any]
    resumed: bool = False

    @property
    def skipped(self) -> list[str]:
        return [n for n, s in self.steps.items() if s.skipped]

    @property
    def executed(self) -> list[str]:
        return [n for n, s in self.steps.items() if not s.skipped]


class Workflow:
    """Runs one pipeline config; see the module docstring."""

    def __init__(self, cfg: PipelineConfig, *, config_path: str | None = None,
                 echo: Callable[[str], None] = print):
        from pipelines.tracking.pipeline import PipelineRuns
        from pipelines.tracking.runs import resolve_tracking_uri

        self.cfg = cfg
        self.config_path = config_path
        self.echo = echo
        self.root = cfg.root
        self.state_uri = _join(self.root, STATE_FILE)
        self.tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
        self.runs = PipelineRuns(self.tracking_uri, cfg.mlflow.experiment)
        self.state: dict[str, Any] = read_json(self.state_uri) or {}
        self.records: dict[str, StepRecord] = {}
        self.fps: dict[str, str] = {}
        self.parent_run_id = ""
        self.resumed = False

    # ---- state ----------------------------------------------------------------------

    def _save_state(self) -> None:
        self.state.update(pipeline=self.cfg.name, tracking_uri=self.tracking_uri,
                          parent_run_id=self.parent_run_id, updated=time.time())
        write_json(self.state_uri, self.state)

    def _mark(self, rec: StepRecord) -> None:
        self.state.setdefault("steps", {})[rec.name] = {
            "fingerprint": rec.fingerprint, "run_id": rec.run_id, "status": rec.status,
            "outputs": rec.outputs, "skipped": rec.skipped, "reused_run_id": rec.reused_run_id,
        }
        self._save_state()

    # ---- MLflow runs -----------------------------------------------------------------

    def _open_parent(self) -> None:
        """Reopen the parent run of a pipeline that did not finish; else start a new one."""
        prev = self.state.get("parent_run_id")
        config_fp = fingerprint(self.cfg.model_dump(mode="json"))
        same = (self.state.get("tracking_uri") == self.tracking_uri
                and self.state.get("config_fingerprint") == config_fp)
        self.state["config_fingerprint"] = config_fp
        if prev and same and self.runs.status(prev) in ("RUNNING", "FAILED", "KILLED"):
            self.parent_run_id = prev
            self.resumed = True
            self.runs.reopen(prev)
            self._close_dead_steps()
            self.echo(f"resuming pipeline run {prev} (it did not finish)")
            return
        tags = {"step.kind": "pipeline", "step.workflow": self.cfg.name,
                "step.storage": self.root}
        self.parent_run_id = self.runs.create(self.cfg.name, tags)
        self.state["steps"] = {}
        from pipelines.common.settings import flatten
        from pipelines.tracking.runs import RunLogger

        logger = RunLogger(self.parent_run_id, self.tracking_uri)
        logger.log_params(flatten(self.cfg))
        logger.log_text(dump_config(self.cfg), "pipeline_config.yaml")

    def _close_dead_steps(self) -> None:
        """Steps the dead process left ``running``: their runs (and open sub-runs) FAILED."""
        for name, rec in (self.state.get("steps") or {}).items():
            if rec.get("status") != "running":
                continue
            self.echo(f"step {name}: the previous process died while it ran; rerunning it")
            self.runs.fail_tree(rec["run_id"], "killed: the pipeline process died")
            rec["status"] = "failed"
        self._save_state()

    # ---- one step ---------------------------------------------------------------------

    def step(self, name: str, payload: Any, fn: Callable[[str], dict[str, Any]],
             outputs_exist: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        fp = fingerprint(payload)
        self.fps[name] = fp
        base_tags = {"mlflow.parentRunId": self.parent_run_id, "step.kind": "workflow-step",
                     "step.workflow": self.cfg.name, "step.name": name,
                     "step.fingerprint": fp}
        found = self.runs.finished_step(self.cfg.name, name, fp)
        if found is not None and outputs_exist(found[1]):
            reused, outputs = found
            run_id = self.runs.record_skipped(name, base_tags, reused, outputs)
            rec = StepRecord(name, fp, run_id, "finished", outputs, skipped=True,
                             reused_run_id=reused)
            self.records[name] = rec
            self._mark(rec)
            self.echo(f"[skip] {name}: unchanged (fingerprint {fp[:12]}, run {reused})")
            return outputs
        rec = StepRecord(name, fp, self.runs.create(name, base_tags), "running")
        self.records[name] = rec
        self._mark(rec)
        self.echo(f"[run ] {name} (fingerprint {fp[:12]}, run {rec.run_id})")
        t0 = time.monotonic()
        try:
            outputs = fn(rec.run_id)
        except BaseException as err:
            rec.status = "failed"
            self._mark(rec)
            self.runs.end(rec.run_id, "FAILED", f"{type(err).__name__}: {err}")
            self.runs.fail_tree(rec.run_id, f"step {name} failed")
            raise
        rec.seconds = time.monotonic() - t0
        rec.outputs = outputs
        rec.status = "finished"
        self.runs.finish_step(rec.run_id, outputs, rec.seconds)
        self._mark(rec)
        self.echo(f"[done] {name} in {rec.seconds:.1f}s")
        return outputs

    # ---- the pipeline ------------------------------------------------------------------

    def run(self) -> PipelineResult:
        from pipelines.common.stale_ray import driver_record, stop_dead_session

        if self.cfg.ray.address:
            os.environ["RAY_ADDRESS"] = self.cfg.ray.address
        # a previous run of this pipeline that was killed may have left its local Ray's
        # agents behind (pipelines/common/stale_ray.py)
        stop_dead_session(self.state.get("driver"), self.echo)
        self.state["driver"] = driver_record()
        self._open_parent()
        self._save_state()
        from pipelines.tracking.links import run_location

        where = run_location(self.tracking_uri, self.parent_run_id, self.runs.experiment_id)
        self.echo(f"pipeline {self.cfg.name}: MLflow run {self.parent_run_id} ({where}); "
                  f"storage {self.root}")
        try:
            # no ray.init here: every step that needs Ray starts (or joins) it itself, so
            # a rerun whose steps are all unchanged costs seconds
            summary = self._run_steps()
        except BaseException as err:
            self.runs.end(self.parent_run_id, "FAILED", f"{type(err).__name__}: {err}")
            raise
        from pipelines.workflow.review import log_review

        # after every step (analysis figures included): the parent run's one page to read
        log_review(self.runs, self.parent_run_id, summary, echo=self.echo)
        self.runs.end(self.parent_run_id)
        self.state["finished"] = True
        self._save_state()
        return PipelineResult(self.tracking_uri, self.parent_run_id, dict(self.records),
                              summary, self.resumed)

    def _run_steps(self) -> dict[str, Any]:
        from pipelines.workflow import steps

        cfg = self.cfg
        data = self.step("prepare", steps.prepare_payload(cfg),
                         lambda rid: steps.prepare(cfg, rid, self), steps.prepare_done)
        groups = steps.check_groups(cfg, data)
        if groups:
            self.echo(f"groups by {cfg.data.groups.describe()}: "  # type: ignore[union-attr]
                      + "; ".join(f"{role} {c}" for role, c in groups.items())
                      + (f"; held out: {cfg.data.holdout.describe()}" if cfg.data.holdout
                         else ""))
        policy: dict[str, Any] = {}
        if cfg.runs_policy:
            policy = self.step(
                "train_policy", steps.train_payload(cfg, "policy", [self.fps["prepare"]]),
                lambda rid: steps.train(cfg, "policy", rid, self, data, None),
                steps.train_done)
        step_fp_inputs = [self.fps["prepare"], self.fps.get("train_policy")]
        trained = self.step(
            "train_step", steps.train_payload(cfg, "step", step_fp_inputs),
            lambda rid: steps.train(cfg, "step", rid, self, data, policy.get("checkpoint")),
            steps.train_done)
        baseline = self._baseline(data)
        tuned = self.step(
            "tune", steps.tune_payload(cfg, [self.fps["train_step"], self.fps["prepare"]]),
            lambda rid: steps.tune(cfg, rid, self, data, trained), steps.json_done)
        evaluated = self.step(
            "evaluate", steps.evaluate_payload(cfg, [self.fps["tune"],
                                                     *self._baseline_inputs(baseline)]),
            lambda rid: steps.evaluate(cfg, rid, self, data, trained, tuned, baseline),
            steps.json_done)
        reported = self.step(
            "report", steps.report_payload(cfg, [self.fps["evaluate"], self.fps["tune"]]),
            lambda rid: steps.report(cfg, rid, self, data, trained, tuned, evaluated),
            steps.json_done)
        summary = read_json(reported["result"]) or {}
        summary["checkpoints"] = {"policy": policy.get("checkpoint"),
                                  "step": trained["checkpoint"],
                                  "baseline": baseline.get("checkpoint")}
        summary["analysis"] = None
        if cfg.analyze.enabled:
            analyzed = self.step(
                "analyze", steps.analyze_payload(
                    cfg, [self.fps["train_step"], self.fps["tune"], self.fps["prepare"]]),
                lambda rid: steps.analyze(cfg, rid, self, data, trained, tuned),
                steps.json_done)
            summary["analysis"] = read_json(analyzed["result"])
        self._log_parent_summary(summary)
        return summary

    def _baseline(self, data: dict[str, Any]) -> dict[str, Any]:
        """The plain ViT trained on its own (``baseline``): trained here, taken from
        ``baseline.checkpoint``, or none ({})."""
        from pipelines.workflow import steps

        cfg = self.cfg
        if not cfg.has_baseline:
            return {}
        if not cfg.trains_baseline:
            return {"checkpoint": cfg.baseline.checkpoint}  # type: ignore[union-attr]
        return self.step(
            "train_baseline", steps.train_payload(cfg, "baseline", [self.fps["prepare"]]),
            lambda rid: steps.train(cfg, "baseline", rid, self, data, None), steps.train_done)

    def _baseline_inputs(self, baseline: dict[str, Any]) -> list[str]:
        """What the evaluate step's fingerprint adds for the baseline (nothing without one,
        so that pipelines without a baseline keep their fingerprints)."""
        if not baseline:
            return []
        return [self.fps.get("train_baseline") or baseline["checkpoint"]]

    def _log_parent_summary(self, summary: dict[str, Any]) -> None:
        from pipelines.tracking.runs import RunLogger

        logger = RunLogger(self.parent_run_id, self.tracking_uri)
        for row in ("baseline", "tuned"):
            vals = summary.get(row) or {}
            logger.log_metrics({f"{row}_{k}": vals[k] for k in SUMMARY_KEYS
                                if isinstance(vals.get(k), (int, float))})
        if summary.get("table_md"):
            logger.log_text(summary["table_md"], "summary.md")
        logger.log_dict(summary, "summary.json")
        reg = summary.get("registered_model")
        if reg:
            logger.set_tags({"step.registered_model": f"{reg['name']}/{reg['version']}"})
        from pipelines.tracking.registry import holdout_tags, tag_version

        tags = holdout_tags(summary.get("holdout"))
        if tags:  # the held-out check's verdict, visible on the pipeline's own run
            logger.set_tags(tags)
            if reg:  # and on the version it registered, where a deployment looks
                tag_version(self.tracking_uri, reg["name"], reg["version"], tags)

    def plan(self) -> list[dict[str, Any]]:
        """What ``run`` would do, without doing it: each step's fingerprint and whether a
        finished run with that fingerprint (and its outputs) exists, i.e. would be skipped."""
        from pipelines.workflow import steps

        cfg = self.cfg
        fps: dict[str, str] = {}
        chain: list[tuple[str, Any, Callable[[dict[str, Any]], bool]]] = []
        fps["prepare"] = fingerprint(steps.prepare_payload(cfg))
        chain.append(("prepare", fps["prepare"], steps.prepare_done))
        if cfg.runs_policy:
            fps["train_policy"] = fingerprint(
                steps.train_payload(cfg, "policy", [fps["prepare"]]))
            chain.append(("train_policy", fps["train_policy"], steps.train_done))
        fps["train_step"] = fingerprint(steps.train_payload(
            cfg, "step", [fps["prepare"], fps.get("train_policy")]))
        chain.append(("train_step", fps["train_step"], steps.train_done))
        baseline_inputs: list[str] = []
        if cfg.trains_baseline:
            fps["train_baseline"] = fingerprint(
                steps.train_payload(cfg, "baseline", [fps["prepare"]]))
            chain.append(("train_baseline", fps["train_baseline"], steps.train_done))
            baseline_inputs = [fps["train_baseline"]]
        elif cfg.has_baseline:
            baseline_inputs = [cfg.baseline.checkpoint]  # type: ignore[union-attr, list-item]
        fps["tune"] = fingerprint(steps.tune_payload(cfg, [fps["train_step"], fps["prepare"]]))
        chain.append(("tune", fps["tune"], steps.json_done))
        fps["evaluate"] = fingerprint(steps.evaluate_payload(cfg, [fps["tune"],
                                                                   *baseline_inputs]))
        chain.append(("evaluate", fps["evaluate"], steps.json_done))
        fps["report"] = fingerprint(steps.report_payload(cfg, [fps["evaluate"], fps["tune"]]))
        chain.append(("report", fps["report"], steps.json_done))
        if cfg.analyze.enabled:
            fps["analyze"] = fingerprint(steps.analyze_payload(
                cfg, [fps["train_step"], fps["tune"], fps["prepare"]]))
            chain.append(("analyze", fps["analyze"], steps.json_done))
        out = []
        for name, fp, done in chain:
            found = self.runs.finished_step(cfg.name, name, fp)
            skip = found is not None and done(found[1])
            out.append({"step": name, "fingerprint": fp, "action": "skip" if skip else "run",
                        "reuses_run": found[0] if skip else None})
        return out

    # ---- helpers for steps ------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return _join(self.root, *parts)


def _join(base: str, *parts: str) -> str:
    from pipelines.common.storage import absolute, is_s3, join

    base = base if is_s3(base) else absolute(base)
    return join(base, *parts) if parts else base


def run_pipeline(config: str | Path, overrides: list[str] | None = None, *,
                 echo: Callable[[str], None] = print) -> PipelineResult:
    """Load ``config`` and run it (the body of ``step run``)."""
    from pipelines.workflow.config import load_pipeline_config

    cfg = load_pipeline_config(config, overrides)
    if not cfg.runs_policy:
        _check_policy_free(cfg)
    verify_source(cfg, echo)
    return Workflow(cfg, config_path=str(config), echo=echo).run()


def verify_source(cfg: PipelineConfig, echo: Callable[[str], None] = print) -> None:
    """``data.manifest``: the source holds the expected files, else
    :class:`data_prep.verify.SourceMismatch`, before any step, MLflow run or Ray."""
    if cfg.data.manifest:
        from data_prep.verify import check_source

        echo(check_source(cfg.data.src, cfg.data.manifest).message())


def _check_policy_free(cfg: PipelineConfig) -> None:
    from pipelines.train.config import load_train_config

    tc = load_train_config(cfg.step.config, [*cfg.step.set, "policy_checkpoint=x"],
                           stage="step")
    mode = tc.inference.policy_mode
    if mode in ("threshold", "budget"):
        raise ConfigError(
            f"step.config {cfg.step.config}: inference.policy_mode={mode!r} needs "
            "a trained policy, but the pipeline's policy step is disabled (enable `policy`, "
            "or use policy mode 'oracle')")
    # the mode tune starts from: the checkpoint's (the training's) with tune.inference
    if tc.inference.apply(cfg.tune.inference).policy_mode == "oracle" \
            and not cfg.tune.allow_oracle:
        from pipelines.tune.space import load_space

        space = load_space(cfg.tune.space)
        if space.merge_thresholds is None and space.budget is None \
                and space.policy_mode is None:
            # said before any training: tune and the report would refuse it hours later
            raise ConfigError(
                f"step.config {cfg.step.config}: inference.policy_mode='oracle' and tune.space "
                f"{cfg.tune.space!r} sets no merge thresholds: tune and the report would "
                "measure the label oracle, an upper bound; set tune.allow_oracle: true "
                "(--allow-oracle) or enable the policy step")
