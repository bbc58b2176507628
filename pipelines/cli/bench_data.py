"""``step bench data``: shard writing and loader throughput, local and optionally S3 (JSON).

Settings: :class:`data_prep.bench.BenchDataSettings`; the measurement:
:func:`data_prep.bench.measure`. Settings that cannot run here (``--s3-moto`` without moto,
a non-empty ``--s3`` prefix) stop before any work, exit 2.
"""

from __future__ import annotations

import json
import sys

from data_prep.bench import BenchDataSettings
from pipelines.cli.command import Command, Invocation, Result
from pipelines.common.errors import ExpectedFailure


def bench_data(inv: Invocation) -> Result:
    from data_prep import bench

    try:
        result = bench.measure(inv.settings)
    except bench.BenchInputError as err:
        raise ExpectedFailure(str(err), 2) from None
    if result["load_s3_images_per_s"] is None:
        print(f"step bench data: S3 {result['s3']}", file=sys.stderr)
    print(json.dumps(result, indent=1))
    return Result(result)


COMMAND = Command(BenchDataSettings, bench_data, config_help="bench settings (YAML)",
                  json="write the results as JSON (a local path or s3://bucket/key)")
configure = COMMAND.configure
run = COMMAND.run
