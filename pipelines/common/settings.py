"""Typed configs from YAML with ``--set key=value`` overrides.

Every command that takes a config goes through :func:`load_config`, so all of them share
the same override syntax and the same error messages: a wrong key or value is reported as
one line per problem, naming the dotted field, what was given and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, Field, ValidationError

# The strict base and the one threshold syntax are step_model's (its config module imports
# pydantic only): re-exported here for every pipelines config.
from step_model.config import (  # noqa: F401
    EXIT_THRESHOLDS_SYNTAX,
    MERGE_THRESHOLDS_SYNTAX,
    PATCH,
    ExitThresholds,
    MergeThresholds,
    StrictModel,
    parse_thresholds,
)

T = TypeVar("T", bound=BaseModel)


def _whole_patches(v: int | None) -> int | None:
    if v is not None and v % PATCH:
        raise ValueError(f"must be a multiple of the {PATCH}-pixel patch, got {v}")
    return v


PatchMultiple = Annotated[int, AfterValidator(_whole_patches)]
"""A size in pixels that the ViT sees as whole 16 x 16 patches (crops, windows, tiles)."""


def _folder_safe(v: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
        raise ValueError("use letters, digits, '_', '.', '-' (it names a folder)")
    return v


RunName = Annotated[str, AfterValidator(_folder_safe)]
"""A run or pipeline name: it names folders (storage paths, Ray run directories)."""


class ConfigError(ValueError):
    """A config that does not validate; the message lists every bad field."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b.c=1e-4"`` -> (["a", "b", "c"], 0.0001); values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(path[:-1])} is not a section")
            node = child
        node[path[-1]] = value
    return data


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        given = e.get("input")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        shown = "" if isinstance(given, dict) else f" (given: {given!r})"
        # a whole-config rule names its fields in its message
        lines.append(f"  {field}: {msg}{shown}" if field else f"  {msg}{shown}")
    return "\n".join(lines)


def validate(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load ``path`` (YAML; None = all defaults), apply overrides, validate into ``cls``."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        text = Path(path).read_text()
        loaded = yaml.safe_load(text)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    data = apply_overrides(data, overrides)
    return validate(cls, data, source)


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what gets saved with every run)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(cfg: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted-key view of a config, for MLflow params."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class MlflowSection(StrictModel):
    """Where a command's runs go (the ``mlflow`` section every config shares); each
    command's config extends it with switches of its own."""

    tracking_uri: str | None = Field(None, description="MLflow tracking URI (None: "
                                     "$MLFLOW_TRACKING_URI, else the embedded SQLite store "
                                     "./runs/mlflow.db)")
    experiment: str = Field("step-seg", description="MLflow experiment")
