"""``step bench model``: the plain ViT against STEP, same weights, one run (JSON).

The default path is the learned policy (``threshold``: the policy network runs and is
counted); ``flop_reduction`` always includes the policy network. ``--policy oracle`` (tokens
from the labels) is an upper bound: its JSON and output say ``uses_labels`` / ``upper_bound``.

Settings: :class:`BenchModelSettings`; the measurement: :func:`step_model.bench.measure`
(the model package keeps its own argparse entry, ``python -m``-free, for library users).
Thresholds take the one syntax of every command: ``--merge-thresholds 0.8`` or
``2=0.8,4=0.7,8=0.6,16=0.5``, ``--thresholds 0.9`` or ``0.9,0.8``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipelines.cli.command import Command, Invocation, Result
from pipelines.common.settings import ExitThresholds, MergeThresholds, StrictModel

LEVELS = (2, 4, 8, 16)


class BenchModelSettings(StrictModel):
    backbone: str = Field("vit_base_patch16_384", description="timm ViT with 16x16 patches")
    image_size: int = Field(1024, ge=16, description="square side (resized if the images differ)")
    policy: Literal["none", "oracle", "threshold", "budget"] = Field(
        "threshold", description="token selection: the learned policy (threshold, budget), "
        "or oracle (uses labels: an upper bound, labelled as such)")
    merge_thresholds: MergeThresholds = Field(None, description="policy thresholds per level")
    budget: float | None = Field(None, gt=0, le=1, description="fraction of tokens kept")
    exits: list[int] = Field([], description="exit blocks, 1-based (none: no exits)")
    thresholds: ExitThresholds = Field([0.95], description="exit confidence thresholds")
    top_k: int = Field(5, ge=0, description="most confident tokens kept per class")
    exit_policy: Literal["confidence", "random", "uniform"] = "confidence"
    decoder: Literal["linear", "mask"] = "linear"
    varlen: Literal["auto", "per_image", "pad_mask"] = "auto"
    images: str = Field("demo_data/loveda", description="folder with img_dir/ and ann_dir/")
    num_classes: int = Field(7, ge=1)
    reduce_zero_label: bool = Field(
        True, description="raw 0 = ignore and c -> c-1, as LoveDA (off: labels are train ids)")
    device: Literal["cpu", "cuda"] = "cpu"
    repeats: int = Field(2, ge=1, description="timed passes per image (best one counts)")


def bench_model(inv: Invocation) -> Result:
    from step_model import bench

    s: BenchModelSettings = inv.settings
    merge = None
    if s.merge_thresholds is not None:
        missing = [lv for lv in LEVELS if lv not in s.merge_thresholds]
        if missing:
            raise ValueError(f"merge_thresholds: give all levels {LEVELS} (missing {missing})")
        merge = [s.merge_thresholds[lv] for lv in LEVELS]
    args = argparse.Namespace(**{**s.model_dump(), "merge_thresholds": merge,
                                 "images": Path(s.images), "json": None})
    result = bench.measure(args)
    if result["uses_labels"]:
        print("step bench model: policy oracle: tokens chosen from the labels; an upper "
              "bound, not a model's result (flop_reduction counts the policy network)")
    print(json.dumps({k: result[k] for k in bench.SUMMARY_KEYS}, indent=2))
    return Result(result)


COMMAND = Command(BenchModelSettings, bench_model, config_help="bench settings (YAML)",
                  json="write the results as JSON (a local path or s3://bucket/key)")
configure = COMMAND.configure
run = COMMAND.run
