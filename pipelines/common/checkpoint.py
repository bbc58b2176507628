"""Checkpoint directories: what training writes and what evaluation, tuning and serving read.

A checkpoint is a directory, local or ``s3://``::

    model.pt            state dict of the StepSegmenter (plain tensors: weights_only=True)
    model_config.yaml   the step_model config that rebuilds the architecture
    train_state.pt      optimizer, scheduler, step, epoch, RNG: only for resuming
    meta.json           stage, step, metrics at save time (human-readable)

Why a state dict and not a pickled module: ``torch.load(weights_only=True)`` cannot run
code from a checkpoint, and the architecture is rebuilt from the config, so a checkpoint
outlives refactors of the module classes. The same directory is a Ray Train
``Checkpoint``; Ray copies it to the run's storage path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from pipelines.common import storage
from pipelines.common.model import build_model

MODEL_FILE = "model.pt"
CONFIG_FILE = "model_config.yaml"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"


def checkpoint_dir_name(step: int) -> str:
    """``checkpoint_<step:08d>``: sorts by step, and the driver can find the final one."""
    return f"checkpoint_{step:08d}"


def save_checkpoint(directory: str | Path, model: torch.nn.Module, model_config: dict[str, Any],
                    *, train_state: dict[str, Any] | None = None,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint into a local directory (Ray uploads it to the storage path)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    torch.save(state, directory / MODEL_FILE)
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(model_config, sort_keys=False))
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


def local_dir(uri: str | Path) -> Path:
    """A local directory with the checkpoint's files (downloads ``s3://`` ones)."""
    path = storage.download_dir(str(uri))
    if not (path / MODEL_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{uri}: not a checkpoint (needs {MODEL_FILE} and {CONFIG_FILE})")
    return path


def read_model_config(path: str | Path) -> dict[str, Any]:
    data = yaml.safe_load((Path(path) / CONFIG_FILE).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}/{CONFIG_FILE}: expected a mapping")
    return data


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(path) / MODEL_FILE, map_location="cpu", weights_only=True)


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
        raise FileNotFoundError(f"{uri}: neither a checkpoint ({MODEL_FILE}) nor a run "
                                "directory with checkpoint_* folders")
    return storage.join(uri, names[-1])


def load_model(uri: str | Path, *, device: str | torch.device = "cpu"
               ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from ``model_config.yaml`` and load ``model.pt`` strictly; ``uri``
    is a checkpoint or a Ray run directory (its latest checkpoint)."""
    path = local_dir(resolve_checkpoint_dir(str(uri)))
    model_config = read_model_config(path)
    model = build_model(architecture_only(model_config))
    model.load_state_dict(load_state_dict(path), strict=True)
    return model.to(device).eval(), model_config


def architecture_only(model_config: dict[str, Any]) -> dict[str, Any]:
    """The config without pretrained-weight sources: ``model.pt`` holds every tensor, and a
    checkpoint must load on machines that lack the original weight files."""
    data = {**model_config, "backbone_weights": None, "init_from": None}
    data["policy"] = {**(model_config.get("policy") or {}), "pretrained": False, "weights": None}
    return data


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
