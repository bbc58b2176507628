"""``step predict --model models:/NAME/VERSION|CHECKPOINT --images DIR|s3://... --out DIR``.

Applies a trained or registered STEP model to a folder of images: a class-id PNG and a
colour PNG per image, with ``--token-maps`` the superpatch level and exit depth per cell,
and ``<out>/summary.json`` (GFLOPs and tokens per image, halted fraction, throughput,
skipped images). A registered version's thresholds are applied unless
``--no-thresholds-from-registry``; ``--thresholds`` / ``--merge-thresholds`` / ... win over
them. Runs as Ray Data ``map_batches`` when ``RAY_ADDRESS`` names a cluster (or
``--ray``), else locally. Settings: :class:`pipelines.predict.settings.PredictSettings`.
"""

from __future__ import annotations

from pipelines.cli.command import INFERENCE_ALIASES, Command, Invocation, Result
from pipelines.predict.settings import PredictSettings

ALIASES = INFERENCE_ALIASES


def predict(inv: Invocation) -> Result:
    from pipelines.predict.runner import predict as run_predict

    s: PredictSettings = inv.settings
    doc = run_predict(s)
    gflops = doc["gflops_mean"]
    rate = doc["throughput_images_per_s"]
    where = f"Ray ({_n(doc['workers'], 'actor')} on {_n(len(doc['nodes']), 'node')})" \
        if doc["executor"] == "ray" else s.device
    print(f"step predict: {doc['images']} images -> {s.out} on {where}, "
          f"{doc['skipped']} skipped, GFLOPs {'n/a' if gflops is None else f'{gflops:.4g}'}, "
          f"tokens {_f(doc['tokens_mean'])}/{_f(doc['tokens_in_mean'])}, "
          f"halted {_f(doc['halted_fraction'])}, {_f(rate)} images/s")
    for bad in doc["skipped_images"][:10]:
        print(f"step predict: skipped {bad['image']}: {bad['reason']}"
              + (f" ({bad['detail']})" if bad["detail"] else ""))
    return Result(doc)


def _n(count: int, what: str) -> str:
    return f"{count} {what}" + ("" if count == 1 else "s")


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


COMMAND = Command(PredictSettings, predict, aliases=ALIASES,
                  config_help="predict settings (YAML: model, images, out, inference, ...)",
                  json="also write the summary here (it is always in <out>/summary.json)")
configure = COMMAND.configure
run = COMMAND.run
