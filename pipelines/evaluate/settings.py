"""The settings of ``step eval``: one typed model (YAML, ``--set`` and flags all fill it).

``inference`` holds the ``StepSegmenter.set_inference`` keyword arguments applied to the
fixed checkpoint (as a Ray Tune trial does); unset fields keep the checkpoint's own.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pipelines.common.groups import Groups
from pipelines.common.settings import (
    EXIT_THRESHOLDS_SYNTAX,
    MERGE_THRESHOLDS_SYNTAX,
    ExitThresholds,
    MergeThresholds,
    MlflowSection,
    StrictModel,
)


class InferenceSettings(StrictModel):
    """``model.set_inference`` kwargs; None = the checkpoint's own setting."""

    exit_thresholds: ExitThresholds = Field(
        None, description=f"exit confidence thresholds: {EXIT_THRESHOLDS_SYNTAX}")
    merge_thresholds: MergeThresholds = Field(
        None, description=f"policy merge thresholds (policy mode 'threshold'): "
        f"{MERGE_THRESHOLDS_SYNTAX}")
    budget: float | None = Field(None, gt=0, le=1, description="fixed token budget, a "
                                 "fraction of the grid's tokens (policy mode 'budget')")
    top_k: int | None = Field(None, ge=0, description="tokens kept active per class at "
                              "each exit")
    exit_policy: Literal["confidence", "random", "uniform"] | None = Field(
        None, description="which tokens halt at an exit")
    policy_mode: Literal["none", "oracle", "threshold", "budget"] | None = Field(
        None, description="token sharing policy")
    halting: bool | None = Field(None, description="false: the exits predict but never halt")
    upsample: Literal["probs", "logits"] | None = Field(
        None, description="upsample class probabilities (consistent across halted and "
        "active cells) or raw logits (the older path, for comparison)")
    exit_seed: int | None = Field(None, description="seed of the `random` exit policy")

    def kwargs(self) -> dict[str, Any]:
        """What was set, as ``set_inference`` keyword arguments."""
        return self.model_dump(exclude_none=True)


class EvalMlflow(MlflowSection):
    parent_run_id: str | None = Field(None, description="nest the evaluation's MLflow run "
                                      "under this run")
    enabled: bool = Field(True, description="log the evaluation as an MLflow run")


class EvalSettings(StrictModel):
    """Everything ``step eval`` needs."""

    checkpoint: str = Field(description="checkpoint directory (local or s3://), or a Ray "
                            "run directory (its latest checkpoint)")
    data: str = Field(description="shard directory written by `step prep` (local or s3://)")
    inference: InferenceSettings = InferenceSettings()
    mode: Literal["whole", "slide"] = Field("whole", description="whole images, or sliding "
                                            "windows")
    crop_size: int | None = Field(None, ge=16, description="slide window in pixels")
    stride: int | None = Field(None, ge=1, description="slide stride in pixels")
    max_samples: int | None = Field(None, ge=1, description="evaluate at most this many "
                                    "images (default: all)")
    device: str = Field("cpu", description="cpu, cuda, cuda:1 ...")
    latency_samples: int = Field(3, ge=0, description="batches timed without FLOP counting "
                                 "(0: no latency)")
    allow_oracle: bool = Field(False, description="allow policy mode 'oracle' (tokens chosen "
                               "from the labels: an upper bound, labelled as such)")
    groups: Groups | None = Field(None, description="how sample keys fall into groups "
                                  "(recordings, cities): {pattern: REGEX} or {column: NAME}; "
                                  "mIoU per group")
    reference: bool = Field(False, description="also evaluate the unpruned reference (no "
                            "merging, no halting): the drop overall, on the worst fifth of "
                            "the images and per group, with the worst group")
    mlflow: EvalMlflow = EvalMlflow()
