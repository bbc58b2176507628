"""What ``--model`` names, resolved on the driver before any worker starts.

* ``models:/NAME/VERSION`` (``@ALIAS``, ``/latest``): the version's ``checkpoint`` and
  inference settings (:func:`pipelines.tracking.registry.resolve_registered_model`). The
  weights load from that checkpoint with ``weights_only=True``; the settings the search
  chose are applied unless ``--no-thresholds-from-registry``. The search's run records
  the shard directory it evaluated on, whose ``dataset.json`` names the dataset (palette,
  class names).
* a checkpoint directory or a Ray run directory (its latest checkpoint), local or
  ``s3://``: the checkpoint's own inference settings; its ``meta.json`` ``dataset`` (a
  name) when a training recorded one.

Explicit ``inference.*`` settings (``--thresholds`` ...) are applied last and win. The
result is resolved here, on the driver: every worker gets the same whole InferenceConfig.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from data_prep import storage
from pipelines.common.checkpoint import META_FILE, read_configs, resolve_checkpoint_dir
from pipelines.common.errors import InputNotFound, InvalidInput
from pipelines.predict.settings import PredictSettings


@dataclass
class ModelSource:
    checkpoint: str
    model_config: dict[str, Any]  # the architecture (StepConfig.to_dict())
    inference: dict[str, Any]  # the whole InferenceConfig (to_dict()): checkpoint, registry, flags
    registered: dict[str, Any] | None = None  # {"name", "version", "tracking_uri"}
    dataset: str | None = None
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return int(self.model_config["num_classes"])


def resolve_source(s: PredictSettings) -> ModelSource:
    registered, dataset, data_uri, notes = None, None, None, []
    changes = []  # applied in this order to the checkpoint's own settings
    if s.model.startswith("models:/"):
        from pipelines.tracking.registry import holdout_warning, resolve_registered_model

        reg = resolve_registered_model(s.model, s.tracking_uri)
        registered = {"name": reg["name"], "version": reg["version"],
                      "tracking_uri": reg["tracking_uri"]}
        try:
            checkpoint = resolve_checkpoint_dir(reg["checkpoint"])
        except FileNotFoundError:
            raise InputNotFound(
                f"{s.model}: its checkpoint {reg['checkpoint']} is not reachable from "
                "here; copy it and pass the copy as --model") from None
        warning = holdout_warning(reg["name"], reg["version"], reg["tags"])
        if warning:
            print(f"step predict: {warning}", flush=True)
            notes.append(warning)
        if s.thresholds_from_registry:
            changes.append(reg["inference"])
        data_uri = reg["data"]
    else:
        checkpoint = resolve_checkpoint_dir(s.model)
        meta = _read(storage.join(checkpoint, META_FILE), json.loads) or {}
        dataset = meta.get("dataset") if isinstance(meta.get("dataset"), str) else None
    arch, inference = read_configs(checkpoint)
    for change in (*changes, s.inference):
        inference = inference.apply(change)
    class_names = None
    if data_uri:
        try:
            from data_prep.info import read_dataset_info

            info = read_dataset_info(data_uri)
            dataset, class_names = info.name, list(info.class_names)
        except (OSError, ValueError) as err:  # moved or deleted data: colours fall back
            notes.append(f"dataset of the search ({data_uri}) unreadable: {err}")
    source = ModelSource(checkpoint, arch.to_dict(), inference.to_dict(), registered, dataset,
                         class_names, notes)
    check_inference(source)
    return source


def _read(uri: str, parse: Callable[[bytes], Any]) -> Any:
    """One small file of the checkpoint (the driver needs no weights), or None."""
    try:
        return parse(storage.read_bytes(uri))
    except FileNotFoundError:
        return None


def check_inference(source: ModelSource) -> None:
    """Fail on the driver, before any worker starts: the architecture built on the meta
    device (no memory, no weights) with the settings validates them by the model's own
    rules (the exits); ``oracle`` would need labels."""
    import torch

    from pipelines.common.checkpoint import without_weight_sources
    from pipelines.common.model import build_model
    from step_model.config import InferenceConfig, StepConfig

    inference = InferenceConfig.model_validate(source.inference)
    with torch.device("meta"):
        build_model(without_weight_sources(StepConfig.model_validate(source.model_config)),
                    inference)
    if inference.policy_mode == "oracle":
        raise InvalidInput(
            f"{source.checkpoint}: policy mode 'oracle' needs ground-truth labels; choose "
            "the policy for unlabelled images with --merge-thresholds, --budget or "
            "--policy-mode (threshold | budget | none)")
