"""``step run CONFIG``: the whole pipeline (prepare -> policy -> STEP -> tune -> evaluate -> report
-> analyze). ``--json`` also holds ``checkpoints`` (policy, STEP) and ``analysis``.

Settings: :class:`pipelines.workflow.config.PipelineConfig` (``--config FILE`` or the
positional ``CONFIG``, ``--set``, ``--name``, ``--storage``); the training configs it
points at are validated too.
"""

from __future__ import annotations

from pydantic import Field

from pipelines.cli.command import Command, Invocation, Result
from pipelines.common.errors import ExpectedFailure
from pipelines.common.settings import StrictModel
from pipelines.workflow.config import PipelineConfig, load_pipeline_config


class RunOptions(StrictModel):
    dry_run: bool = Field(False, description="print each step's fingerprint and whether it "
                          "would run or be skipped; run nothing")
    verbose: bool = Field(False, description="show every line of Ray's and the libraries' "
                          "output on the terminal, not only the pipeline's own, its "
                          "warnings and errors (the log file always holds all of it)")


def load(config: str | None, overrides: list[str], path: tuple[str, ...]) -> PipelineConfig:
    return load_pipeline_config(config, overrides)


def run_command(inv: Invocation) -> Result:
    from data_prep.verify import SourceMismatch

    try:
        return _run(inv)
    except SourceMismatch as err:  # the data is not the one the config names: exit 2
        raise ExpectedFailure(str(err), 2) from None


def _run(inv: Invocation) -> Result:
    from pipelines.common.console import open_console
    from pipelines.workflow.runner import Workflow, run_pipeline, verify_source

    if inv.options.dry_run:
        verify_source(inv.settings)
        plan = Workflow(inv.settings, config_path=inv.config).plan()
        for p in plan:
            extra = f" (reuses run {p['reuses_run']})" if p["reuses_run"] else ""
            print(f"{p['step']:<14} {p['action']:<4} fingerprint {p['fingerprint'][:12]}{extra}")
        return Result({"plan": plan})
    log = open_console("run", verbose_=inv.options.verbose)
    result = run_pipeline(inv.config, inv.overrides)
    doc = result_json(result)
    print()
    print(doc["summary_table"])
    if doc.get("registered_model"):
        r = doc["registered_model"]
        print(f"\nregistered model: {r['name']} version {r['version']}")
    analysis = doc.get("analysis") or {}
    pvo = (analysis.get("policy_vs_oracle") or {}).get("value")
    if pvo is not None:
        print(f"policy_vs_oracle (token cut at the oracle's ceiling): {pvo:.3f}")
    wins = analysis.get("confidence_wins")  # the exit policy's name: halting by the score
    if wins is not None:
        from pipelines.analyze.ablation import ablation_exit_score

        print(f"exit ablation: {ablation_exit_score(analysis)} exits beat random and uniform "
              "at every measured point: " + ("yes" if wins else "no"))
    if result.skipped:
        print(f"skipped (unchanged): {', '.join(result.skipped)}")
    from pipelines.tracking.links import run_location

    print(f"\nMLflow: pipeline run {result.parent_run_id}: "
          f"{run_location(result.tracking_uri, result.parent_run_id)}")
    print(ui_hint(result.tracking_uri))
    print(f"log: {log}")
    return Result(doc)


def result_json(result) -> dict:
    """The ``--json`` document (keys shared with ``step tune --json``)."""
    s = result.summary
    search = s.get("search") or {}
    ref = search.get("baseline") or {}
    return {
        "tracking_uri": result.tracking_uri,
        "parent_run_id": result.parent_run_id,
        "max_drop": s.get("max_drop"),
        "drop_mode": s.get("drop_mode"),
        "baseline": {"miou": ref.get("miou"), "gflops": ref.get("gflops")},
        "best": s.get("best"),
        "pareto": s.get("pareto", []),
        "registered_model": s.get("registered_model"),
        "evaluation": {"baseline": s.get("baseline"), "tuned": s.get("tuned"),
                       "drop": s.get("drop_on_reevaluation"),
                       "within_limit": s.get("within_limit_on_reevaluation"),
                       "plain_vit": s.get("plain_vit"),
                       "drop_vs_plain_vit": s.get("drop_vs_plain_vit"),
                       "within_limit_vs_plain_vit": s.get("within_limit_vs_plain_vit"),
                       "worst_group": s.get("worst_group"),
                       "holdout": s.get("holdout")},
        "guard": s.get("guard"),
        "guard_verdict": s.get("guard_verdict"),
        "steps": {n: {"run_id": r.run_id, "fingerprint": r.fingerprint, "skipped": r.skipped,
                      "reused_run_id": r.reused_run_id, "outputs": r.outputs}
                  for n, r in result.steps.items()},
        "skipped": result.skipped,
        "resumed": result.resumed,
        "summary_table": s.get("table_md", ""),
        "checkpoints": s.get("checkpoints") or {"policy": None, "step": None},
        # what `step analyze --json` writes, from the pipeline's analyze step (None: disabled)
        "analysis": s.get("analysis"),
    }


def ui_hint(tracking_uri: str) -> str:
    review = ("; the parent run's artifact report.html is the review page (the UI's "
              "\"Model training\" view lists the runs)")
    if tracking_uri.startswith("sqlite:"):
        return ("open the MLflow UI: `step ui` (serves this store on 127.0.0.1 and prints each "
                "experiment's address), then the run's address above" + review)
    return "open the MLflow UI at the run's address above" + review


COMMAND = Command(PipelineConfig, run_command, options=RunOptions, load=load,
                  positional_config=True, config_required=True,
                  config_help="pipeline config YAML, e.g. configs/demo.yaml")
configure = COMMAND.configure
run = COMMAND.run
