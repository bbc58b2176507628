"""The training config: one typed, validated YAML per training (``step train ...``).

Sections: ``model`` (the architecture, ``step_model.StepConfig``), ``inference`` (the
settings the model trains and validates with, ``step_model.InferenceConfig``: saved with
every checkpoint as its own), ``data``, ``optim``, ``train``, ``finetune`` (optional
stage-2 phase with halting active), ``sharing_mix``, ``eval``, ``scaling`` (Ray Train
workers), ``storage`` (checkpoints, local or ``s3://``) and ``mlflow``. Everything has a
default except what cannot have one (the data). The resolved config is what runs: it is
saved with every run (MLflow artifact ``config.yaml``) and its flattened form is the
run's params. A config in the older layout, with inference keys inside ``model``
(``model.policy.mode``, ``model.exits.thresholds`` ...), still loads: they move to
``inference``, and an error names them as written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pipelines.common.groups import Groups
from pipelines.common.precision import Precision
from pipelines.common.settings import (
    ConfigError,
    MlflowSection,
    PatchMultiple,
    RunName,
    StrictModel,
    load_config,
)
from step_model.config import (
    InferenceConfig,
    InferenceOverrides,
    Probability,
    StepConfig,
    legacy_problems,
    split_legacy,
)

# PolicyConfig fields that shape the policy network's tensors or what its heads compute:
# stage 2 must build the network stage 1 trained
POLICY_ARCHITECTURE = ("network", "levels", "input_scale", "fine_features", "width", "depth")


def policy_mismatch(stage2: StepConfig, stage1: StepConfig) -> list[str]:
    """``model.policy.<field>: <here> here, <there> in stage 1`` for every architecture field
    where two architectures build different policy networks."""
    ours, theirs = stage2.policy.model_dump(), stage1.policy.model_dump()
    return [f"model.policy.{k}: {ours[k]!r} here, {theirs[k]!r} in stage 1"
            for k in POLICY_ARCHITECTURE if ours[k] != theirs[k]]

Stage = Literal["policy", "step"]


class DataConfig(StrictModel):
    """Shards written by ``step prep``: a shard directory, a ``{000000..000009}`` URL pattern
    or a ``manifest.parquet``, local or ``s3://``."""

    train: str | None = None
    val: str | None = None
    batch_size: int = Field(8, ge=1, description="per worker")
    val_batch_size: int = Field(1, ge=1)
    crop_size: PatchMultiple = Field(512, ge=16, description="square training crop, multiple of 16")
    num_workers: int = Field(2, ge=0, description="DataLoader workers per training worker")
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    photometric: bool = True
    resample: bool | Literal["auto"] = Field(
        "auto", description="sample shards with replacement; auto = only when there are "
        "fewer shards than ranks x loader workers")
    groups: Groups | None = Field(None, description="how sample keys fall into groups "
                                  "(recordings, cities): {pattern: REGEX} or {column: NAME}")
    exclude_groups: list[str] = Field(
        default_factory=list, description="groups whose training images are skipped "
        "(a condition held out to measure a change of conditions); needs data.groups")

    @model_validator(mode="after")
    def _groups_defined(self) -> DataConfig:
        if self.exclude_groups and self.groups is None:
            raise ValueError("exclude_groups: needs data.groups (how keys fall into groups)")
        return self

    @field_validator("scale_range")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"must be 0 < min <= max, got {v}")
        return v


class OptimConfig(StrictModel):
    """AdamW, linear warm-up then polynomial decay (the Segmenter / mmseg schedule)."""

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    head_lr_mult: float = Field(10.0, gt=0, description="lr multiplier for decoder, exit "
                                "and policy heads (randomly initialised)")
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(1e-6, gt=0, le=1, description="lr factor at step 0")
    poly_power: float = Field(1.0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")


class TrainLoopConfig(StrictModel):
    steps: int | None = Field(None, ge=1, description="optimizer steps; or give epochs")
    epochs: float | None = Field(None, gt=0)
    log_every: int = Field(10, ge=1)
    eval_every: int | None = Field(None, ge=1, description="None = at the end only")
    checkpoint_every: int = Field(500, ge=1)
    keep_last: int = Field(3, ge=1)
    seed: int = 0
    precision: Precision = Field(
        "auto", description="auto = bf16 autocast on GPU, fp32 on CPU")
    max_failures: int = Field(1, ge=-1, description="worker-group restarts (-1 = forever)")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainLoopConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of train.steps and train.epochs")
        return self


class FinetuneConfig(StrictModel):
    """Stage 2, DToP's recipe: after the base steps, fine-tune with halting active.

    With halting on at every step, blocks after an exit only ever see the tokens that
    exit leaves: the confident ones get better at leaving, but the plain path (nothing
    halted) drifts out of the training distribution. ``exit_mix`` draws the exit
    threshold per step, ``1.0`` meaning no halting, as ``sharing_mix`` does for merging:
    the fewer steps halt, the less the plain path pays, though it still pays (measured:
    docs/camvid.md, "Halting in training"). The draw is a function of (seed, step): the
    same on every rank and after a resume."""

    steps: int = Field(0, ge=0, description="0 = no fine-tuning phase")
    lr_scale: float = Field(0.1, gt=0, description="lr of the phase relative to optim.lr")
    inference: InferenceOverrides = Field(
        InferenceOverrides(), description="changes to the inference settings during the "
        "phase (e.g. exit_thresholds); the checkpoints keep the training's own")
    exit_mix: list[Probability] = Field(
        default_factory=list, description="exit thresholds (every exit) drawn per step of "
        "the phase; 1.0 = halting off for that step (the plain path); empty = the phase's "
        "exit thresholds throughout")

    @model_validator(mode="after")
    def _mix_needs_steps(self) -> FinetuneConfig:
        if self.exit_mix and not self.steps:
            raise ValueError("finetune.exit_mix: needs finetune.steps > 0 (the phase it mixes)")
        return self


class SharingMixConfig(StrictModel):
    """Stage 2: the merge threshold is drawn per optimizer step from ``thresholds``.

    A segmenter trained at one threshold only sees that threshold's token layouts: with
    most of the road and sky always merged, the plain (unshared) path and the low
    thresholds the search visits fall off its training distribution (measured:
    docs/camvid.md, "Recipe (and why)"). Drawing the threshold keeps every operating point
    in distribution. ``1.0`` means no sharing at all (the plain
    ViT path; not a probability cut-off, which a saturated sigmoid could still pass).
    A value listed twice is drawn twice as often. The draw is a function of (seed, step):
    the same on every rank and after a resume."""

    thresholds: list[Probability] = Field(
        default_factory=list, description="merge thresholds (all levels) drawn per step; "
        "1.0 = no sharing; empty = inference.merge_thresholds throughout")


class PolicyFinetuneConfig(StrictModel):
    """Stage 2: keep training the policy (loaded from ``policy_checkpoint``) against its
    ground truth, ``weight`` x its stage-1 loss added to the segmenter's, instead of
    freezing it. Selection stays without gradient: the policy learns only from the labels,
    on stage 2's images and augmentations."""

    enabled: bool = Field(False, description="fine-tune the policy in stage 2 (default: frozen)")
    weight: float = Field(1.0, gt=0, description="weight of the policy loss in the total")


class EvalSection(StrictModel):
    """Validation during training (and the defaults of ``step eval``)."""

    mode: Literal["whole", "slide"] = Field(
        "whole", description="whole image at its own resolution, or sliding windows")
    crop_size: PatchMultiple | None = Field(None, ge=16, description="slide window (default: data.crop_size)")
    stride: int | None = Field(None, ge=1, description="slide stride (default: 2/3 of the window)")
    max_samples: int | None = Field(None, ge=1, description="cap on validation images (global: split across ranks)")

class ScalingSection(StrictModel):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None


class StorageSection(StrictModel):
    storage_path: str = Field("runs/ray", description="local dir or s3://bucket/prefix")


class TrainMlflowSection(MlflowSection):
    log_model: bool = Field(True, description="log the final model with mlflow.pytorch")


class TrainConfig(StrictModel):
    name: RunName = Field("step-train", description="deterministic Ray run name: a rerun with "
                      "the same name and storage path resumes")
    stage: Stage | None = None
    model: StepConfig = Field(default_factory=StepConfig,
                              description="the architecture (step_model.StepConfig)")
    inference: InferenceConfig = Field(
        default_factory=InferenceConfig, description="the settings the model trains and "
        "validates with, saved with every checkpoint (step_model.InferenceConfig)")
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainLoopConfig = TrainLoopConfig(steps=1000)
    finetune: FinetuneConfig = FinetuneConfig()
    sharing_mix: SharingMixConfig = SharingMixConfig()
    policy_finetune: PolicyFinetuneConfig = PolicyFinetuneConfig()
    eval: EvalSection = EvalSection()
    scaling: ScalingSection = ScalingSection()
    storage: StorageSection = StorageSection()
    mlflow: TrainMlflowSection = TrainMlflowSection()
    policy_checkpoint: str | None = Field(
        None, description="stage 2: a stage-1 checkpoint whose (frozen) policy is used; "
        "not needed with inference.policy_mode oracle or none")

    @model_validator(mode="before")
    @classmethod
    def _older_layout(cls, data: Any) -> Any:
        """Inference keys inside ``model`` (the older layout) move to ``inference``. They
        win over its keys: they come from a file without the section, or from a ``--set``
        made for one, which is later than the file's own section."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            return data
        arch, changes, where = split_legacy(data["model"])
        if not changes:
            return {**data, "model": arch}
        try:
            InferenceOverrides.model_validate(changes)
        except ValidationError as err:
            raise PydanticCustomError("older_layout", legacy_problems(err, where, "model."),
                                      ) from None
        inference = data.get("inference")
        inference = {**inference, **changes} if isinstance(inference, dict) else \
            (changes if inference is None else inference)
        return {**data, "model": arch, "inference": inference}

    @model_validator(mode="after")
    def _stage_rules(self) -> TrainConfig:
        if self.stage == "policy":
            if self.policy_checkpoint:
                raise ValueError("policy_checkpoint: only for stage 'step'")
            if self.finetune.steps:
                raise ValueError("finetune.steps: only for stage 'step'")
            if self.sharing_mix.thresholds:
                raise ValueError("sharing_mix.thresholds: only for stage 'step'")
            if self.policy_finetune.enabled:
                raise ValueError("policy_finetune.enabled: only for stage 'step' (stage 1 "
                                 "trains the policy anyway)")
        try:
            finetune = self.inference.apply(self.finetune.inference)
        except ValidationError as err:
            raise ValueError("finetune.inference: " + legacy_problems(err, {})) from None
        blocks = self.model.exits.blocks  # None: the exits follow the backbone's depth
        for where, inf in (("inference", self.inference), ("finetune.inference", finetune)):
            try:
                inf.check_levels(self.model.policy.levels)
                if blocks is not None:
                    inf.check_exits(len(blocks))
            except ValueError as err:
                raise ValueError(f"{where}.{err} (model.exits.blocks: {blocks}, "
                                 f"model.policy.levels: {self.model.policy.levels})") from None
        mode = self.inference.policy_mode
        for m in {mode, finetune.policy_mode} if self.finetune.steps else {mode}:
            if self.stage == "step" and m in ("threshold", "budget") and not self.policy_checkpoint:
                raise ValueError(f"policy_checkpoint: required by inference.policy_mode={m!r} "
                                 "(train one with 'step train policy', or use mode 'oracle')")
        if self.sharing_mix.thresholds and mode != "threshold":
            raise ValueError(f"sharing_mix.thresholds: needs inference.policy_mode 'threshold' "
                             f"(a learned policy to share with), got {mode!r}")
        return self

    def require_data(self, *, val: bool = True) -> None:
        missing = [k for k in (("train", "val") if val else ("train",))
                   if not getattr(self.data, k)]
        if missing:
            raise ConfigError("invalid config: " + ", ".join(
                f"data.{k}: required (a shard dir written by 'step prep')" for k in missing))


def load_train_config(path: str | Path | None, overrides: list[str] | None = None,
                      *, stage: Stage | None = None) -> TrainConfig:
    """Load + validate; ``stage`` (from the command) must agree with the file's, if any."""
    cfg = load_config(TrainConfig, path, overrides)
    if stage is not None:
        if cfg.stage not in (None, stage):
            raise ConfigError(f"invalid config ({path}):\n  stage: the file says "
                              f"{cfg.stage!r} but the command is 'train {stage}'")
        data = cfg.model_dump(mode="json")
        data["stage"] = stage
        from pipelines.common.settings import validate

        cfg = validate(TrainConfig, data, str(path))
    return cfg
