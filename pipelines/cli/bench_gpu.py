"""``step bench gpu``: the GPU readiness check, one JSON (see :mod:`pipelines.bench.gpu`).

Settings: :class:`pipelines.bench.gpu.BenchGpuSettings`. Exits 1 when a part failed (the
report, written anyway, records its error).
"""

from __future__ import annotations

from pipelines.bench.gpu import BenchGpuSettings
from pipelines.cli.command import Command, Invocation, Result


def bench_gpu(inv: Invocation) -> Result:
    from pipelines.bench.gpu import bench

    report, failed = bench(inv.settings)
    return Result(report, 1 if failed else 0)


COMMAND = Command(BenchGpuSettings, bench_gpu, config_help="bench settings (YAML)",
                  json="write the report as JSON (a local path or s3://bucket/key)",
                  json_default="runs/bench_gpu.json")
configure = COMMAND.configure
run = COMMAND.run
