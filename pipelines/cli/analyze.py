"""``step analyze --checkpoint CKPT --data VAL [--json PATH]``: where the tokens go.

Settings: :class:`pipelines.analyze.settings.AnalyzeSettings`. Measures the layout-quality
curve (oracle against the learned policy, by ceiling mIoU), ``policy_vs_oracle``, the
plain / dCTS / exits / STEP trade-off, the exit ablation at matched counts and the token
flow (:mod:`pipelines.analyze.runner`), and the halting protocol (plain / merging only /
tuned per group, halted and active pixels, calibration of the exits:
:mod:`pipelines.analyze.halting`) on ``--data`` and ``--holdout-data``; ``--halting-only``
runs that protocol alone. Logs CSVs and plots to one MLflow run under ``analysis/``
unless ``--no-mlflow``. The inference flags (``--thresholds`` for the exits,
``--merge-thresholds`` or ``--budget`` for the sharing, ...) set the operating point.
"""

from __future__ import annotations

from pipelines.analyze.settings import AnalyzeSettings
from pipelines.cli.command import (
    INFERENCE_ALIASES,
    MLFLOW_ALIASES,
    Command,
    Invocation,
    Result,
)

ALIASES = (*INFERENCE_ALIASES, *MLFLOW_ALIASES)


def analyze_command(inv: Invocation) -> Result:
    from pipelines.analyze.measured import ProtocolRequest, measured_sets
    from pipelines.analyze.runner import analyze, log_analysis
    from pipelines.common.checkpoint import resolve_checkpoint_dir

    s: AnalyzeSettings = inv.settings
    checkpoint = resolve_checkpoint_dir(s.checkpoint)
    protocol = None if s.layouts_only else ProtocolRequest(
        measured_sets(s.data, s.holdout_data, s.holdout_groups), s.groups, s.calibration_bins)
    doc = analyze(checkpoint, s.data, inference=s.inference,
                  max_samples=s.max_samples, device=s.device, batch_size=s.batch_size,
                  purities=s.purities, thresholds=s.layout_thresholds, budgets=s.budgets,
                  seeds=s.seeds, ablation_thresholds=s.ablation_thresholds,
                  layouts_only=s.layouts_only, protocol=protocol, halting_only=s.halting_only,
                  predicted_layouts=s.predicted_layouts)
    doc["run_id"] = doc["tracking_uri"] = None
    if s.mlflow.enabled:
        from pipelines.tracking.runs import create_run, resolve_tracking_uri

        uri = resolve_tracking_uri(s.mlflow.tracking_uri)
        run_id = create_run(uri, s.mlflow.experiment, run_name="analyze",
                            tags={"step.kind": "analyze", "step.checkpoint": checkpoint},
                            parent_run_id=s.mlflow.parent_run_id)
        log_analysis(doc, uri, run_id)
        from pipelines.tracking.runs import RunLogger

        RunLogger(run_id, uri).end("FINISHED")
        doc["run_id"], doc["tracking_uri"] = run_id, uri
    for line in summary_lines(doc):
        print(line)
    return Result(doc)


def _vs_oracle_line(v: dict | None) -> str | None:
    if v is None:
        return None
    if v["value"] is None:
        return f"n/a ({v['reason']})"
    b = v["best"]
    return (f"{v['value']:.3f} ({b['layout']} {b['setting']:g} cuts {b['token_cut']:.2f}x; "
            f"the oracle at purity {v['oracle_purity']} cuts {v['oracle_cut']:.2f}x at "
            f"ceiling {_p(v['oracle_ceiling'])})")


def _p(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def summary_lines(doc: dict) -> list[str]:
    from pipelines.analyze.ablation import ablation_exit_score
    from pipelines.analyze.halting_report import summary_lines as halting_lines

    n = doc["num_images"]
    lines = [f"step analyze: {n} image{'s' if n != 1 else ''}; mIoU in %, GFLOPs per image "
             "(policy network included)"]
    if doc["layouts"]:
        lines.append("layouts (ceiling = majority label per token):")
    for r in doc["layouts"]:
        tag = "  [uses labels: upper bound]" if r["uses_labels"] else ""
        frac = "n/a" if r["tokens_fraction"] is None else f"{r['tokens_fraction']:.3f}"
        lines.append(f"  {r['layout']:<9} {r['setting']:<5g} tokens {frac}  "
                     f"ceiling {_p(r['ceiling_miou'])}{tag}")
    for name in ("policy_vs_oracle", "predicted_vs_oracle"):
        line = _vs_oracle_line(doc.get(name))  # None: that curve did not run
        if line:
            lines.append(f"{name}: {line}")
    if doc["tradeoff"]:
        lines.append("trade-off: " + "; ".join(
            f"{r['variant']} {_p(r['miou'])} @ {r['gflops']:.3g}" for r in doc["tradeoff"]
            if r.get("gflops") is not None))
    abl = doc.get("ablation") or {}
    score = ablation_exit_score(doc)
    names = {"confidence": f"{score} exits", "random": "random", "uniform": "uniform"}
    if "confidence" in abl:
        lines.append("exit ablation (same counts at every exit): " + "; ".join(
            f"{names[k]} {_p(abl[k]['miou'])}" for k in names))
    for r in doc.get("ablation_sweep") or []:
        lines.append(f"  at exit threshold {r['exit_threshold']:g}: " + "; ".join(
            f"{names[k]} {_p(r[k]['miou'])}" for k in names)
            + f" ({sum(r['confidence']['halted_per_exit'].values()):.1f} tokens halted)")
    if doc.get("confidence_wins") is not None:
        lines.append(f"{score} exits beat random and uniform at every point: "
                     + ("yes" if doc["confidence_wins"] else "no"))
    lines += halting_lines(doc.get("halting"))
    if doc.get("run_id"):
        from pipelines.tracking.links import run_location

        lines.append(f"MLflow: run {doc['run_id']} (artifacts under analysis/): "
                     f"{run_location(doc['tracking_uri'], doc['run_id'])}")
    return lines


COMMAND = Command(AnalyzeSettings, analyze_command, aliases=ALIASES,
                  config_help="analyze settings (YAML: checkpoint, data, inference, ...)")
configure = COMMAND.configure
run = COMMAND.run
