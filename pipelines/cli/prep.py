"""``step prep``: shard a segmentation dataset into WebDataset tars with Ray Data.

Settings: :class:`PrepSettings` (``--config``, ``--set``, one flag per field:
``--dataset``, ``--src``, ``--out``, ``--split``, ``--samples-per-shard`` or
``--shard-size``, ``--max-side``, ``--strict``, ``--layout``, ``--no-progress``,
``--verify``, ``--write-manifest``). The work is :func:`data_prep.prepare`; the source
check against a manifest is :mod:`data_prep.verify` (``--verify FILE`` without ``--out``
only checks; ``--write-manifest FILE`` only writes one).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipelines.cli.command import Command, Invocation, Result
from pipelines.common.errors import ExpectedFailure
from pipelines.common.settings import StrictModel

Dataset = Literal["ade20k", "cityscapes", "coco_stuff", "loveda", "folder"]  # data_prep.READERS


class PrepSettings(StrictModel):
    """The arguments of :func:`data_prep.prepare`."""

    dataset: Dataset | None = Field(None, description="the source's layout (required with "
                                    "out)")
    src: str = Field(description="dataset root: local path or s3://bucket/prefix")
    out: str | None = Field(None, description="shard directory: local path or "
                            "s3://bucket/prefix (without it: only --verify or "
                            "--write-manifest)")
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
    verify: str | None = Field(None, description="a manifest (JSON: names, sizes, sha256) "
                               "that src must match before anything is read; a missing or "
                               "different file stops with exit 2")
    write_manifest: str | None = Field(None, description="write the manifest of every file "
                                       "under src to this path, and stop")

    @model_validator(mode="after")
    def _what_to_do(self) -> PrepSettings:
        if self.out is not None and self.dataset is None:
            raise ValueError("dataset: required to shard (one of "
                             + ", ".join(repr(d) for d in Dataset.__args__) + ")")
        if self.out is None and self.verify is None and self.write_manifest is None:
            raise ValueError("out: required (or --verify MANIFEST alone, to check src)")
        if self.write_manifest is not None and (self.out or self.verify):
            raise ValueError("write_manifest: give it alone (not with out or verify)")
        return self

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
    if s.write_manifest is not None:
        return _write_manifest(s)
    if s.verify is not None:
        checked = _verify(s)
        if s.out is None:
            return Result(checked)
    try:
        report = prepare(
            s.dataset, s.src, s.out, s.split,
            samples_per_shard=s.samples_per_shard, shard_size=s.shard_size,
            max_side=s.max_side, strict=s.strict, layout=s.layout, progress=s.progress,
        )
    except (DatasetError, PrepError) as err:  # the input is wrong: exit 2, as always
        raise ExpectedFailure(str(err), 2) from None
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


def _verify(s: PrepSettings) -> dict:
    from dataclasses import asdict

    from data_prep.readers import DatasetError
    from data_prep.verify import check_source

    try:
        checked = check_source(s.src, s.verify)
    except DatasetError as err:  # the data is not what the manifest says: exit 2
        raise ExpectedFailure(str(err), 2) from None
    print(f"step prep: {checked.message()}", flush=True)
    return asdict(checked)


def _write_manifest(s: PrepSettings) -> Result:
    from data_prep.readers import DatasetError
    from data_prep.verify import build_manifest, write_manifest

    try:
        doc = build_manifest(s.src, name=s.dataset or "dataset",
                             source=f"the files of {s.src} (name them here)")
    except DatasetError as err:
        raise ExpectedFailure(str(err), 2) from None
    write_manifest(s.write_manifest, doc)
    print(f"step prep: wrote the manifest of {len(doc['files'])} files under {s.src} to "
          f"{s.write_manifest} (edit its name and source: they are shown when a copy "
          "does not match)")
    return Result(None)


COMMAND = Command(PrepSettings, prep, config_help="prep settings (YAML)",
                  json="write the report as JSON (a local path or s3://bucket/key)")
configure = COMMAND.configure
run = COMMAND.run
