"""The one place where ``pipelines`` builds a ``step_model`` segmenter from its configs.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from data_prep import storage as files
from pipelines.common import storage
from step_model.config import INIT_FROM_PREFIX, InferenceConfig, InferenceOverrides, StepConfig

SEGMENTER_FILES = ("checkpoint.pth", "variant.yml")


def build_model(cfg: StepConfig | Mapping[str, Any],
                inference: InferenceConfig | InferenceOverrides | Mapping[str, Any]
                | None = None) -> torch.nn.Module:
    """``StepSegmenter`` of the architecture ``cfg`` (or its dict, either layout) with
    ``inference``: pretrained weights (``backbone_weights``, ``init_from``) when it names
    them, ``s3://`` ones through the local cache (the model's config keeps the URIs)."""
    from step_model import build_step_model

    if not isinstance(cfg, StepConfig):
        from step_model.config import split_model_config

        cfg, own = split_model_config(cfg)
        if not isinstance(inference, InferenceConfig):
            inference = own.apply(inference)
    return build_step_model(cfg, inference, local_files=local_weights(cfg))


def local_weights(cfg: StepConfig) -> dict[str, str]:
    """{weight source named in ``cfg``: its local copy} for the ``s3://`` ones."""
    out = {}
    if cfg.backbone_weights and storage.is_s3(cfg.backbone_weights):
        out[cfg.backbone_weights] = str(cached_file(cfg.backbone_weights))
    if cfg.init_from and storage.is_s3(cfg.init_from.removeprefix(INIT_FROM_PREFIX)):
        out[cfg.init_from] = INIT_FROM_PREFIX + str(cached_segmenter(cfg.init_from))
    return out


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
    uri = spec.removeprefix(INIT_FROM_PREFIX).rstrip("/")
    if not uri.endswith((".pth", ".pt")):
        uri = storage.join(uri, SEGMENTER_FILES[0])
    folder = uri.rsplit("/", 1)[0]
    checkpoint = cached_file(uri, slot=folder)
    variant = storage.join(folder, SEGMENTER_FILES[1])
    if not (checkpoint.parent / SEGMENTER_FILES[1]).is_file() and storage.exists(variant):
        cached_file(variant, slot=folder)
    return checkpoint
