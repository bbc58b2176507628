"""The settings of ``step analyze`` and of the pipeline's ``analyze`` section (one sweep)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from pipelines.common.groups import Groups
from pipelines.common.settings import StrictModel
from pipelines.evaluate.settings import EvalMlflow
from step_model.config import InferenceOverrides

DEFAULT_PURITIES = [1.0, 0.98, 0.95, 0.9]
# dense where the learned curve crosses the oracle's purity-0.95 ceiling: policy_vs_oracle
# takes the best setting at that ceiling, so a coarse grid understates the policy
DEFAULT_THRESHOLDS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
DEFAULT_BUDGETS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
DEFAULT_SEEDS = [0, 1, 2]


class SweepSettings(StrictModel):
    """What the analysis measures (shared by the command and the pipeline step)."""

    max_samples: int | None = Field(None, ge=1, description="validation images (default: all)")
    purities: list[float] = Field(DEFAULT_PURITIES, description="oracle layouts: "
                                     "label purity a shared window needs (0.95 is the "
                                     "reference of policy_vs_oracle)")
    layout_thresholds: list[float] = Field(
        DEFAULT_THRESHOLDS,
        description="learned-policy layouts: one merge threshold shared by every level")
    budgets: list[float] = Field(DEFAULT_BUDGETS, description="learned-"
                                    "policy layouts: fraction of the grid's tokens kept")
    seeds: list[int] = Field(DEFAULT_SEEDS, description="seeds of the random-exit ablation")
    ablation_thresholds: list[float] = Field(
        [], description="exit thresholds at which the exit ablation is repeated (at the "
        "operating point's sharing): the ablation as a curve, from few halted tokens to many")
    batch_size: int = Field(1, ge=1, description="images per forward")

    # plain float lists (not constrained items) so that each gets a flag: --budgets 0.4 0.6
    @field_validator("purities", "budgets")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        bad = [x for x in v if not 0.0 < x <= 1.0]
        if bad:
            raise ValueError(f"values must be in (0, 1], got {bad}")
        return v

    @field_validator("layout_thresholds", "ablation_thresholds")
    @classmethod
    def _probabilities(cls, v: list[float]) -> list[float]:
        bad = [x for x in v if not 0.0 <= x <= 1.0]
        if bad:
            raise ValueError(f"values must be in [0, 1], got {bad}")
        return v


class AnalyzeSettings(SweepSettings):
    """Everything ``step analyze`` needs."""

    checkpoint: str = Field(description="STEP checkpoint directory (local or s3://), or a "
                            "Ray run directory (its latest checkpoint)")
    data: str = Field(description="validation shards written by `step prep`")
    inference: InferenceOverrides = Field(
        InferenceOverrides(), description="the operating point (default: the checkpoint's "
        "own settings); its sharing is the learned policy")
    layouts_only: bool = Field(False, description="only the layout curve and "
                               "policy_vs_oracle: the policy network alone runs, so a "
                               "stage-1 (policy) checkpoint is enough")
    predicted_layouts: str | None = Field(
        None, description="a segmenter checkpoint (local, s3:// or a Ray run directory; "
        "'self': the analysed one) whose unpruned forward runs on every image: the oracle's "
        "layouts chosen from its predicted masks instead of the labels ('predicted' rows, "
        "predicted_vs_oracle): what a policy that knew the classes as well as that "
        "segmenter would merge")
    halting_only: bool = Field(False, description="only the halting protocol (plain / "
                               "merging only / tuned, halted and active pixels, calibration "
                               "of the exits), on data and holdout_data")
    groups: Groups | None = Field(None, description="how sample keys fall into groups "
                                  "(recordings, cities): {pattern: REGEX} or {column: NAME}; "
                                  "the halting protocol's figures per group (default: one "
                                  "group per shard set, 'data' and 'holdout')")
    holdout_data: list[str] = Field(
        [], description="more shard directories the halting protocol measures, e.g. the "
        "training split that holds a held-out group's images (with holdout_groups: only "
        "those groups' images of them)")
    holdout_groups: list[str] = Field(
        [], description="names of groups (groups) whose images of holdout_data are measured, e.g. "
        "a recording kept from training (data.holdout.groups); empty: every image")
    calibration_bins: int = Field(15, ge=1, description="equal-width confidence "
                                  "bins of the exits' reliability tables")
    device: str = Field("cpu", description="cpu, cuda, cuda:1 ...")
    mlflow: EvalMlflow = EvalMlflow()

    @model_validator(mode="after")
    def _consistent(self) -> AnalyzeSettings:
        if self.layouts_only and self.halting_only:
            raise ValueError("layouts_only and halting_only: give at most one")
        if self.predicted_layouts and self.halting_only:
            raise ValueError("predicted_layouts: the layout curve's, which halting_only "
                             "does not run")
        if self.holdout_groups and self.groups is None:
            raise ValueError("holdout_groups: needs groups (how sample keys fall into "
                             "groups, e.g. {pattern: '^([^_]+)_'})")
        if self.holdout_groups and not self.holdout_data:
            raise ValueError("holdout_groups: needs holdout_data (the shard directories "
                             "that hold those groups' images)")
        return self
