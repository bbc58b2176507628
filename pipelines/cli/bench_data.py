"""``step bench data``: shard writing and loader throughput, local and optionally S3 (JSON).

Settings: :class:`BenchDataSettings`; the measurement: :func:`data_prep.bench.measure`.
"""

from __future__ import annotations

import argparse
import json

from pydantic import Field

from pipelines.cli.command import Command, Invocation, Result
from pipelines.common.errors import ExpectedFailure
from pipelines.common.settings import StrictModel


class BenchDataSettings(StrictModel):
    images: str | None = Field(None, description="flat dataset with img_dir/ and ann_dir/ "
                               "(e.g. demo_data/loveda)")
    samples: int = Field(64, ge=64, description="replicate to this many pairs")
    samples_per_shard: int = Field(8, ge=1)
    batch_size: int = Field(4, ge=1)
    num_workers: int = Field(0, ge=0, description="dataloader workers for the loader figures "
                             "(0: main process, as decode)")
    train_workers: int = Field(2, ge=1)
    crop: int = Field(512, ge=16)
    repeats: int = Field(3, ge=1)
    workdir: str | None = Field(None, description="keep the replicated data and shards here")
    s3: str | None = Field(None, description="also load from S3: upload the shards under this "
                           "empty s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL), then "
                           "delete them")
    s3_moto: bool = Field(False, description="also load from S3 served by an in-process moto "
                          "server on 127.0.0.1 (needs moto, a test extra)")


def bench_data(inv: Invocation) -> Result:
    from data_prep import bench

    s: BenchDataSettings = inv.settings
    if not s.images:
        raise ExpectedFailure("images: required (a flat dataset with img_dir/ and ann_dir/)", 2)
    if s.s3 and s.s3_moto:
        raise ExpectedFailure("s3 and s3_moto: choose one", 2)
    try:
        result = bench.measure(argparse.Namespace(**s.model_dump(), json=None))
    except bench.BenchInputError as err:
        raise ExpectedFailure(str(err), 2) from None
    print(json.dumps(result, indent=1))
    return Result(result)


COMMAND = Command(BenchDataSettings, bench_data, config_help="bench settings (YAML)",
                  json="write the results as JSON (a local path or s3://bucket/key)")
configure = COMMAND.configure
run = COMMAND.run
