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
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, not silently dropped."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _whole_patches(v: int | None) -> int | None:
    if v is not None and v % 16:
        raise ValueError(f"must be a multiple of the 16-pixel patch, got {v}")
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
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        given = e.get("input")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        shown = "" if isinstance(given, dict) else f" (given: {given!r})"
        lines.append(f"  {field}: {msg}{shown}")
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


# ---- thresholds: one syntax for every command, YAML file and --set ------------------------

THRESHOLD_LEVELS = (2, 4, 8, 16)
"""Superpatch sides that take a merge threshold (``step_model.config.LEVELS``; not imported
from there because ``step_model`` pulls in torch)."""

EXIT_THRESHOLDS_SYNTAX = "0.9 (every exit) or 0.9,0.8 (one per exit)"
MERGE_THRESHOLDS_SYNTAX = "0.8 (every level) or 2=0.8,4=0.7,8=0.6,16=0.5 (per level)"


def _probability(text: Any, what: str) -> float:
    if isinstance(text, bool):
        raise ValueError(f"{what}: expected a number in [0, 1], got {text!r}")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what}: {value:g} is not in [0, 1]")
    return value


def _level(key: Any) -> int:
    try:
        level = int(str(key).strip())
    except ValueError:
        level = None
    if isinstance(key, bool) or level not in THRESHOLD_LEVELS:
        raise ValueError(f"level {key!r} is not a superpatch side; use "
                         f"{', '.join(map(str, THRESHOLD_LEVELS))}")
    return level


def parse_thresholds(value: Any, *, per_level: bool = False
                     ) -> list[float] | dict[int, float] | None:
    """The one threshold syntax (flags, ``--set`` and YAML all go through it).

    Exit thresholds (``per_level=False``) -> a list, one value per exit or one for all:
    ``0.9``, ``"0.9"``, ``"0.9,0.8"`` or a YAML list ``[0.9, 0.8]``.

    Merge thresholds (``per_level=True``) -> ``{level: threshold}`` for the superpatch
    sides 2, 4, 8, 16: ``0.8`` or ``"0.8"`` (every level), ``"2=0.8,4=0.7,8=0.6,16=0.5"``
    (the levels given) or a YAML mapping ``{2: 0.8, 4: 0.7}``.

    Items are separated by commas and/or spaces; every value is a probability in [0, 1].
    ``None`` stays ``None`` (not set). Raises ``ValueError`` naming what was wrong and the
    accepted forms.
    """
    if value is None:
        return None
    syntax = MERGE_THRESHOLDS_SYNTAX if per_level else EXIT_THRESHOLDS_SYNTAX
    try:
        return _parse_thresholds(value, per_level, syntax)
    except ValueError as err:
        if syntax in str(err):
            raise
        raise ValueError(f"{err}; expected {syntax}") from None


def _parse_thresholds(value: Any, per_level: bool, syntax: str
                      ) -> list[float] | dict[int, float]:
    if isinstance(value, str):
        items = value.replace(",", " ").split()
        if not items:
            raise ValueError(f"empty; expected {syntax}")
        if any("=" in item for item in items):
            if not per_level:
                raise ValueError(f"{value!r}: exit thresholds have no levels; expected {syntax}")
            pairs = {}
            for item in items:
                level, sep, text = item.partition("=")
                if not sep or not level or not text:
                    raise ValueError(f"{item!r}: expected LEVEL=VALUE; expected {syntax}")
                pairs[level] = text
            value = pairs
        elif len(items) == 1:
            value = items[0]
        else:
            value = items
    if isinstance(value, dict):
        if not per_level:
            raise ValueError(f"exit thresholds are one value per exit, not a mapping; "
                             f"expected {syntax}")
        if not value:
            raise ValueError(f"empty mapping; expected {syntax}")
        out: dict[int, float] = {}
        for key, v in value.items():
            level = _level(key)
            if level in out:
                raise ValueError(f"level {level} given twice")
            out[level] = _probability(v, f"level {level}")
        return dict(sorted(out.items()))
    if isinstance(value, list | tuple):
        if per_level:
            raise ValueError(f"a list does not say which level each value is for; "
                             f"expected {syntax}")
        if not value:
            raise ValueError(f"empty list; expected {syntax}")
        return [_probability(v, f"exit {i + 1}") for i, v in enumerate(value)]
    one = _probability(value, "threshold")
    return dict.fromkeys(THRESHOLD_LEVELS, one) if per_level else [one]


def _exit_thresholds(value: Any) -> list[float] | None:
    return parse_thresholds(value)  # type: ignore[return-value]


def _merge_thresholds(value: Any) -> dict[int, float] | None:
    return parse_thresholds(value, per_level=True)  # type: ignore[return-value]


ExitThresholds = Annotated[
    list[float] | None, BeforeValidator(_exit_thresholds),
    Field(json_schema_extra={"metavar": "T[,T...]"})]
"""Early-exit confidence thresholds: ``0.9`` or ``0.9,0.8``, a YAML list, or None (unset)."""

MergeThresholds = Annotated[
    dict[int, float] | None, BeforeValidator(_merge_thresholds),
    Field(json_schema_extra={"metavar": "T|S=T[,S=T...]"})]
"""dCTS merge thresholds per level: ``0.8``, ``2=0.8,4=0.7``, a YAML mapping, or None."""


class MlflowSection(StrictModel):
    """Where a command's runs go (the ``mlflow`` section every config shares); each
    command's config extends it with switches of its own."""

    tracking_uri: str | None = Field(None, description="MLflow tracking URI (None: "
                                     "$MLFLOW_TRACKING_URI, else the embedded SQLite store "
                                     "./runs/mlflow.db)")
    experiment: str = Field("step-seg", description="MLflow experiment")
