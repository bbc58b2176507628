"""The one place where ``pipelines`` turns a model-config dict into ``step_model`` objects.

The training config keeps ``model`` as the plain dict form of ``step_model.StepConfig``
(what ``model_config.yaml`` stores), validated by ``StepConfig`` itself so that its error
messages (dotted field names) reach the user unchanged, prefixed with ``model.``.

``step_model`` reads local weight files only: ``s3://`` values of ``backbone_weights`` and
``init_from`` are downloaded here, once per machine, into a cache
(``$STEP_WEIGHTS_CACHE``, else ``$XDG_CACHE_HOME/step-seg/weights``, else
``~/.cache/step-seg/weights``), one folder per URI (``<sha256 of the URI>/<file name>``).
The cache is keyed by URI: weight releases do not change in place; a new file needs a new
URI (or an emptied cache).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
from pathlib import Path
from typing import Any

import torch

from data_prep import storage as files
from pipelines.common import storage

SEGMENTER_PREFIX = "segmenter:"  # step_model.config.INIT_FROM_PREFIX, without importing torch code here
SEGMENTER_FILES = ("checkpoint.pth", "variant.yml")


def normalize_model_config(data: dict[str, Any]) -> dict[str, Any]:
    """Validate with ``StepConfig`` and return the resolved dict (defaults filled in)."""
    from pydantic import ValidationError
    from pydantic_core import PydanticCustomError

    from step_model import StepConfig

    try:
        return StepConfig.model_validate(data).model_dump(mode="json")
    except ValidationError as err:
        # Re-raised for the enclosing TrainConfig, which reports it under `model`:
        # "model: policy.mode: Input should be ... (given: 'x')".
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: "
            f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
            + ("" if isinstance(e.get("input"), dict) else f" (given: {e.get('input')!r})")
            for e in err.errors()
        )
        raise PydanticCustomError("step_model_config", problems) from None


def step_config(data: dict[str, Any]):
    from step_model import StepConfig

    return StepConfig.model_validate(data)


def policy_mode(data: dict[str, Any]) -> str:
    return str((data.get("policy") or {}).get("mode", "threshold"))


def build_model(data: dict[str, Any]) -> torch.nn.Module:
    """``StepSegmenter`` from the config dict: pretrained weights (``backbone_weights``,
    ``init_from``) when it names them, ``s3://`` ones through the local cache."""
    from step_model import build_step_model

    cfg = step_config(data)
    local = with_local_weights(cfg)
    model = build_step_model(local)
    if local is not cfg:  # the saved config records the URIs given, not this machine's cache
        model.cfg = model.cfg.model_copy(
            update={"backbone_weights": cfg.backbone_weights, "init_from": cfg.init_from})
    return model


def with_local_weights(cfg: Any) -> Any:
    """``cfg`` with its ``s3://`` weight URIs replaced by local copies (the same object when
    there are none)."""
    update = {}
    if cfg.backbone_weights and storage.is_s3(cfg.backbone_weights):
        update["backbone_weights"] = str(cached_file(cfg.backbone_weights))
    if cfg.init_from and storage.is_s3(cfg.init_from.removeprefix(SEGMENTER_PREFIX)):
        update["init_from"] = SEGMENTER_PREFIX + str(cached_segmenter(cfg.init_from))
    return cfg.model_copy(update=update) if update else cfg


def weights_cache_dir() -> Path:
    if os.environ.get("STEP_WEIGHTS_CACHE"):
        return Path(os.environ["STEP_WEIGHTS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "step-seg" / "weights"


def cached_file(uri: str, slot: str | None = None) -> Path:
    """The local copy of the object ``uri``, downloaded on first use into the cache folder
    named by ``slot`` (default: ``uri`` itself). Streamed to a temporary name and renamed,
    so that workers starting together on one machine never read a partial file."""
    folder = weights_cache_dir() / hashlib.sha256((slot or uri).encode()).hexdigest()[:16]
    dest = folder / posixpath.basename(uri)
    if dest.is_file():
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f".{dest.name}.{os.getpid()}.part"
    try:
        with files.open_read(uri) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 24)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def cached_segmenter(spec: str) -> Path:
    """``segmenter:s3://.../checkpoint.pth`` (or its folder) -> the local checkpoint.pth, with
    its variant.yml beside it when the folder has one."""
    uri = spec.removeprefix(SEGMENTER_PREFIX).rstrip("/")
    if not uri.endswith((".pth", ".pt")):
        uri = storage.join(uri, SEGMENTER_FILES[0])
    folder = uri.rsplit("/", 1)[0]
    checkpoint = cached_file(uri, slot=folder)
    variant = storage.join(folder, SEGMENTER_FILES[1])
    if not (checkpoint.parent / SEGMENTER_FILES[1]).is_file() and storage.exists(variant):
        cached_file(variant, slot=folder)
    return checkpoint
