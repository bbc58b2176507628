"""What ``--model`` names, resolved on the driver before any worker starts.

* ``models:/NAME/VERSION`` (``@ALIAS``, ``/latest``): the version's ``checkpoint`` and
  ``inference`` tags (:func:`pipelines.tracking.registry.resolve_registered_model`). The
  weights load from that checkpoint with ``weights_only=True``; the thresholds the search
  chose are applied unless ``--no-thresholds-from-registry``. The search's run records
  the shard directory it evaluated on, whose ``dataset.json`` names the dataset (palette,
  class names).
* a checkpoint directory or a Ray run directory (its latest checkpoint), local or
  ``s3://``: the checkpoint's own inference settings; its ``meta.json`` ``dataset`` (a
  name) when a training recorded one.

Explicit ``inference.*`` settings (``--thresholds`` ...) are applied last and win.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from data_prep import storage
from pipelines.common.checkpoint import CONFIG_FILE, META_FILE, resolve_checkpoint_dir
from pipelines.predict.settings import PredictSettings


@dataclass
class ModelSource:
    checkpoint: str
    model_config: dict[str, Any]
    inference: dict[str, Any]  # set_inference kwargs, applied in this order: registry, flags
    registered: dict[str, Any] | None = None  # {"name", "version", "tracking_uri"}
    dataset: str | None = None
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return int(self.model_config["num_classes"])


def resolve_source(s: PredictSettings) -> ModelSource:
    registered, dataset, data_uri, notes = None, None, None, []
    inference: dict[str, Any] = {}
    if s.model.startswith("models:/"):
        from pipelines.tracking.registry import resolve_registered_model

        reg = resolve_registered_model(s.model, s.tracking_uri)
        registered = {"name": reg["name"], "version": reg["version"],
                      "tracking_uri": reg["tracking_uri"]}
        try:
            checkpoint = resolve_checkpoint_dir(reg["checkpoint"])
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{s.model}: its checkpoint {reg['checkpoint']} is not reachable from "
                "here; copy it and pass the copy as --model") from None
        if s.thresholds_from_registry:
            inference.update(reg["inference"])
        data_uri = reg["data"]
    else:
        checkpoint = resolve_checkpoint_dir(s.model)
        meta = _read(storage.join(checkpoint, META_FILE), json.loads) or {}
        dataset = meta.get("dataset") if isinstance(meta.get("dataset"), str) else None
    model_config = _read(storage.join(checkpoint, CONFIG_FILE), yaml.safe_load)
    if not isinstance(model_config, dict) or "num_classes" not in model_config:
        raise ValueError(f"{checkpoint}/{CONFIG_FILE}: not a model config")
    inference.update(s.inference.kwargs())
    class_names = None
    if data_uri:
        try:
            from data_prep.info import read_dataset_info

            info = read_dataset_info(data_uri)
            dataset, class_names = info.name, list(info.class_names)
        except (OSError, ValueError) as err:  # moved or deleted data: colours fall back
            notes.append(f"dataset of the search ({data_uri}) unreadable: {err}")
    source = ModelSource(checkpoint, model_config, inference, registered, dataset,
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
    """Fail on the driver, before any worker starts: ``set_inference`` on the architecture
    built on the meta device (no memory, no weights) validates the settings by the model's
    own rules, and says which policy runs (``oracle`` would need labels)."""
    import torch

    from pipelines.common.checkpoint import architecture_only
    from pipelines.common.model import build_model

    with torch.device("meta"):
        model = build_model(architecture_only(source.model_config))
    if source.inference:
        model.set_inference(**source.inference)
    if model.cfg.policy.mode == "oracle":
        raise ValueError(
            f"{source.checkpoint}: policy mode 'oracle' needs ground-truth labels; choose "
            "the policy for unlabelled images with --merge-thresholds, --budget or "
            "--policy-mode (threshold | budget | none)")
