"""The steps of ``step run``, each as (fingerprint payload, body, "outputs still there?").

Kept apart from :mod:`pipelines.workflow.runner` (which only sequences, fingerprints, skips and
resumes) so that each step reads as the plain program it is. Every body receives the MLflow
run id of its step and returns a small JSON-able dict of outputs (URIs and a few numbers):
that dict is stored on the step's run (tag ``step.outputs``) and reused when the step is
skipped. Bulky results (trial tables, evaluation dicts) are JSON files under the
pipeline's storage, in folders named by the step's fingerprint so that a changed config
never overwrites what an earlier, still valid, run points to.
"""

from __future__ import annotations

from typing import Any, Protocol

from pipelines.common.errors import ExpectedFailure, InputNotFound
from pipelines.common.storage import exists, read_json, write_json
from pipelines.workflow.config import PipelineConfig


class Workflow(Protocol):
    """What a step body reads from the running workflow
    (:class:`pipelines.workflow.runner.Workflow`): where results go, and the fingerprints
    of the steps already decided."""

    tracking_uri: str
    parent_run_id: str
    fps: dict[str, str]

    def path(self, *parts: str) -> str: ...


def _fp_short(wf: Workflow, name: str) -> str:
    return wf.fps[name][:12]


# ---------------------------------------------------------------------------------------
# prepare

def _source_listing(cfg: PipelineConfig) -> dict[str, int]:
    from data_prep import storage as files

    try:
        return files.list_files(cfg.data.src)
    except Exception as err:  # noqa: BLE001 - reported with the field named
        raise InputNotFound(f"data.src {cfg.data.src}: cannot list it ({err})") from None


def prepare_payload(cfg: PipelineConfig) -> dict[str, Any]:
    listing = _source_listing(cfg)
    if not listing:
        raise InputNotFound(f"data.src {cfg.data.src}: no files there")
    layout = None
    if cfg.data.layout:
        from data_prep import storage as files

        layout = files.read_bytes(cfg.data.layout).decode(errors="replace")
    data = cfg.data.model_dump(mode="json")
    data.pop("manifest", None)  # a check of the source, not a setting of its shards
    # a held-out fraction of val is chosen when the data is read, not when it is sharded:
    # setting it must not re-shard (nor, through the fingerprints, retrain) anything
    holdout = data.pop("holdout", None)
    data.pop("groups", None)  # how keys fall into groups changes no shard either
    if isinstance(holdout, dict) and holdout.get("split"):
        data["holdout_split"] = holdout["split"]
    return {"data": data, "listing": listing, "layout": layout, "format": 1}


def prepare(cfg: PipelineConfig, run_id: str, wf: Workflow) -> dict[str, Any]:
    from data_prep.prep import prepare as prep
    from pipelines.common.cluster import init_ray
    from pipelines.tracking.runs import RunLogger

    # Ray is started (or joined) here, before data_prep would start its own quiet one:
    # the trainings' progress lines reach the pipeline's output only with log_to_driver.
    init_ray()
    tracker = RunLogger(run_id, wf.tracking_uri)
    d = cfg.data
    src = d.src
    base = wf.path("data", _fp_short(wf, "prepare"))
    if d.tile is not None:
        from data_prep import storage as files
        from pipelines.workflow.tiles import tile_dataset

        # under the pipeline's storage: prep's Ray Data tasks on other nodes read them
        src = files.join(base, "tiles")
        counts = tile_dataset(d.src, src, d.tile.size, d.tile.val_images,
                              d.train_split, d.val_split, val=d.tile.val,
                              dataset=d.dataset, layout=d.layout)
        tracker.log_metrics({f"tiles_{k}": v for k, v in counts.items()})
    outputs: dict[str, Any] = {}
    roles = [("train", d.train_split), ("val", d.val_split)]
    if d.holdout is not None and d.holdout.split is not None:
        roles.append(("holdout", d.holdout.split))  # a split no search ever reads
    for role, split in roles:
        out = wf.path("data", _fp_short(wf, "prepare"), role)
        report = prep(d.dataset, src, out, split=split, samples_per_shard=d.samples_per_shard,
                      shard_size=d.shard_size, max_side=d.max_side, layout=d.layout,
                      progress=False)
        if report.written == 0:
            raise ExpectedFailure(f"prepare: split {split!r} of {src} produced no samples "
                               f"(skipped: {report.skipped})")
        tracker.log_metrics({f"{role}_written": report.written,
                             f"{role}_skipped": sum(report.skipped.values()),
                             f"{role}_shards": len(report.shards),
                             f"{role}_seconds": report.seconds})
        outputs[role] = out
        outputs[f"{role}_samples"] = report.written
    outputs["base"] = base
    return outputs


def check_groups(cfg: PipelineConfig, data: dict[str, Any]) -> dict[str, dict[str, int]]:
    """{role: {group: images}} of the prepared train and val splits ({} without
    ``data.groups``). A held-out group found in neither split is an error naming the
    groups found: a misspelt name would otherwise hold out nothing."""
    from pipelines.common.groups import group_counts, split_groups
    from pipelines.common.settings import ConfigError

    d = cfg.data
    if d.groups is None:
        return {}
    counts = {role: group_counts(split_groups(data[role], split, d.groups).values())
              for role, split in (("train", d.train_split), ("val", d.val_split))}
    held = d.holdout.groups if d.holdout is not None else []
    missing = [g for g in held if not any(g in c for c in counts.values())]
    if missing:
        raise ConfigError(f"data.holdout.groups: {missing} in neither split (groups by "
                          f"{d.groups.describe()}: {counts})")
    return counts


def prepare_done(outputs: dict[str, Any]) -> bool:
    from data_prep import storage as files

    return all(outputs.get(r) and exists(files.join(outputs[r], "dataset.json"))
               for r in ("train", "val"))


# ---------------------------------------------------------------------------------------
# the two trainings

def _train_config(cfg: PipelineConfig, stage: str):
    """The training config of ``stage``: policy, step, or baseline (the STEP recipe
    without sharing and exits); every stage skips the groups held out from training."""
    from pipelines.train.config import load_train_config
    from pipelines.workflow.config import baseline_train_config

    if stage == "baseline":
        tc = baseline_train_config(cfg)
    else:
        section = cfg.policy if stage == "policy" else cfg.step
        overrides = list(section.set)
        if stage == "step" and cfg.runs_policy:
            overrides.append("policy_checkpoint=<from-policy-step>")
        tc = load_train_config(section.config, overrides, stage=stage)
    h = cfg.data.holdout
    if h is not None and h.from_training:
        tc.data = tc.data.model_copy(update={"groups": h.group_by,
                                             "exclude_groups": list(h.groups)})
    return tc


def train_payload(cfg: PipelineConfig, stage: str, inputs: list[str | None]) -> dict[str, Any]:
    tc = _train_config(cfg, stage).model_dump(mode="json")
    # filled in by the workflow: not part of what the user configures
    for key in ("name", "storage", "mlflow", "policy_checkpoint"):
        tc.pop(key, None)
    tc["data"].pop("train", None)
    tc["data"].pop("val", None)
    if not tc["data"].get("exclude_groups"):  # unset: the fingerprints of before groups
        tc["data"].pop("exclude_groups", None)
        tc["data"].pop("groups", None)
    tc["model"] = _model_payload(tc["model"], tc.pop("inference"))
    # a test hook that was a training field once (now an environment variable, never set in
    # a user's run): finished stages keep their fingerprints
    tc["train"].setdefault("inject_failure_at_step", None)
    return {"train": tc, "inputs": inputs, "stage": stage}


def _model_payload(model: dict[str, Any], inference: dict[str, Any]) -> dict[str, Any]:
    """The model and its inference settings as configured, not every default of today's
    configs: an option added later (at a default that keeps the old behaviour) must not
    retrain finished stages. In the layout fingerprints had before the inference settings
    got a section of their own (inside the model: ``policy.mode``, ``exits.thresholds``
    ...), so that pipelines run before keep theirs."""
    from step_model.config import LEGACY_INFERENCE_KEYS, InferenceConfig, StepConfig

    out = StepConfig.model_validate(model).model_dump(mode="json", exclude_defaults=True)
    set_ = InferenceConfig.model_validate(inference).model_dump(mode="json", exclude_defaults=True)
    for (section, key), name in LEGACY_INFERENCE_KEYS.items():
        if name in set_:
            (out if section is None else out.setdefault(section, {}))[key] = set_.pop(name)
    out.update({f"inference.{name}": v for name, v in set_.items()})  # settings added since
    return out


def train(cfg: PipelineConfig, stage: str, run_id: str, wf: Workflow,
          data: dict[str, Any], policy_checkpoint: str | None) -> dict[str, Any]:
    from pipelines.train.trainer import fit

    tc = _train_config(cfg, stage)
    step_name = f"train_{stage}"
    update: dict[str, Any] = {
        # the fingerprint in the Ray run name: same inputs -> Ray resumes the same run
        "name": f"{cfg.name}-{stage}-{_fp_short(wf, step_name)}",
        "data": tc.data.model_copy(update={"train": data["train"], "val": data["val"]}),
        "storage": tc.storage.model_copy(update={"storage_path": wf.path("ray")}),
        "mlflow": tc.mlflow.model_copy(update={"tracking_uri": wf.tracking_uri,
                                               "experiment": cfg.mlflow.experiment}),
    }
    if stage == "step":
        update["policy_checkpoint"] = policy_checkpoint
    tc = tc.model_copy(update=update)
    h = cfg.data.holdout
    if h is not None and h.from_training:
        print(f"{step_name}: training without the images of held-out "
              f"group{'s' if len(h.groups) > 1 else ''} {', '.join(h.groups)}", flush=True)
    result = fit(tc, parent_run_id=run_id)
    metrics = {k: v for k, v in (result.metrics or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    from pipelines.tracking.runs import RunLogger

    RunLogger(run_id, wf.tracking_uri).log_metrics(metrics)
    return {"checkpoint": result.checkpoint, "train_run_id": result.run_id,
            "metrics": {k: metrics[k] for k in ("miou", "gflops", "tokens_mean",
                                                "halted_fraction") if k in metrics}}


def train_done(outputs: dict[str, Any]) -> bool:
    from data_prep import storage as files

    ckpt = outputs.get("checkpoint")
    return bool(ckpt) and exists(files.join(ckpt, "model.pt"))


# ---------------------------------------------------------------------------------------
# tune

def _tune_settings(cfg: PipelineConfig, wf: Workflow, checkpoint: str | None,
                   data: str | None):
    from pipelines.tune.search import TuneSettings

    values = cfg.tune.model_dump()
    values.update(checkpoint=checkpoint, data=data, tracking_uri=wf.tracking_uri,
                  experiment=cfg.mlflow.experiment, storage_path=wf.path("ray"),
                  name=f"{cfg.name}-tune", holdout=_holdout(cfg),
                  groups=_groups(cfg))
    return TuneSettings.model_validate(values)


def _holdout(cfg: PipelineConfig) -> dict[str, Any] | None:
    return cfg.data.holdout.model_dump(mode="json") if cfg.data.holdout else None


def _groups(cfg: PipelineConfig) -> dict[str, Any] | None:
    return cfg.data.groups.model_dump(mode="json") if cfg.data.groups else None


# the search space's fields when fingerprints were first taken
SPACE_FIELDS_BEFORE = ("name", "description", "exit_thresholds", "merge_thresholds", "budget",
                       "top_k", "exit_policy")


def tune_payload(cfg: PipelineConfig, inputs: list[str | None]) -> dict[str, Any]:
    from pipelines.tune.space import load_space

    tune = cfg.tune.model_dump(mode="json", exclude={"groups"})
    if not tune["inference"]:  # unset: pipelines from before the field keep their fingerprints
        del tune["inference"]
    if tune["cost"] == "gflops":  # the default: likewise (latency settings then unused)
        del tune["cost"], tune["latency"]
    # so do their spaces: the dimensions added with the generated space count when set
    space = {k: v for k, v in load_space(cfg.tune.space).model_dump(mode="json").items()
             if v is not None or k in SPACE_FIELDS_BEFORE}
    payload = {"tune": tune, "space": space, "inputs": inputs}
    if cfg.data.holdout is not None:  # only then: other pipelines keep their fingerprints
        payload["holdout"] = _holdout(cfg)
    if cfg.data.groups is not None:
        payload["groups"] = cfg.data.groups.model_dump(mode="json")
    return payload


def tune(cfg: PipelineConfig, run_id: str, wf: Workflow, data: dict[str, Any],
         trained: dict[str, Any]) -> dict[str, Any]:
    from pipelines.tune.search import search

    settings = _tune_settings(cfg, wf, trained["checkpoint"], data["val"])
    outcome = search(settings, run_id=run_id)
    doc = outcome.to_json()
    doc["trials"] = outcome.trials
    result = wf.path("tune", _fp_short(wf, "tune"), "tune_result.json")
    write_json(result, doc)
    return {"result": result, "feasible": doc["feasible"],
            "best_inference": doc["best"]["inference"] if doc["best"] else None,
            "registered_model": doc["registered_model"]}


def json_done(outputs: dict[str, Any]) -> bool:
    return bool(outputs.get("result")) and exists(outputs["result"])


# ---------------------------------------------------------------------------------------
# evaluate (a Ray task: on a cluster it lands on a GPU node)

def evaluate_payload(cfg: PipelineConfig, inputs: list[str | None]) -> dict[str, Any]:
    payload = {"evaluate": cfg.evaluate.model_dump(mode="json"), "inputs": inputs,
               "max_drop": cfg.tune.max_drop, "drop_mode": cfg.tune.drop_mode}
    if cfg.data.holdout is not None:
        payload["holdout"] = _holdout(cfg)
    if cfg.data.groups is not None:  # only then: other pipelines keep their fingerprints
        payload["groups"] = cfg.data.groups.model_dump(mode="json")
    return payload


def _evaluate_task(*args, **kwargs) -> dict[str, Any]:
    from pipelines.common.console import worker_console
    from pipelines.workflow.evaluation import evaluate_all

    worker_console()
    return evaluate_all(*args, **kwargs)


def evaluate(cfg: PipelineConfig, run_id: str, wf: Workflow, data: dict[str, Any],
             trained: dict[str, Any], tuned: dict[str, Any],
             baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """The chosen model against the STEP network run unshared and, when the pipeline has
    one, the plain ViT trained on its own (:mod:`pipelines.workflow.evaluation`)."""
    import ray

    from pipelines.common.cluster import init_ray
    from pipelines.tracking.runs import RunLogger

    init_ray()
    e, t = cfg.evaluate, cfg.tune
    guard = t.guard
    task = ray.remote(num_cpus=e.cpus, num_gpus=e.gpus)(_evaluate_task)
    res = ray.get(task.remote(
        trained["checkpoint"], data["val"], tuned["best_inference"],
        max_samples=e.max_samples, device="cuda" if e.gpus > 0 else "cpu",
        plain_vit=(baseline or {}).get("checkpoint"),
        groups=_groups(cfg),
        drop_mode=t.drop_mode, max_drop=t.max_drop, samples=t.bootstrap_samples,
        block=t.bootstrap_block, confidence=t.confidence, seed=t.seed,
        tail_fraction=guard.tail.fraction if guard.tail else 0.2,
        min_images=guard.groups.min_images if guard.groups else 10,
        holdout=_holdout_args(cfg, data, tuned)))
    tracker = RunLogger(run_id, wf.tracking_uri)
    out: dict[str, Any] = {"inference": tuned["best_inference"]}
    tracker.log_metrics({f"baseline_{k}": v for k, v in _headline(res["baseline"]).items()})
    if res.get("plain_vit"):
        tracker.log_metrics({f"plain_vit_{k}": v for k, v in _headline(res["plain_vit"]).items()})
    if res["tuned"] is not None:
        vs = res["vs_unshared"]
        out.update(drop=vs["drop"], within_limit=vs["within_limit"])
        tracker.log_metrics({f"tuned_{k}": v for k, v in _headline(res["tuned"]).items()})
        tracker.log_metrics({"drop": vs["drop"], "within_limit": float(vs["within_limit"])})
        for name, key in (("unshared", "vs_unshared"), ("plain_vit", "vs_plain_vit")):
            c = res.get(key)
            if c:
                tracker.log_metrics(_comparison_metrics(f"drop_vs_{name}", c))
        if res.get("vs_plain_vit"):
            out.update(drop_vs_plain_vit=res["vs_plain_vit"]["drop"],
                       within_limit_vs_plain_vit=res["vs_plain_vit"]["within_limit"])
    if res.get("holdout"):
        _record_holdout(res["holdout"], tracker)
    tracker.log_dict(res, "evaluation.json")
    tracker.log_datasets({"evaluation": data["val"]})
    result = wf.path("evaluate", _fp_short(wf, "evaluate"), "evaluation.json")
    write_json(result, {**res, **out})
    return {"result": result, "drop": out.get("drop"), "within_limit": out.get("within_limit"),
            "drop_vs_plain_vit": out.get("drop_vs_plain_vit")}


def _comparison_metrics(prefix: str, c: dict[str, Any]) -> dict[str, float]:
    """A comparison (:func:`pipelines.workflow.evaluation.comparison`) as flat metrics."""
    out = {prefix: c["drop"], f"{prefix}_lo": c["drop_lo"], f"{prefix}_hi": c["drop_hi"]}
    if (c.get("tail") or {}).get("drop") is not None:
        out[f"{prefix}_tail"] = c["tail"]["drop"]
    if c.get("worst_group_drop") is not None:
        out[f"{prefix}_worst_group"] = c["worst_group_drop"]
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}


def _holdout_args(cfg: PipelineConfig, data: dict[str, Any],
                  tuned: dict[str, Any]) -> dict[str, Any] | None:
    """What :func:`pipelines.workflow.holdout.holdout_check` needs besides the chosen
    model: where the held-out images are, the limit, and the plain rule's answer."""
    h, t = cfg.data.holdout, cfg.tune
    if h is None:
        return None
    doc = _read_json(tuned["result"])
    plain, best = doc.get("plain") or {}, doc.get("best") or {}
    # by trial: the inference dicts differ once JSON has made the level keys strings
    plain = plain.get("inference") if plain.get("trial_id") != best.get("trial_id") else None
    return {"data": data["holdout"] if h.split is not None else data["val"],
            "train_data": data["train"] if h.from_training else None,
            "holdout": _holdout(cfg), "max_drop": t.max_drop, "drop_mode": t.drop_mode,
            "samples": t.bootstrap_samples, "block": t.bootstrap_block,
            "confidence": t.confidence, "seed": t.seed,
            "plain": plain}


def _record_holdout(check: dict[str, Any], tracker) -> None:
    from pipelines.workflow.holdout import holdout_line

    print(holdout_line(check), flush=True)
    tracker.log_metrics({f"holdout_{k}": float(check[k]) for k in
                         ("images", "drop", "drop_lo", "drop_hi", "limit_broken",
                          "worst_group_drop") if check.get(k) is not None})
    if (check.get("vs_plain_vit") or {}).get("drop") is not None:
        tracker.log_metrics({"holdout_drop_vs_plain_vit": float(check["vs_plain_vit"]["drop"])})


def _headline(m: dict[str, Any]) -> dict[str, float]:
    keys = ("miou", "gflops", "tokens_mean", "halted_fraction", "latency_ms", "pixel_accuracy")
    return {k: float(m[k]) for k in keys if isinstance(m.get(k), (int, float))}


# ---------------------------------------------------------------------------------------
# report

def report_payload(cfg: PipelineConfig, inputs: list[str | None]) -> dict[str, Any]:
    return {"report": cfg.report.model_dump(mode="json"), "inputs": inputs, "format": 1}


def report(cfg: PipelineConfig, run_id: str, wf: Workflow, data: dict[str, Any],
           trained: dict[str, Any], tuned: dict[str, Any],
           evaluated: dict[str, Any]) -> dict[str, Any]:
    from pipelines.workflow.report import build_report

    tune_doc = _read_json(tuned["result"])
    eval_doc = _read_json(evaluated["result"])
    summary = build_report(
        run_id=run_id, tracking_uri=wf.tracking_uri, tune_doc=tune_doc, eval_doc=eval_doc,
        checkpoint=trained["checkpoint"], val_data=data["val"],
        num_images=cfg.report.num_images, allow_oracle=cfg.tune.allow_oracle,
        note=cfg.report.note,
    )
    summary.update(tracking_uri=wf.tracking_uri, parent_run_id=wf.parent_run_id,
                   pipeline=cfg.name)
    result = wf.path("report", _fp_short(wf, "report"), "summary.json")
    write_json(result, summary)
    return {"result": result}


# ---------------------------------------------------------------------------------------
# analyze (a Ray task, as evaluate: on a cluster it lands where the resources are)

def analyze_payload(cfg: PipelineConfig, inputs: list[str | None]) -> dict[str, Any]:
    # format 2: the halting protocol runs too, per data.groups, on the held-out groups
    return {"analyze": cfg.analyze.model_dump(mode="json"), "inputs": inputs, "format": 2,
            "groups": _groups(cfg),
            "holdout": _holdout(cfg)}


def _protocol_sets(cfg: PipelineConfig, data: dict[str, Any]) -> list[dict[str, Any]]:
    """The halting protocol's images: the validation split, then what the search never
    saw (a held-out split; held-out groups kept from training, read from its shards)."""
    sets = [{"data": data["val"], "label": "data", "groups": []}]
    h = cfg.data.holdout
    if h is not None and h.split is not None:
        sets.append({"data": data["holdout"], "label": "holdout", "groups": []})
    if h is not None and h.groups and h.from_training:
        sets.append({"data": data["train"], "label": "holdout", "groups": list(h.groups)})
    return sets


def _analyze_task(checkpoint: str, data: str, inference: dict[str, Any] | None,
                  sweep: dict[str, Any], device: str, sets: list[dict[str, Any]],
                  groups: dict[str, Any] | None) -> dict[str, Any]:
    from pipelines.analyze.measured import MeasuredSet, ProtocolRequest
    from pipelines.analyze.runner import analyze as run_analysis
    from pipelines.common.console import worker_console
    from pipelines.common.groups import Groups

    worker_console()
    protocol = ProtocolRequest(
        [MeasuredSet(s["data"], s["label"], tuple(s["groups"])) for s in sets],
        Groups.model_validate(groups) if groups else None)
    return run_analysis(checkpoint, data, inference=inference, device=device,
                        max_samples=sweep["max_samples"], batch_size=sweep["batch_size"],
                        purities=sweep["purities"], thresholds=sweep["layout_thresholds"],
                        budgets=sweep["budgets"], seeds=sweep["seeds"],
                        ablation_thresholds=sweep["ablation_thresholds"], protocol=protocol)


def analyze(cfg: PipelineConfig, run_id: str, wf: Workflow, data: dict[str, Any],
            trained: dict[str, Any], tuned: dict[str, Any]) -> dict[str, Any]:
    import ray

    from pipelines.analyze.runner import log_analysis
    from pipelines.common.cluster import init_ray

    init_ray()
    a = cfg.analyze
    task = ray.remote(num_cpus=a.cpus, num_gpus=a.gpus)(_analyze_task)
    doc = ray.get(task.remote(trained["checkpoint"], data["val"], tuned.get("best_inference"),
                              a.model_dump(mode="json"), "cuda" if a.gpus > 0 else "cpu",
                              _protocol_sets(cfg, data), _groups(cfg)))
    log_analysis(doc, wf.tracking_uri, run_id)
    result = wf.path("analyze", _fp_short(wf, "analyze"), "analysis.json")
    write_json(result, doc)
    halting = doc.get("halting") or {}
    return {"result": result, "policy_vs_oracle": doc["policy_vs_oracle"]["value"],
            "drop_from_halting": {g: f["drop_from_halting"]
                                  for g, f in (halting.get("groups") or {}).items()}}


# ---------------------------------------------------------------------------------------

def _read_json(uri: str) -> dict[str, Any]:
    doc = read_json(uri)
    if doc is None:
        raise InputNotFound(f"{uri}: missing (an earlier step's output was removed?)")
    return doc
