"""``step tune``: search inference thresholds under an mIoU-drop limit (Ray Tune).

Settings: :class:`pipelines.tune.search.TuneSettings` (the ``tune`` section of a pipeline
config too), from ``--config``, ``--set`` and one flag per field (``--checkpoint``,
``--data``, ``--space``, ``--max-drop``, ...). ``--checkpoint`` takes a checkpoint or a Ray
run directory (its latest checkpoint), as ``step eval`` does. The inference flags of every
command (``--thresholds``, ``--top-k``, ``--upsample`` ...) change the checkpoint's settings
that the reference and every trial start from; the space's dimensions override them.
"""

from __future__ import annotations

import json

from pipelines.cli.command import (
    INFERENCE_ALIASES,
    Alias,
    Command,
    Invocation,
    Result,
)
from pipelines.common.settings import ConfigError
from pipelines.tune.search import TuneSettings

ALIASES = (
    *INFERENCE_ALIASES,  # the settings the search starts from
    Alias(("--cpus-per-trial",), "resources_per_trial.cpu"),
    Alias(("--gpus-per-trial",), "resources_per_trial.gpu"),
)


def tune(inv: Invocation) -> Result:
    from pipelines.common.checkpoint import resolve_checkpoint_dir
    from pipelines.tracking.runs import resolve_tracking_uri
    from pipelines.tune.search import search

    settings: TuneSettings = inv.settings
    missing = [k for k in ("checkpoint", "data") if not getattr(settings, k)]
    if missing:
        raise ConfigError("invalid settings:\n" + "\n".join(
            f"  {k}: required ({TuneSettings.model_fields[k].description})" for k in missing))
    try:
        checkpoint = resolve_checkpoint_dir(settings.checkpoint)
    except FileNotFoundError as err:
        raise ConfigError(f"invalid settings:\n  checkpoint: {err}") from None
    settings = settings.model_copy(update={
        "checkpoint": checkpoint, "tracking_uri": resolve_tracking_uri(settings.tracking_uri)})
    # owns its MLflow run: FINISHED, or FAILED on any error (TrialsFailed: one line, exit 1)
    outcome = search(settings)
    doc = outcome.to_json()
    _print_summary(doc)
    return Result(doc)


def _print_summary(doc: dict) -> None:
    b, best = doc["baseline"], doc["best"]
    if doc.get("uses_labels"):
        from pipelines.common.oracle import ORACLE_NOTE

        print(f"{ORACLE_NOTE}: the trials' figures are not a model's result")
    print(f"reference (unpruned): mIoU {100 * b['miou']:.2f}  GFLOPs {b['gflops']:.3f}")
    print(doc["message"])
    if best is not None:
        print(f"best thresholds: {json.dumps(best['inference'])}")
    if doc.get("registered_model"):
        r = doc["registered_model"]
        print(f"registered model: {r['name']} version {r['version']}")
    from pipelines.tracking.links import run_location

    print(f"{doc['n_trials']} trials ({doc['failed_trials']} failed), "
          f"{len(doc['pareto'])} on the Pareto front; MLflow run {doc['parent_run_id']}: "
          f"{run_location(doc['tracking_uri'], doc['parent_run_id'])}")


COMMAND = Command(TuneSettings, tune, aliases=ALIASES,
                  config_help="tune settings (YAML: the fields of TuneSettings)")
configure = COMMAND.configure
run = COMMAND.run
