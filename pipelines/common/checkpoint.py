"""Checkpoint directories: what training writes and what evaluation, tuning and serving read.

A checkpoint is a directory, local or ``s3://``::

    model.pt            state dict of the StepSegmenter (plain tensors: weights_only=True)
    model_config.yaml   the architecture (step_model.StepConfig, as built): rebuilds the model
    inference.yaml      the inference settings it was trained with (step_model.InferenceConfig)
    train_state.pt      optimizer, scheduler, step, epoch, RNG: only for resuming
    meta.json           stage, step, metrics at save time (human-readable)

The architecture and the inference settings are stored apart: a training phase (halting
in fine-tuning, a step's drawn threshold) never leaks into the architecture, and a
checkpoint written before ``inference.yaml`` existed (its settings inside
``model_config.yaml``: ``policy.mode``, ``exits.thresholds`` ...) still loads, its settings
read from there (``step_model.config.split_model_config``).

Why a state dict and not a pickled module: ``torch.load(weights_only=True)`` cannot run
code from a checkpoint, and the architecture is rebuilt from the config, so a checkpoint
outlives refactors of the module classes. The same directory is a Ray Train
``Checkpoint``; Ray copies it to the run's storage path.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from pipelines.common import storage
from pipelines.common.errors import InputNotFound, InvalidInput
from pipelines.common.model import build_model
from step_model.config import InferenceConfig, StepConfig, split_model_config, stored_inference

MODEL_FILE = "model.pt"
CONFIG_FILE = "model_config.yaml"
INFERENCE_FILE = "inference.yaml"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"


def checkpoint_dir_name(step: int) -> str:
    """``checkpoint_<step:08d>``: sorts by step, and the driver can find the final one."""
    return f"checkpoint_{step:08d}"


def save_checkpoint(directory: str | Path, model: torch.nn.Module,
                    inference: InferenceConfig | None = None, *,
                    train_state: dict[str, Any] | None = None,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint into a local directory (Ray uploads it to the storage path): the
    model's architecture as built, and ``inference`` (default: the model's current
    settings; a training passes the settings it trains with, not a phase's)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    inner = unwrap(model)
    state = {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    torch.save(state, directory / MODEL_FILE)
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(inner.cfg.to_dict(), sort_keys=False))
    (directory / INFERENCE_FILE).write_text(yaml.safe_dump(
        (inference or inner.inference).to_dict(), sort_keys=False))
    if train_state is not None:
        torch.save(train_state, directory / STATE_FILE)
    (directory / META_FILE).write_text(json.dumps(meta or {}, indent=2, default=str))
    return directory


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def read_configs(uri: str | Path) -> tuple[StepConfig, InferenceConfig]:
    """(architecture, inference settings) of the checkpoint ``uri`` (local or ``s3://``;
    only its two small files are read): ``inference.yaml``, or for a checkpoint written
    before it existed, the inference keys of ``model_config.yaml``'s older layout."""
    uri = str(uri)
    model_config = _read_mapping(uri, CONFIG_FILE)
    # no inference.yaml: written before it, and before the margin score became the default
    stored = (_read_mapping(uri, INFERENCE_FILE)
              if storage.exists(storage.join(uri, INFERENCE_FILE)) else {})
    inference = stored_inference(stored)
    try:
        return split_model_config(model_config, inference)
    except ValueError as err:
        raise InvalidInput(f"{uri}/{CONFIG_FILE}: {err}") from None


def _read_mapping(uri: str, name: str) -> dict[str, Any]:
    from data_prep import storage as files

    data = yaml.safe_load(files.read_bytes(storage.join(uri, name)))
    if not isinstance(data, dict):
        raise InvalidInput(f"{uri}/{name}: expected a mapping")
    return data


def load_state_dict(uri: str | Path) -> dict[str, torch.Tensor]:
    """``model.pt`` of checkpoint ``uri``; an ``s3://`` one is read into memory, never
    staged on disk (a search loads its checkpoint once per trial: staged copies filled
    /tmp with one checkpoint per trial)."""
    if storage.is_s3(str(uri)):
        data = io.BytesIO(storage.files.read_bytes(storage.join(str(uri), MODEL_FILE)))
        return torch.load(data, map_location="cpu", weights_only=True)
    return torch.load(Path(uri) / MODEL_FILE, map_location="cpu", weights_only=True)


def check_checkpoint(uri: str) -> str:
    """``uri`` when it holds a checkpoint's weights and architecture (local or s3://)."""
    if not all(storage.exists(storage.join(uri, f)) for f in (MODEL_FILE, CONFIG_FILE)):
        raise InputNotFound(f"{uri}: not a checkpoint (needs {MODEL_FILE} and {CONFIG_FILE})")
    return uri


def load_train_state(path: str | Path) -> dict[str, Any] | None:
    file = Path(path) / STATE_FILE
    if not file.is_file():
        return None
    return torch.load(file, map_location="cpu", weights_only=True)


def read_meta(path: str | Path) -> dict[str, Any]:
    file = Path(path) / META_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def resolve_checkpoint_dir(uri: str) -> str:
    """A checkpoint dir, or a Ray run dir (``<storage>/<name>``) -> its latest checkpoint.

    Every command that takes ``--checkpoint`` accepts both (through :func:`load_model`)."""
    uri = str(uri)
    if storage.exists(storage.join(uri, MODEL_FILE)):
        return uri
    names = sorted({rel.split("/", 1)[0] for rel in storage.list_files(uri)
                    if rel.startswith("checkpoint_") and rel.endswith("/" + MODEL_FILE)})
    if not names:
        raise InputNotFound(f"{uri}: neither a checkpoint ({MODEL_FILE}) nor a run "
                                "directory with checkpoint_* folders")
    return storage.join(uri, names[-1])


def load_model(uri: str | Path, *, device: str | torch.device = "cpu"
               ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from its architecture, load ``model.pt`` strictly and set the
    checkpoint's inference settings; ``uri`` is a checkpoint or a Ray run directory (its
    latest checkpoint). Returns (model, the architecture as a dict, weight sources kept)."""
    path = check_checkpoint(resolve_checkpoint_dir(str(uri)))
    arch, inference = read_configs(path)
    model = build_model(without_weight_sources(arch), inference)
    model.load_state_dict(load_state_dict(path), strict=True)
    return model.to(device).eval(), arch.to_dict()


def without_weight_sources(cfg: StepConfig) -> StepConfig:
    """The architecture without pretrained-weight sources: ``model.pt`` holds every tensor,
    and a checkpoint must load on machines that lack the original weight files."""
    return cfg.model_copy(update={
        "backbone_weights": None, "init_from": None,
        "policy": cfg.policy.model_copy(update={"pretrained": False, "weights": None})})


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names and exact bytes of a state dict (resume tests compare these)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()
