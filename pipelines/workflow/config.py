"""The pipeline config of ``step run``: one YAML for prepare -> train -> tune -> evaluate ->
report -> analyze.

The two trainings keep their own configs (``pipelines.train.config.TrainConfig`` files, the same
ones ``step train`` takes); the pipeline config points at them and adds ``--set``-style
overrides, so a recipe is written once and used both ways. The data paths, storage path,
policy checkpoint and MLflow settings of the trainings are filled in by the workflow from
the steps before them: they never need to be repeated here.

Paths in the file are relative to the current directory (as for every other command), so
``step run configs/demo.yaml`` works from the repository root, and ``step submit`` ships
the repository as the job's working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from pipelines.analyze.settings import SweepSettings
from pipelines.common.groups import Groups
from pipelines.common.holdout import Holdout, fill_group_by
from pipelines.common.settings import (
    ConfigError,
    MlflowSection,
    PatchMultiple,
    RunName,
    StrictModel,
    load_config,
)
from pipelines.tune.search import TuneSettings

if TYPE_CHECKING:
    from pipelines.train.config import TrainConfig


class TileSection(StrictModel):
    """Cut large source images into tiles before sharding (demo-sized data from the real
    1024 x 1024 LoveDA fixtures). Tiles never overlap, so no validation pixel is seen in
    training. ``checkerboard`` sends alternate tiles of every image to val (train and val
    share the scenes' class mix); ``images`` sends the last ``val_images`` whole images
    (a scene shift: with three fixtures, the held-out scene is 87 % forest, a class the
    other two barely contain)."""

    size: PatchMultiple = Field(256, ge=32, description="tile side in pixels (multiple of 16)")
    val: Literal["checkerboard", "images"] = "checkerboard"
    val_images: int = Field(1, ge=1, description="with val=images: source images for val")

class DataSection(StrictModel):
    dataset: Literal["ade20k", "cityscapes", "coco_stuff", "loveda", "folder"] = "loveda"
    src: str = Field(description="the raw dataset (local path or s3://)")
    layout: str | None = Field(None, description="--layout YAML for dataset 'folder'")
    train_split: str = "train"
    val_split: str = "val"
    max_side: int | None = Field(None, ge=16)
    samples_per_shard: int | None = Field(None, ge=1)
    shard_size: str | None = Field(None, description="e.g. 512MB (default when no count)")
    tile: TileSection | None = None
    groups: Groups | None = Field(None, description="how sample keys fall into groups "
                                  "(recordings, cities): {pattern: REGEX} or {column: NAME}; "
                                  "evaluate, every trial and the report show figures per "
                                  "group")
    holdout: Holdout | None = Field(None, description="images the search never sees, whose "
                                    "drop evaluate and report show: {fraction: 0.3} of "
                                    "val by key hash, {split: test}, and/or whole {groups: "
                                    "[...]} (from_training: true keeps them from training)")
    manifest: str | None = Field(None, description="the files src must hold (a `step prep "
                                 "--verify` manifest: names, sizes, sha256), checked before "
                                 "any step runs: a missing or different file stops the run "
                                 "(exit 2)")

    @model_validator(mode="after")
    def _manifest_exists(self) -> DataSection:
        from data_prep.storage import is_s3

        if self.manifest and not is_s3(self.manifest) and not Path(self.manifest).is_file():
            raise ValueError(f"manifest: file not found: {self.manifest}")
        return self

    @model_validator(mode="after")
    def _holdout_groups_defined(self) -> DataSection:
        fill_group_by(self.holdout, self.groups, "data.groups")
        return self

    @model_validator(mode="after")
    def _holdout_split_apart(self) -> DataSection:
        h = self.holdout
        if h is not None and h.split in (self.train_split, self.val_split):
            raise ValueError(f"holdout.split {h.split!r} must differ from train_split and "
                             "val_split (the search reads val, training reads train)")
        if h is not None and h.split is not None and self.tile is not None:
            raise ValueError("holdout.split: tiling writes only train and val; hold out "
                             "a fraction of val instead (holdout: {fraction: 0.3})")
        return self


class TrainStepSection(StrictModel):
    config: str = Field(description="a `step train` config YAML")
    set: list[str] = Field(default_factory=list, description="overrides, as --set key=value")
    enabled: bool = True


# the STEP recipe minus everything STEP adds: no sharing, no exits, no sharing mix, no
# fine-tuning with halting (overrides applied after step.set)
BASELINE_RECIPE = ("inference.policy_mode=none", "model.exits.blocks=[]",
                   "sharing_mix.thresholds=[]", "finetune.steps=0", "finetune.exit_mix=[]")


class BaselineSection(StrictModel):
    """A plain ViT trained on its own: the STEP training's recipe (``step.config`` with
    ``step.set``) without sharing (policy mode ``none``), without exits, without the
    sharing mix and without a fine-tuning phase; the same data, steps, optimiser and seed.
    The STEP network run unshared is not that model: it was trained sharing tokens in most
    steps, with exit losses. The STEP papers compare against a segmenter trained on its
    own, so evaluate and the report give the drop against both."""

    enabled: bool = True
    checkpoint: str | None = Field(None, description="a trained plain ViT checkpoint to "
                                   "take instead of training one (local or s3://)")
    set: list[str] = Field(default_factory=list, description="more overrides on the derived "
                           "recipe, as --set key=value")


class EvaluateSection(StrictModel):
    max_samples: int | None = Field(None, ge=1, description="val images (default: all)")
    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)


class ReportSection(StrictModel):
    num_images: int = Field(3, ge=0, description="validation images with token maps")
    note: str | None = Field(None, description="a paragraph put first in the summary, e.g. how "
                             "far a demo run is from a real one")


class AnalyzeSection(SweepSettings):
    """The last step: ``step analyze`` on the trained checkpoint at the tuned thresholds,
    on the validation split (a Ray task, like ``evaluate``)."""

    enabled: bool = True
    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)


class RaySection(StrictModel):
    address: str | None = Field(None, description="None = $RAY_ADDRESS (set inside a Ray "
                                "job) or a local Ray")


class PipelineTune(TuneSettings):
    """``TuneSettings`` whose checkpoint and data come from the steps before it."""

    checkpoint: None = None
    data: None = None
    holdout: None = None  # from data.holdout
    groups: None = None  # from data.groups


class PipelineConfig(StrictModel):
    name: RunName = "step-pipeline"
    storage: str = Field("runs/pipelines", description="root for shards, checkpoints and "
                         "pipeline state (local or s3://); this pipeline uses <storage>/<name>")
    mlflow: MlflowSection = MlflowSection()
    ray: RaySection = RaySection()
    data: DataSection
    policy: TrainStepSection | None = None
    step: TrainStepSection
    baseline: BaselineSection | None = Field(None, description="a plain ViT trained on its "
                                             "own with the STEP recipe (or taken)")
    tune: PipelineTune = PipelineTune()
    evaluate: EvaluateSection = EvaluateSection()
    report: ReportSection = ReportSection()
    analyze: AnalyzeSection = AnalyzeSection()

    @model_validator(mode="after")
    def _configs_exist(self) -> PipelineConfig:
        for section in ("policy", "step"):
            step = getattr(self, section)
            if step is not None and step.enabled and not Path(step.config).is_file():
                raise ValueError(f"{section}.config: file not found: {step.config}")
        return self

    @property
    def root(self) -> str:
        from pipelines.common.storage import join

        return join(self.storage, self.name)

    @property
    def runs_policy(self) -> bool:
        return self.policy is not None and self.policy.enabled

    @property
    def has_baseline(self) -> bool:
        return self.baseline is not None and self.baseline.enabled

    @property
    def trains_baseline(self) -> bool:
        return self.has_baseline and self.baseline.checkpoint is None  # type: ignore[union-attr]


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load + validate the pipeline config and the training configs it points at."""
    cfg = load_config(PipelineConfig, path, overrides)
    from pipelines.train.config import load_train_config, policy_mismatch
    from pipelines.tune.space import load_space

    loaded = {}
    for stage in ("policy", "step"):
        section = getattr(cfg, stage)
        if section is None or not section.enabled:
            continue
        try:
            loaded[stage] = load_train_config(section.config, section.set, stage=stage) \
                if stage == "policy" else _validate_step_config(section)
        except ConfigError as err:
            raise ConfigError(f"{path}: {stage}.config {section.config}:\n{err}") from None
    if cfg.trains_baseline:
        try:
            baseline_train_config(cfg)
        except ConfigError as err:
            raise ConfigError(f"{path}: baseline (step.config {cfg.step.config} without "
                              f"sharing and exits):\n{err}") from None
    if "policy" in loaded and "step" in loaded:
        # found here, not when stage 2 loads the weights after stage 1 has trained
        differ = policy_mismatch(loaded["step"].model, loaded["policy"].model)
        if differ:
            raise ConfigError(f"{path}: step.config {cfg.step.config} builds another policy "
                              "network than policy.config trains; " + "; ".join(differ))
    try:
        load_space(cfg.tune.space)
    except ConfigError as err:
        raise ConfigError(f"{path}: tune.space:\n{err}") from None
    return cfg


def baseline_train_config(cfg: PipelineConfig) -> TrainConfig:
    """The plain ViT's training config: step.config + step.set + :data:`BASELINE_RECIPE`
    + baseline.set (see :class:`BaselineSection`)."""
    from pipelines.train.config import load_train_config

    extra = cfg.baseline.set if cfg.baseline is not None else []
    return load_train_config(cfg.step.config, [*cfg.step.set, *BASELINE_RECIPE, *extra],
                             stage="step")


def _validate_step_config(section: TrainStepSection) -> TrainConfig:
    """Stage-2 configs in threshold/budget mode need a policy checkpoint, which the
    workflow supplies; validate with a placeholder so the rest is still checked."""
    from pipelines.train.config import load_train_config

    return load_train_config(section.config,
                             [*section.set, "policy_checkpoint=<from-policy-step>"], stage="step")
