"""One command layer: every ``step`` subcommand is generated from one typed settings model.

A :class:`Command` wraps a pydantic settings model (a ``StrictModel``) and a handler. It
builds the subcommand's argparse parser from the model and, once for every command:

* **settings** come from ``--config FILE`` (YAML; ``step run`` and ``step submit`` also
  take it as a positional, an alias), then ``--set key=value`` (repeatable, dotted keys,
  YAML values), then one flag per scalar field of the model, sections included:
  ``--checkpoint URI`` *is* ``--set checkpoint=URI``, ``--inference.top-k 3`` *is*
  ``--set inference.top_k=3`` (the flag's help is the field's description). That is the
  precedence: model defaults < ``--config`` < ``--set`` (in order) < flags. A nested field
  can get a shorter flag, as :class:`Alias` (``step eval --thresholds`` =
  ``--set inference.exit_thresholds=...``): every command that runs a model gets one per
  inference setting (:func:`inference_aliases`), and old spellings are kept that way;
* **options**: an optional second model for what the command does rather than what it
  runs (``step run --dry-run``, ``step submit --address``): flags only;
* ``--print-config`` prints the resolved settings (YAML) and exits;
* ``--json PATH`` writes the handler's result document, locally or to ``s3://``
  (:func:`write_json`);
* **errors**: a bad setting (``ConfigError``, pydantic ``ValidationError``) prints
  ``step <cmd>: error: <message naming the dotted field and the allowed values>`` on
  stderr and exits 2; an expected failure (:class:`pipelines.common.errors.ExpectedFailure`,
  raised where the user's input or environment is at fault, and the lower layers' own,
  :func:`pipelines.common.errors.library_failures`) prints the same line and exits with
  its code (1 by default). Anything else, a ``ValueError`` included, is a bug and keeps
  its traceback.

A command module exposes ``COMMAND = Command(...)`` plus ``configure = COMMAND.configure``
and ``run = COMMAND.run``, the interface :mod:`pipelines.cli.app` calls. The settings model
is imported with the module (only when its command is chosen); handlers keep their heavy
imports (torch, ray, mlflow) inside.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pipelines.common.errors import ExpectedFailure, library_failures
from pipelines.common.settings import (
    ConfigError,
    apply_overrides,
    dump_config,
    format_validation_error,
    load_config,
    parse_override,
    validate,
)


@dataclass(frozen=True)
class Alias:
    """Extra flag(s) for a (nested) settings field: ``Alias(("--thresholds",),
    "inference.exit_thresholds")``. A boolean field gets ``--x/--no-x``
    (``Alias(("--mlflow",), "mlflow.enabled")`` keeps ``--no-mlflow``)."""

    flags: tuple[str, ...]
    field: str
    help: str | None = None


# Older spellings of inference flags, kept next to the generated --field-name.
INFERENCE_SPELLINGS = {"exit_thresholds": ("--thresholds",)}


def inference_aliases(section: str = "inference") -> tuple[Alias, ...]:
    """One flag per field of ``step_model.config.InferenceConfig``, setting the
    ``section`` field (an ``InferenceOverrides``) of a command's settings: ``--policy-mode``,
    ``--merge-thresholds``, ``--thresholds``/``--exit-thresholds``, ``--halting``/
    ``--no-halting`` ... Generated from the config, so a new inference setting gets its
    flag on every command that runs a model, spelled the same everywhere."""
    from step_model.config import InferenceOverrides

    return tuple(Alias((*INFERENCE_SPELLINGS.get(name, ()), "--" + name.replace("_", "-")),
                       f"{section}.{name}") for name in InferenceOverrides.model_fields)


# The flags every command that runs a checkpoint spells the same way.
INFERENCE_ALIASES = inference_aliases()
MLFLOW_ALIASES = (
    Alias(("--tracking-uri",), "mlflow.tracking_uri"),
    Alias(("--experiment",), "mlflow.experiment"),
    Alias(("--parent-run-id",), "mlflow.parent_run_id"),
    Alias(("--mlflow",), "mlflow.enabled"),  # and --no-mlflow
)


@dataclass
class Invocation:
    """What a handler gets: the validated settings and options, plus how they were given
    (``config`` + ``overrides`` reproduce ``settings``; flags are in ``overrides`` as
    ``--set`` items)."""

    prog: str
    path: tuple[str, ...]
    settings: Any
    options: Any
    config: str | None
    overrides: list[str]
    json_path: str | None = None


@dataclass
class Result:
    """A handler's outcome: ``doc`` goes to ``--json``; ``code`` is the exit status."""

    doc: dict[str, Any] | None = None
    code: int = 0


Handler = Callable[[Invocation], "Result | int | None"]
Loader = Callable[[str | None, list[str], tuple[str, ...]], BaseModel]


def write_json(path: str, doc: Any) -> None:
    """The one ``--json`` writer: a local path (parents created) or ``s3://bucket/key``."""
    from data_prep import storage

    storage.write_bytes(path, json.dumps(doc, indent=2, default=str).encode() + b"\n")


def error_line(prog: str, message: str) -> str:
    return f"{prog}: error: {message}"


# ---- field introspection ----------------------------------------------------------------

@dataclass
class _Flag:
    """One generated flag: its option strings, the dotted field it sets and how."""

    flags: tuple[str, ...]
    field: str
    kind: str  # bool | str | text | yaml | list
    nullable: bool
    dest: str
    help: str
    metavar: str | None = None
    choices: tuple[Any, ...] = ()


def _members(annotation: Any) -> tuple[list[Any], bool]:
    """The non-None members of a (possibly Optional/Union) annotation, and whether None is
    allowed. ``Annotated[X, ...]`` members count as ``X``."""
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        members = list(typing.get_args(annotation))
    else:
        members = [annotation]
    nullable = type(None) in members
    out = []
    for m in members:
        if m is type(None):
            continue
        if typing.get_origin(m) is typing.Annotated:
            m = typing.get_args(m)[0]
        out.append(m)
    return out, nullable


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _scalar(tp: Any) -> bool:
    return tp in (bool, int, float, str) or typing.get_origin(tp) is Literal


def _kind(info: FieldInfo) -> tuple[str | None, bool, tuple[Any, ...]]:
    """(kind, nullable, choices) of a field, or kind None when it gets no flag (sections,
    mappings)."""
    members, nullable = _members(info.annotation)
    if any(isinstance(m, BeforeValidator) for m in info.metadata):
        return "text", nullable, ()  # the field parses its own text (thresholds)
    if not members:
        return None, nullable, ()
    if all(m is bool for m in members):
        return "bool", nullable, ()
    literals = [m for m in members if typing.get_origin(m) is Literal]
    if len(literals) == len(members):
        choices = tuple(v for m in literals for v in typing.get_args(m))
        if all(isinstance(v, str) for v in choices):
            return "str", nullable, choices
        return "yaml", nullable, choices
    if len(members) == 1 and typing.get_origin(members[0]) in (list, tuple):
        inner = [typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a
                 for a in typing.get_args(members[0]) if a is not Ellipsis]
        if inner and all(_scalar(a) for a in inner):
            choices = tuple(v for a in inner if typing.get_origin(a) is Literal
                            for v in typing.get_args(a))
            return "list", nullable, choices
        return None, nullable, ()
    if not all(_scalar(m) for m in members):
        return None, nullable, ()
    if str in members:
        return "str", nullable, ()
    return "yaml", nullable, ()


def _field_at(model: type[BaseModel], dotted: str) -> FieldInfo:
    """The FieldInfo of a dotted field (``inference.exit_thresholds``)."""
    cls: Any = model
    info = None
    for part in dotted.split("."):
        if not _is_model(cls) or part not in cls.model_fields:
            raise KeyError(f"{model.__name__} has no field {dotted!r}")
        info = cls.model_fields[part]
        members, _ = _members(info.annotation)
        cls = next((m for m in members if _is_model(m)), None)
    assert info is not None
    return info


def _default_text(info: FieldInfo) -> str | None:
    if info.default is PydanticUndefined:
        return None if info.default_factory is not None else "required"
    default = info.default
    if isinstance(default, BaseModel):
        return None
    if default is None:
        return None
    if isinstance(default, bool):
        return str(default).lower()
    return str(default)


def _help(info: FieldInfo, extra: str | None = None) -> str:
    text = extra or info.description or ""
    default = _default_text(info)
    if default == "required":
        text = f"{text} (required)" if text else "required"
    elif default not in (None, ""):
        text = f"{text} (default: {default})" if text else f"default: {default}"
    return text.replace("%", "%%")


def _metavar(info: FieldInfo, kind: str, choices: tuple[Any, ...], name: str) -> str | None:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if "metavar" in extra:
        return str(extra["metavar"])
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    if kind == "list":
        return "VALUE"
    return name.rsplit(".", 1)[-1].upper()


def _make_flag(model: type[BaseModel], dotted: str, flags: tuple[str, ...], dest: str,
               help_text: str | None = None) -> _Flag | None:
    info = _field_at(model, dotted)
    kind, nullable, choices = _kind(info)
    if kind is None:
        return None
    return _Flag(flags, dotted, kind, nullable, dest, _help(info, help_text),
                 _metavar(info, kind, choices, dotted), choices=choices)


def _option_string(name: str) -> str:
    """``--max-samples``; a nested field keeps its dots: ``--inference.exit-thresholds``."""
    return "--" + name.replace("_", "-")


def _scalar_fields(model: type[BaseModel], prefix: str, exclude: Collection[str] = ()):
    """Every field's dotted name, sections walked into (``inference.exit_thresholds``):
    each gets a flag when its type has one (:func:`_kind`)."""
    for name, info in model.model_fields.items():
        if name in exclude:
            continue
        members, _ = _members(info.annotation)
        sections = [m for m in members if _is_model(m)]
        if len(sections) == 1 and len(members) == 1:
            if any(isinstance(m, BeforeValidator) for m in info.metadata):
                yield prefix + name  # the section also parses its own text (a preset's name)
            yield from _scalar_fields(sections[0], f"{prefix}{name}.")
        else:
            yield prefix + name


def _add(parser: argparse._ActionsContainer, flag: _Flag) -> None:
    if flag.kind == "bool":
        parser.add_argument(*flag.flags, dest=flag.dest, default=None,
                            action=argparse.BooleanOptionalAction, help=flag.help)
    elif flag.kind == "list":
        parser.add_argument(*flag.flags, dest=flag.dest, default=None, action="extend",
                            nargs="+", metavar=flag.metavar, help=flag.help)
    else:
        parser.add_argument(*flag.flags, dest=flag.dest, default=None,
                            metavar=flag.metavar, help=flag.help)


def _override(flag: _Flag, value: Any) -> str:
    """The ``--set`` item a given flag stands for."""
    if flag.kind == "bool":
        return f"{flag.field}={'true' if value else 'false'}"
    if flag.kind == "list":
        return f"{flag.field}={json.dumps(list(value))}"
    if value == "" and flag.nullable:
        return f"{flag.field}=null"  # an empty value unsets an optional field
    if flag.kind in ("str", "text"):  # text stays text, whatever it looks like
        plain = f"{flag.field}={value}"
        return plain if parse_override(plain)[1] == value else \
            f"{flag.field}={json.dumps(value)}"  # a quoted YAML string
    return f"{flag.field}={value}"  # YAML-typed, exactly as --set would read it


# ---- the command --------------------------------------------------------------------------

@dataclass
class Command:
    """A ``step`` subcommand generated from ``settings`` (see the module docstring).

    ``load(config, overrides, command_path)`` replaces the default loader
    (``load_config(settings, ...)``) where a settings type has its own (training configs
    check their stage, pipeline configs the files they point at). ``exclude`` names
    top-level fields that get no flag. ``json`` is the ``--json`` help (None: no
    ``--json``); ``json_default`` writes one even without the flag.
    """

    settings: type[BaseModel]
    handler: Handler
    options: type[BaseModel] | None = None
    load: Loader | None = None
    aliases: Sequence[Alias] = ()
    exclude: Collection[str] = ()
    positional_config: bool = False
    config_required: bool = False
    config_help: str = "settings file (YAML)"
    json: str | None = "write the result as JSON (a local path or s3://bucket/key)"
    json_default: str | None = None
    _flags: list[_Flag] = field(default_factory=list, init=False, repr=False)
    _option_flags: list[_Flag] = field(default_factory=list, init=False, repr=False)

    # -- parser ------------------------------------------------------------------------
    def setting_flags(self) -> list[_Flag]:
        flags = []
        for dotted in _scalar_fields(self.settings, "", self.exclude):
            flag = _make_flag(self.settings, dotted, (_option_string(dotted),),
                              f"setting:{dotted}")
            if flag is not None:
                flags.append(flag)
        for i, alias in enumerate(self.aliases):
            flag = _make_flag(self.settings, alias.field, alias.flags, f"alias:{i}",
                              alias.help)
            if flag is None:
                raise TypeError(f"alias {alias.flags}: {alias.field} is a section")
            flags.append(flag)
        return flags

    def option_flags(self) -> list[_Flag]:
        if self.options is None:
            return []
        flags = []
        for name in self.options.model_fields:
            flag = _make_flag(self.options, name, (_option_string(name),), f"option:{name}")
            if flag is None:
                raise TypeError(f"{self.options.__name__}.{name}: options are flat")
            flags.append(flag)
        return flags

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        self._flags = self.setting_flags()
        self._option_flags = self.option_flags()
        cfg = parser.add_argument_group(
            f"settings ({self.settings.__name__})",
            "model defaults < --config < --set (in order) < the flags below; a flag "
            "FIELD is --set field=VALUE")
        if self.positional_config:
            cfg.add_argument("config_file", nargs="?", default=None, metavar="CONFIG",
                             help=f"{self.config_help} (same as --config)")
        cfg.add_argument("--config", default=None, metavar="FILE", help=self.config_help)
        cfg.add_argument("--set", dest="overrides", action="append", default=[],
                         metavar="KEY=VALUE", help="set any field, dotted keys, YAML values "
                         "(repeatable), e.g. --set a.b=1e-4 --set c=[4,8]")
        cfg.add_argument("--print-config", action="store_true",
                         help="print the resolved settings (YAML) and exit")
        for flag in self._flags:
            _add(cfg, flag)
        if self._option_flags or self.json:
            opts = parser.add_argument_group("command options")
            for flag in self._option_flags:
                _add(opts, flag)
            if self.json:
                default = f" (default: {self.json_default})" if self.json_default else ""
                opts.add_argument("--json", default=self.json_default, metavar="PATH",
                                  help=self.json + default)

    # -- run ---------------------------------------------------------------------------
    def _config_path(self, args: argparse.Namespace) -> str | None:
        from pathlib import Path

        path = args.config
        positional = getattr(args, "config_file", None)
        if positional is not None:
            if path is not None and path != positional:
                raise ConfigError(f"two configs given: {positional} and --config {path}")
            path = positional
        if path is None:
            if self.config_required:
                raise ConfigError(f"--config: required ({self.config_help})")
            return None
        if not Path(path).is_file():
            raise ConfigError(f"--config {path}: file not found")
        return path

    def invocation(self, args: argparse.Namespace) -> Invocation:
        """Validate what ``args`` gives into settings and options (ConfigError if bad)."""
        if not self._flags and not self._option_flags:
            self._flags, self._option_flags = self.setting_flags(), self.option_flags()
        path = tuple(getattr(args, "command_path", ()) or ())
        prog = "step " + " ".join(path) if path else "step"
        config = self._config_path(args)
        overrides = list(args.overrides or [])
        for flag in self._flags:
            value = getattr(args, flag.dest, None)
            if value is not None:
                overrides.append(_override(flag, value))
        if self.load is not None:
            settings = self.load(config, overrides, path)
        elif config is None:
            settings = validate(self.settings, apply_overrides({}, overrides), "command line")
        else:
            settings = load_config(self.settings, config, overrides)
        options = None
        if self.options is not None:
            items = [_override(f, getattr(args, f.dest)) for f in self._option_flags
                     if getattr(args, f.dest, None) is not None]
            options = validate(self.options, apply_overrides({}, items), "options")
        return Invocation(prog=prog, path=path, settings=settings, options=options,
                          config=config, overrides=overrides,
                          json_path=getattr(args, "json", None) or None)

    def run(self, args: argparse.Namespace) -> int:
        path = tuple(getattr(args, "command_path", ()) or ())
        prog = "step " + " ".join(path) if path else "step"
        try:
            inv = self.invocation(args)
            if args.print_config:
                print(dump_config(inv.settings), end="")
                return 0
            outcome = self.handler(inv)
        except ConfigError as err:
            return _fail(prog, str(err), 2)
        except ValidationError as err:
            return _fail(prog, format_validation_error(err, err.title), 2)
        except ExpectedFailure as err:
            return _fail(prog, str(err), err.code)
        except library_failures() as err:
            return _fail(prog, str(err), 1)
        if not isinstance(outcome, Result):
            return int(outcome or 0)
        if inv.json_path and outcome.doc is not None:
            try:
                write_json(inv.json_path, outcome.doc)
            except Exception as err:  # noqa: BLE001 - one line: S3 and disk errors alike
                return _fail(prog, f"--json {inv.json_path}: {type(err).__name__}: {err}", 1)
            print(f"{prog}: wrote {inv.json_path}")
        return outcome.code


def _fail(prog: str, message: str, code: int) -> int:
    print(error_line(prog, message), file=sys.stderr)
    return code
