"""``step bench model``: the plain ViT against STEP, same weights, one run (JSON).

The default path is the learned policy (``threshold``: the policy network runs and is
counted); ``flop_reduction`` always includes the policy network. ``--policy oracle`` (tokens
from the labels) is an upper bound: its JSON and output say ``uses_labels`` / ``upper_bound``.

Settings: :class:`step_model.bench.BenchModelSettings` (the measurement,
:func:`step_model.bench.measure`, takes it); the STEP model's inference settings have the
flags of every command (``--policy-mode``, also ``--policy``; ``--merge-thresholds 0.8`` or
``2=0.8,4=0.7,8=0.6,16=0.5``; ``--thresholds 0.9`` or ``0.9,0.8``; ...).

With ``--model models:/NAME/VERSION`` or ``--checkpoint CKPT`` it benchmarks that trained
model instead, plain against tuned (:mod:`pipelines.bench.trained`).
"""

from __future__ import annotations

import json

from pipelines.bench.trained import TrainedBenchSettings
from pipelines.cli.command import INFERENCE_ALIASES, Alias, Command, Invocation, Result

ALIASES = (*INFERENCE_ALIASES, Alias(("--policy",), "inference.policy_mode"))


def bench_model(inv: Invocation) -> Result:
    from step_model import bench

    s: TrainedBenchSettings = inv.settings
    if s.trained:
        from pipelines.bench.trained import measure_trained, summary_lines

        result = measure_trained(s)
        print("\n".join(summary_lines(result)))
        return Result(result)
    result = bench.measure(s, prepare=s.rewrites())
    if result["uses_labels"]:
        print("step bench model: policy oracle: tokens chosen from the labels; an upper "
              "bound, not a model's result (flop_reduction counts the policy network)")
    print(json.dumps({k: result[k] for k in bench.SUMMARY_KEYS}, indent=2))
    return Result(result)


COMMAND = Command(TrainedBenchSettings, bench_model, aliases=ALIASES,
                  config_help="bench settings (YAML)",
                  json="write the results as JSON (a local path or s3://bucket/key)")
configure = COMMAND.configure
run = COMMAND.run
