"""The settings of ``step predict``: one typed model (YAML, ``--set`` and flags all fill it).

``inference`` (``step_model.config.InferenceOverrides``) is applied on top of the registered
model's inference settings (or of the checkpoint's own): what is set here wins.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines.common.precision import Precision
from pipelines.common.settings import StrictModel
from step_model.config import InferenceOverrides

Palette = Literal["auto", "fixed", "loveda", "cityscapes", "ade20k", "coco_stuff"]


class ForwardSettings(StrictModel):
    """How a trained model's forward runs when serving (``step predict``, the benchmark)."""

    precision: Precision = Field("auto", description="auto: bf16 autocast on CUDA, fp32 "
                                 "on the CPU")
    fold_batchnorm: bool = Field(True, description="fold the policy network's batch norms "
                                 "into its convolutions (eval-only; same masks within "
                                 "float rounding)")
    compile_policy: bool = Field(False, description="torch.compile the policy network "
                                 "(its first forward per image size compiles: tens of "
                                 "seconds on a CPU; then 2x faster there, docs/speed.md)")
    channels_last: bool = Field(False, description="run the policy network channels-last "
                                "(measured no faster on a CPU: docs/model.md)")
    io_threads: int = Field(2, ge=0, description="threads that decode the next batch and "
                            "write the files while the forward runs (0: one after the "
                            "other; the Ray path decodes in line)")

    def rewrites(self) -> dict[str, bool]:
        """The keywords of :func:`step_model.fuse.prepare_for_inference`: every command that
        serves or times a model applies the same rewrites from the same fields."""
        return {"fold_batchnorm": self.fold_batchnorm, "channels_last": self.channels_last,
                "compile_policy": self.compile_policy}


class PredictSettings(ForwardSettings):
    """Everything ``step predict`` needs."""

    model: str = Field(description="models:/NAME/VERSION (or models:/NAME@ALIAS, "
                       "models:/NAME/latest), a checkpoint directory or a Ray run directory "
                       "(its latest checkpoint), local or s3://",
                       json_schema_extra={"metavar": "URI"})
    images: str = Field(description="a folder of images (searched recursively) or one image "
                        "file, local or s3://", json_schema_extra={"metavar": "DIR"})
    out: str = Field(description="output folder, local or s3:// (with a multi-machine Ray "
                     "cluster: s3:// or a shared file system)",
                     json_schema_extra={"metavar": "DIR"})
    thresholds_from_registry: bool = Field(
        True, description="apply the thresholds registered with a models:/ version")
    inference: InferenceOverrides = Field(
        InferenceOverrides(), description="changes to the inference settings, applied last "
        "(over the registered ones, or the checkpoint's own)")
    token_maps: bool = Field(False, description="also write the superpatch level and the exit "
                             "depth of every 16x16 cell (PNGs) and a small visual per image")
    batch_size: int = Field(1, ge=1, description="images per forward; images of different "
                            "sizes go through separate forwards")
    device: str = Field("cpu", description="cpu, cuda, cuda:1 ...")
    ray: bool | None = Field(None, description="run as Ray Data map_batches (default: when "
                             "RAY_ADDRESS names a cluster)")
    workers: int | None = Field(None, ge=1, description="Ray actors that hold a model "
                                "(default: one per GPU with --device cuda, else one per 2 "
                                "cluster CPUs, at most one per batch)")
    flops: bool = Field(False, description="count the GFLOPs of every forward (exact, but "
                        "the counter's per-operator overhead slows the forward down, "
                        "a tuned model's most: forward_ms and images/s are then not "
                        "the model's)")

    palette: Palette = Field(
        "auto", description="colours of the colour masks: auto = the training dataset's "
        "when recorded, else the fixed palette")
    strict: bool = Field(False, description="stop at the first bad image instead of "
                         "skipping it")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI for models:/ "
                                     "(None: $MLFLOW_TRACKING_URI, else ./runs/mlflow.db)")
