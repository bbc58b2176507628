"""The model registry: the tuned model, registered with the inference settings the search
chose.

A version's tag ``step.inference`` holds the whole ``InferenceConfig`` (JSON) the search
measured, and each field also has a flat tag of its own (``exit_thresholds``,
``top_k`` ...: what the registry UI shows); both are generated from the config's fields.
Versions registered before ``step.inference`` existed carry an ``inference`` tag of
changes to the checkpoint's settings, still read.
"""

from __future__ import annotations

import json
from typing import Any

from pipelines.common.console import verbose
from pipelines.common.errors import InputNotFound, InvalidInput
from pipelines.tracking.runs import RunLogger, global_tracking_uri
from step_model.config import InferenceConfig, InferenceOverrides, stored_inference

INFERENCE_TAG = "step.inference"


def inference_tags(inference: InferenceConfig) -> dict[str, str]:
    """The registry tags of a version's inference settings: the whole config as JSON, and
    one flat tag per field."""
    data = inference.to_dict()
    return {INFERENCE_TAG: json.dumps(data),
            **{k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}}


def inference_from_tags(tags: dict[str, str]) -> InferenceOverrides:
    """A version's inference settings back from its tags (:func:`inference_tags`, or an
    older version's ``inference`` tag of changes); ValueError if they do not validate."""
    if INFERENCE_TAG in tags:  # the whole config: as it was meant when registered
        return InferenceOverrides.model_validate(
            stored_inference(json.loads(tags[INFERENCE_TAG])).to_dict())
    return InferenceOverrides.model_validate(json.loads(tags.get("inference") or "{}"))


def register_tuned_model(tracking_uri: str, run_id: str, checkpoint: str,
                         inference: InferenceConfig | InferenceOverrides | dict[str, Any],
                         best: dict[str, Any], *,
                         name: str, max_drop: float, drop_mode: str,
                         baseline_miou: float, guard: str | None = None) -> dict[str, Any] | None:
    """Log the checkpoint's model with the chosen settings (the whole InferenceConfig the
    search measured, or changes to the checkpoint's own) into run ``run_id`` and register
    it as a new version of ``name``; None when MLflow could not take it.

    The version carries the settings and the measured mIoU / GFLOPs as tags, so the
    registry alone says what a version costs and how accurate it is.
    """
    import mlflow

    from pipelines.common.checkpoint import load_model

    model, _ = load_model(checkpoint)
    chosen = model.set_inference(inference)
    tags = {
        **inference_tags(chosen),
        # full precision: the registry is where a deployment reads the measured figures
        "miou": repr(float(best["miou"])),
        "gflops": repr(float(best["gflops"])),
        "miou_drop": repr(float(best["drop"])),
        "max_drop": repr(float(max_drop)),
        "drop_mode": drop_mode,
        **({"guard": guard} if guard else {}),
        "baseline_miou": repr(float(baseline_miou)),
        "checkpoint": checkpoint,
        "tune_run_id": run_id,
    }
    # the drop's interval and the images it was measured on (after confirmation: every
    # searchable image), when the search measured them; under tune.cost latency the
    # forward's latency against the reference's (same trial) beside the GFLOPs
    for key, tag in (("drop_lo", "miou_drop_lo"), ("drop_hi", "miou_drop_hi"),
                     ("num_images", "eval_images"), ("latency_ratio", "latency_ratio"),
                     ("latency_spread", "latency_spread")):
        if best.get(key) is not None:
            tags[tag] = repr(float(best[key])) if key != "num_images" else str(best[key])
    tracker = RunLogger(run_id, tracking_uri)
    model_uri = tracker.log_model(model, name="tuned_model")
    if model_uri is None:
        return None
    if not verbose():  # MLflow's own switch for its prints ("Successfully registered
        from mlflow.utils.logging_utils import disable_logging  # model ..."): the caller
        disable_logging()  # says which version it registered
    with global_tracking_uri(tracking_uri):
        version = mlflow.register_model(model_uri, name, tags=tags)
    tracker.set_tags({"step.registered_model": f"{name}/{version.version}"})
    return {"name": name, "version": str(version.version), "model_uri": model_uri}


def tag_version(tracking_uri: str, name: str, version: str, tags: dict[str, str]) -> None:
    """Add ``tags`` to a registered version: what was learnt about it after registration
    (the pipeline's held-out check runs after the search registered the model), so the
    registry, where a deployment looks, carries it too."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)


def holdout_tags(check: dict[str, Any] | None) -> dict[str, str]:
    """Tags for the pipeline's parent run and the version it registered: whether the limit
    broke on the held-out images (the check of :mod:`pipelines.workflow.holdout`)."""
    if not check or check.get("drop") is None:
        return {}
    tags = {"holdout.limit_broken": str(bool(check["limit_broken"])).lower(),
            "holdout.drop": f"{check['drop']:.4f}",
            "holdout.interval": f"[{check['drop_lo']:.4f}, {check['drop_hi']:.4f}]",
            "holdout.images": str(check["images"])}
    if check.get("worst_group") is not None:
        tags.update({"holdout.worst_group": str(check["worst_group"]),
                     "holdout.worst_group_drop": f"{check['worst_group_drop']:.4f}"})
    return tags


def holdout_warning(name: str, version: str, tags: dict[str, str]) -> str | None:
    """The line to show for a registered version whose held-out check broke its drop limit
    (None otherwise), read back from the tags :func:`holdout_tags` wrote."""
    if tags.get("holdout.limit_broken") != "true":
        return None
    worst = (f", worst group {tags['holdout.worst_group']} "
             f"{float(tags['holdout.worst_group_drop']):.2f}"
             if tags.get("holdout.worst_group") and tags.get("holdout.worst_group_drop") else "")
    return (f"WARNING: {name} version {version} broke its drop limit "
            f"({tags.get('max_drop', '?')}) on {tags.get('holdout.images', '?')} held-out "
            f"images: drop {float(tags.get('holdout.drop', 'nan')):.2f}{worst}")


def resolve_registered_model(uri: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """What ``step predict`` needs of ``models:/NAME/VERSION`` (also ``models:/NAME@ALIAS``
    and ``models:/NAME/latest``): {"name", "version", "checkpoint", "inference", "data",
    "tags", "tracking_uri"}.

    ``checkpoint`` and ``inference`` (an ``InferenceOverrides``: the whole registered
    config, or an older version's changes) come from the tags :func:`register_tuned_model`
    wrote: the weights are read from the checkpoint (``weights_only`` loading) rather than
    unpickled from the logged MLflow model. ``data`` is the shard directory the search evaluated on
    (its run's ``data`` parameter), which names the dataset; None when unknown.
    FileNotFoundError when the version does not exist, ValueError for a malformed URI.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.runs import _short_http_budget, resolve_tracking_uri

    body = uri[len("models:/"):] if uri.startswith("models:/") else ""
    name, alias, version = body, None, None
    if "@" in body:
        name, alias = body.rsplit("@", 1)
    elif "/" in body:
        name, version = body.rsplit("/", 1)
    if not name or not (alias or version) or (version and version != "latest"
                                               and not version.isdigit()):
        raise InvalidInput(f"{uri}: expected models:/NAME/VERSION, models:/NAME/latest or "
                         "models:/NAME@ALIAS")
    tracking_uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        with _short_http_budget():  # a dead server fails in seconds, not minutes
            if alias:
                mv = client.get_model_version_by_alias(name, alias)
            elif version == "latest":
                found = client.search_model_versions(f"name = '{name}'")
                if not found:
                    raise InputNotFound(f"{uri}: no versions of {name!r} on {tracking_uri}")
                mv = max(found, key=lambda v: int(v.version))
            else:
                mv = client.get_model_version(name, version)
            tags = dict(mv.tags or {})
            data = None
            if tags.get("tune_run_id"):
                try:
                    data = client.get_run(tags["tune_run_id"]).data.params.get("data")
                except MlflowException:
                    data = None  # the run was deleted: only the palette falls back
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            raise InputNotFound(f"{uri}: no such registered model version on "
                                    f"{tracking_uri}") from None
        raise
    if not tags.get("checkpoint"):
        raise InvalidInput(f"{uri}: version {mv.version} of {name!r} has no 'checkpoint' tag "
                         "(not registered by `step tune`); pass its checkpoint as --model")
    try:
        inference = inference_from_tags(tags)
    except ValueError as err:  # a JSON or validation error: say which version
        raise InvalidInput(f"{uri}: version {mv.version}'s inference settings are not valid: "
                         f"{err}") from None
    return {"name": name, "version": str(mv.version), "checkpoint": tags["checkpoint"],
            "inference": inference, "data": data, "tags": tags, "tracking_uri": tracking_uri}
