"""``step prep``: shard a segmentation dataset into WebDataset tars with Ray Data.

Settings: :class:`PrepSettings` (``--config``, ``--set``, one flag per field:
``--dataset``, ``--src``, ``--out``, ``--split``, ``--samples-per-shard`` or
``--shard-size``, ``--max-side``, ``--strict``, ``--layout``, ``--no-progress``). The
work is :func:`data_prep.prepare`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from pipelines.cli.command import Command, CommandError, Invocation, Result
from pipelines.common.settings import StrictModel

Dataset = Literal["ade20k", "cityscapes", "coco_stuff", "loveda", "folder"]  # data_prep.READERS


class PrepSettings(StrictModel):
    """The arguments of :func:`data_prep.prepare`."""

    dataset: Dataset = Field(description="the source's layout")
    src: str = Field(description="dataset root: local path or s3://bucket/prefix")
    out: str = Field(description="shard directory: local path or s3://bucket/prefix")
    split: str = Field("train", description="split to shard")
    samples_per_shard: int | None = Field(None, ge=1, description="samples per shard "
                                          "(instead of shard_size)")
    shard_size: str | None = Field(None, description="target shard size in source bytes, "
                                   "e.g. 512MB (the default when samples_per_shard is unset)")
    max_side: int | None = Field(None, ge=1, description="downscale images whose long side "
                                 "exceeds this (labels: nearest)")
    strict: bool = Field(False, description="fail on the first bad pair instead of skipping "
                         "it and listing it in OUT/skipped.parquet")
    layout: str | None = Field(None, description="layout description (YAML) for dataset "
                               "'folder'")
    progress: bool = Field(True, description="show Ray Data's progress bar")

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: str | None, info: ValidationInfo) -> str | None:
        from data_prep.shards import parse_size

        if v is None:
            return v
        if info.data.get("samples_per_shard") is not None:
            raise ValueError("give samples_per_shard or shard_size, not both")
        parse_size(v)  # raises, naming the accepted form
        return v


def prep(inv: Invocation) -> Result:
    from data_prep.prep import PrepError, prepare
    from data_prep.readers import DatasetError

    s: PrepSettings = inv.settings
    try:
        report = prepare(
            s.dataset, s.src, s.out, s.split,
            samples_per_shard=s.samples_per_shard, shard_size=s.shard_size,
            max_side=s.max_side, strict=s.strict, layout=s.layout, progress=s.progress,
        )
    except (DatasetError, PrepError) as err:  # the input is wrong: exit 2, as always
        raise CommandError(str(err), 2) from None
    skipped = str(report.skipped_total)
    if report.skipped_total:
        reasons = ", ".join(f"{k}={v}" for k, v in report.skipped.items())
        skipped += f" ({reasons}; see {report.skipped_file})"
    print(
        f"step prep: {report.dataset}/{report.split}: read {report.read}, written {report.written}, "
        f"skipped {skipped}; {len(report.shards)} shards ({report.shards_written} written, "
        f"{report.shards_reused} verified and kept) in {report.out} ({report.seconds:.1f} s)"
    )
    for reason, example in report.examples.items():
        print(f"  e.g. {reason}: {example}")
    return Result(report.to_dict())


COMMAND = Command(PrepSettings, prep, config_help="prep settings (YAML)",
                  json="write the report as JSON (a local path or s3://bucket/key)")
configure = COMMAND.configure
run = COMMAND.run
