"""The settings of ``step eval``: one typed model (YAML, ``--set`` and flags all fill it).

``inference`` (``step_model.config.InferenceOverrides``) changes the fixed checkpoint's own
inference settings, as a Ray Tune trial does; unset fields keep the checkpoint's.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from pipelines.common.groups import Groups
from pipelines.common.settings import MlflowSection, StrictModel
from step_model.config import InferenceOverrides


class EvalMlflow(MlflowSection):
    parent_run_id: str | None = Field(None, description="nest the evaluation's MLflow run "
                                      "under this run")
    enabled: bool = Field(True, description="log the evaluation as an MLflow run")


class EvalSettings(StrictModel):
    """Everything ``step eval`` needs."""

    checkpoint: str = Field(description="checkpoint directory (local or s3://), or a Ray "
                            "run directory (its latest checkpoint)")
    data: str = Field(description="shard directory written by `step prep` (local or s3://)")
    inference: InferenceOverrides = Field(
        InferenceOverrides(), description="changes to the checkpoint's inference settings")
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
    bootstrap_block: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1, description="the drop's interval resamples runs of this many consecutive images "
        "(key order; frames of a recording are not independent); auto = round(n ** (1/3))")
    mlflow: EvalMlflow = EvalMlflow()
