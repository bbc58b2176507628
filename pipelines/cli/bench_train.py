"""``step bench train --config FILE [--set ...] --json PATH``: training samples/s, plain vs STEP.

Settings: the training config (:class:`pipelines.train.config.TrainConfig`: the models,
crop and batch size, optimizer, precision); the benchmark's own knobs:
:class:`pipelines.bench.train.BenchTrainOptions`. The work: :func:`pipelines.bench.train.bench`.
"""

from __future__ import annotations

from pipelines.bench.train import BenchTrainOptions
from pipelines.cli.command import Command, Invocation, Result
from pipelines.train.config import TrainConfig, load_train_config


def _load(config: str | None, overrides: list[str], path: tuple[str, ...]) -> TrainConfig:
    return load_train_config(config, overrides)


def bench_train(inv: Invocation) -> Result:
    from pipelines.bench.train import bench

    return Result(bench(inv.settings, inv.options, inv.config))


COMMAND = Command(TrainConfig, bench_train, options=BenchTrainOptions, load=_load,
                  exclude={"stage"}, config_required=True,
                  config_help="training config (YAML): model, data.crop_size, "
                  "data.batch_size, optim, train.precision",
                  json="write the results as JSON (a local path or s3://bucket/key)")
configure = COMMAND.configure
run = COMMAND.run
