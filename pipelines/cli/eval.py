"""``step eval --checkpoint URI --data URI [--thresholds ...] [--json PATH]``.

Evaluates a checkpoint on a ``step prep`` shard directory: mIoU, per-class IoU, pixel
accuracy, GFLOPs (split), tokens per block, halted fractions, per-class halting, latency.
Settings: :class:`pipelines.evaluate.settings.EvalSettings` (``--config``, ``--set``,
flags). Inference settings (``inference.*``: ``--thresholds`` for the exits,
``--merge-thresholds`` or ``--budget`` for the policy, ...) change the fixed checkpoint's
own with ``model.set_inference``, as Ray Tune does. The result is logged as
one MLflow run (params, metrics and ``eval.json``) unless ``--no-mlflow``. Policy mode
``oracle`` (tokens chosen from the labels) is refused unless ``--allow-oracle``; its
results are then marked ``uses_labels`` / ``upper_bound`` (JSON, MLflow tags, output).

``--fit-exit-temperature`` fits the exit heads' temperatures on the data instead
(:mod:`pipelines.evaluate.temperature`): it prints them per exit with the NLL and the
calibration error before and after, and ``--json`` writes them; nothing is evaluated or
logged to MLflow. Pass the printed values as ``--exit-temperature`` to any command.
``--perturb-levels N`` fits on N perturbed copies of each image too
(:mod:`pipelines.evaluate.perturb`), for temperatures meant to hold under domain drift.

``--fit-exit-thresholds`` chooses one exit threshold per exit by conformal risk control
(:mod:`pipelines.evaluate.risk_control`): on new images like those of ``--data``, the
expected share of labelled pixels that halting makes wrong stays within
``--halting-risk`` (default 0.01: one point of pixel accuracy). Same output rules.
"""

from __future__ import annotations

from pydantic import Field

from pipelines.cli.command import (
    INFERENCE_ALIASES,
    MLFLOW_ALIASES,
    Command,
    Invocation,
    Result,
)
from pipelines.common.settings import ConfigError, StrictModel
from pipelines.evaluate.settings import EvalSettings

ALIASES = (*INFERENCE_ALIASES, *MLFLOW_ALIASES)


class EvalActions(StrictModel):
    fit_exit_temperature: bool = Field(
        False, description="fit one temperature per exit on --data (temperature scaling of "
        "the exit heads, halting off) instead of evaluating: prints them with the NLL and "
        "calibration error before and after, --json writes them; pass them as "
        "--exit-temperature")
    perturb_levels: int = Field(
        0, ge=0, le=10, description="with --fit-exit-temperature: fit on this many "
        "perturbed copies of each image too (low light, contrast, noise or blur at strengths "
        "1/N..1; Tomani et al. 2021), for a temperature that holds under domain drift; 0: "
        "the images as they are")
    fit_exit_thresholds: bool = Field(
        False, description="choose one exit threshold per exit on --data by conformal risk "
        "control: on new images like these, the expected share of pixels that halting makes "
        "wrong stays within --halting-risk; prints them, --json writes them; pass them as "
        "--thresholds")
    halting_risk: float = Field(
        0.01, gt=0.0, lt=1.0, description="with --fit-exit-thresholds: the share of an "
        "image's labelled pixels that halting may make wrong, in expectation (0.01: one "
        "point of pixel accuracy), split evenly over the exits")


def evaluate(inv: Invocation) -> Result:
    from pipelines.common.checkpoint import resolve_checkpoint_dir
    from pipelines.common.oracle import ORACLE_NOTE, refuse_oracle, uses_oracle
    from pipelines.evaluate.evaluator import EvalOptions, evaluate_checkpoint

    s: EvalSettings = inv.settings
    actions: EvalActions = inv.options
    fit = actions.fit_exit_temperature or actions.fit_exit_thresholds
    if actions.fit_exit_temperature and actions.fit_exit_thresholds:
        raise ConfigError("--fit-exit-temperature, --fit-exit-thresholds: one at a time (fit "
                          "the temperature first, then the thresholds with "
                          "--exit-temperature set to it)")
    if "halting_risk" in actions.model_fields_set and not actions.fit_exit_thresholds:
        raise ConfigError("--halting-risk: only with --fit-exit-thresholds")
    if actions.perturb_levels and not actions.fit_exit_temperature:
        raise ConfigError("--perturb-levels: only with --fit-exit-temperature")
    if fit:
        _check_fit(s, "--fit-exit-temperature" if actions.fit_exit_temperature
                   else "--fit-exit-thresholds")
    inference = s.inference.given()
    checkpoint = resolve_checkpoint_dir(s.checkpoint)
    oracle = uses_oracle(checkpoint, inference)
    if oracle and not s.allow_oracle:
        refuse_oracle("step eval")
    if actions.fit_exit_temperature:
        return _fit_temperature(s, checkpoint, inference, actions.perturb_levels)
    if actions.fit_exit_thresholds:
        return _fit_thresholds(s, checkpoint, inference, actions.halting_risk)
    per_image = s.groups is not None or s.reference
    options = EvalOptions(mode=s.mode, crop_size=s.crop_size, stride=s.stride,
                          max_samples=s.max_samples, latency_samples=s.latency_samples,
                          per_image=per_image)
    result = evaluate_checkpoint(checkpoint, s.data, inference=inference, options=options,
                                 device=s.device)
    full = result.to_dict()
    if per_image:
        full.update(_slices(s, checkpoint, result.images))
    run_id = tracking_uri = None
    if s.mlflow.enabled:
        run_id, tracking_uri = _log(s, checkpoint, inference, result, oracle)
    out = {"run_id": run_id, "tracking_uri": tracking_uri, "checkpoint": checkpoint,
           "data": s.data, "inference": inference, "metrics": result.headline(),
           "result": full, "uses_labels": oracle, "upper_bound": oracle}
    m = out["metrics"]
    for line in _slice_lines(full):
        print(f"step eval: {line}")
    if oracle:
        print(f"step eval: {ORACLE_NOTE}; these figures are not a model's result")
    print(f"step eval: {result.num_images} images, mIoU {_f(m['miou'])}, "
          f"GFLOPs {_f(m['gflops'])}, tokens {_f(m['tokens_mean'])}/{_f(m['tokens_in'])}, "
          f"halted {_f(m['halted_fraction'])}, latency {_f(m['latency_ms'])} ms")
    return Result(out)


def _check_fit(s: EvalSettings, flag: str) -> None:
    unused = [name for name, given in (("mode", s.mode != "whole"), ("groups", s.groups),
                                       ("reference", s.reference)) if given]
    if unused:
        raise ConfigError(f"{flag} fits on whole images and evaluates "
                          f"nothing: {', '.join(unused)} would not be used; leave "
                          f"{'it' if len(unused) == 1 else 'them'} out")


def _fit_temperature(s: EvalSettings, checkpoint: str, inference: dict,
                     perturb_levels: int) -> Result:
    from pipelines.evaluate.temperature import fit_checkpoint

    doc = fit_checkpoint(checkpoint, s.data, inference=inference,
                         max_samples=s.max_samples, device=s.device,
                         perturb_levels=perturb_levels)
    for e in doc["exits"]:
        if e["nll_before"] is None:
            print(f"step eval: exit at block {e['block']}: no labelled token, T 1")
            continue
        print(f"step eval: exit at block {e['block']}: T {e['temperature']:.4g} "
              f"({e['tokens']} tokens), NLL {e['nll_before']:.4f} -> {e['nll_after']:.4f}, "
              f"ECE {e['ece_before']:.4f} -> {e['ece_after']:.4f}"
              + (f"; on the clean images ECE {e['clean']['ece_before']:.4f} -> "
                 f"{e['clean']['ece_after']:.4f}" if "clean" in e else ""))
    copies = (f" and {perturb_levels} perturbed copies of each" if perturb_levels else "")
    print(f"step eval: fitted on {doc['images']} images{copies}; pass --exit-temperature "
          f"{doc['exit_temperature']}")
    return Result({"checkpoint": checkpoint, "data": s.data, **doc})


def _fit_thresholds(s: EvalSettings, checkpoint: str, inference: dict, alpha: float) -> Result:
    from pipelines.evaluate.risk_control import fit_checkpoint

    doc = fit_checkpoint(checkpoint, s.data, alpha, inference=inference,
                         max_samples=s.max_samples, device=s.device)
    for e in doc["exits"]:
        state = "" if e["feasible"] else (f" (no threshold keeps {e['alpha']:.4g} with "
                                          f"{doc['images']} images: halting all but off)")
        print(f"step eval: exit at block {e['block']}: threshold {e['threshold']:.2f}{state}, "
              f"halts {100 * e['halted_tokens']:.1f} % of the tokens reaching it, pixels "
              f"made wrong {100 * e['empirical']:.2f} % here, bound {100 * e['bound']:.2f} % "
              f"(risk {100 * e['alpha']:.2f} %)")
    print(f"step eval: conformal risk control on {doc['images']} images, risk "
          f"{doc['alpha']:.4g} of the pixels in expectation; pass --thresholds "
          f"{doc['exit_thresholds']}")
    return Result({"checkpoint": checkpoint, "data": s.data, **doc})


def _slices(s: EvalSettings, checkpoint: str, images) -> dict:
    """mIoU per group and, with ``reference``, the drop against the unpruned model (overall,
    worst fifth of the images, per group): the figures of the pipeline's evaluate step."""
    from pipelines.common.data import resolve_data_uri
    from pipelines.common.groups import key_grouper
    from pipelines.evaluate.groups import group_miou
    from pipelines.tune.trial import evaluate_images, reference_inference

    grouper = key_grouper(resolve_data_uri(s.data)[0], s.groups) if s.groups else None
    out: dict = {}
    if grouper is not None:
        out["groups"] = group_miou(images, grouper)
    if s.reference:
        from pipelines.evaluate.compare import comparison

        ref, ref_images = evaluate_images(
            checkpoint, s.data, reference_inference(s.inference),
            max_samples=s.max_samples, device=s.device)
        out["reference"] = {k: ref.get(k) for k in ("miou", "gflops", "tokens_mean")}
        out["drop"] = comparison(ref_images, images, grouper=grouper, drop_mode="points",
                                 max_drop=float("inf"), samples=1000, confidence=0.95,
                                 block=s.bootstrap_block,
                                 seed=0, tail_fraction=0.2, min_images=1)
        out["drop"].pop("within_limit")
    return out


def _slice_lines(full: dict) -> list[str]:
    lines = []
    for g, f in (full.get("groups") or {}).items():
        lines.append(f"group {g}: {f['images']} images, mIoU {_f(f['miou'])}")
    d = full.get("drop")
    if d:
        lines.append(f"drop against the unpruned reference (mIoU {_f(d['reference_miou'])}): "
                     f"{d['drop']:.2f} points [{d['drop_lo']:.2f}, {d['drop_hi']:.2f}]"
                     + (f" (runs of {d['bootstrap_block']} images)"
                        if d.get("bootstrap_block", 1) > 1 else "") + "; "
                     f"worst {d['tail']['fraction']:g} of the images: "
                     f"{_f(d['tail']['drop'])}"
                     + (f"; worst group {d['worst_group']}: {d['worst_group_drop']:.2f}"
                        if d.get("worst_group") is not None else ""))
    return lines


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _log(s: EvalSettings, checkpoint: str, inference: dict, result,
         oracle: bool) -> tuple[str, str]:
    from pipelines.common.oracle import ORACLE_TAGS
    from pipelines.tracking.runs import RunLogger, create_run, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(s.mlflow.tracking_uri)
    tags = {"step.kind": "eval", "step.checkpoint": checkpoint,
            **(ORACLE_TAGS if oracle else {})}
    name = "eval (oracle: upper bound)" if oracle else "eval"
    run_id = create_run(tracking_uri, s.mlflow.experiment, run_name=name, tags=tags,
                        parent_run_id=s.mlflow.parent_run_id)
    tracker = RunLogger(run_id, tracking_uri)
    tracker.log_params({"checkpoint": checkpoint, "data": s.data, "mode": s.mode,
                        **{f"inference.{k}": v for k, v in inference.items()}})
    tracker.log_metrics({k: v for k, v in result.headline().items() if v is not None})
    tracker.log_dict(result.to_dict(), "eval.json")
    tracker.log_datasets({"evaluation": s.data})
    tracker.end("FINISHED")
    return run_id, tracking_uri


COMMAND = Command(EvalSettings, evaluate, options=EvalActions, aliases=ALIASES,
                  config_help="eval settings (YAML: checkpoint, data, inference, ...)")
configure = COMMAND.configure
run = COMMAND.run
