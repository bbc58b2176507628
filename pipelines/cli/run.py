"""``step run CONFIG``: the whole pipeline (prepare -> policy -> STEP -> tune -> evaluate -> report)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="pipeline config YAML (e.g. configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each step's fingerprint and whether it would run or be "
                        "skipped; run nothing")


def run(args: argparse.Namespace) -> int:
    from pipelines.common.settings import ConfigError
    from pipelines.workflow.config import load_pipeline_config
    from pipelines.workflow.runner import Workflow, run_pipeline

    try:
        if args.dry_run:
            cfg = load_pipeline_config(args.config, args.overrides)
            plan = Workflow(cfg, config_path=args.config).plan()
            for p in plan:
                extra = f" (reuses run {p['reuses_run']})" if p["reuses_run"] else ""
                print(f"{p['step']:<13} {p['action']:<4} fingerprint {p['fingerprint'][:12]}{extra}")
            if args.json:
                _write(args.json, {"plan": plan})
            return 0
        result = run_pipeline(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}")
        return 2
    doc = result_json(result)
    print()
    print(doc["summary_table"])
    if doc.get("registered_model"):
        r = doc["registered_model"]
        print(f"\nregistered model: {r['name']} version {r['version']}")
    if result.skipped:
        print(f"skipped (unchanged): {', '.join(result.skipped)}")
    print(f"\nMLflow: pipeline run {result.parent_run_id} at {result.tracking_uri}")
    print(ui_hint(result.tracking_uri))
    if args.json:
        _write(args.json, doc)
        print(f"wrote {args.json}")
    return 0


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
                       "within_limit": s.get("within_limit_on_reevaluation")},
        "steps": {n: {"run_id": r.run_id, "fingerprint": r.fingerprint, "skipped": r.skipped,
                      "reused_run_id": r.reused_run_id, "outputs": r.outputs}
                  for n, r in result.steps.items()},
        "skipped": result.skipped,
        "resumed": result.resumed,
        "summary_table": s.get("table_md", ""),
    }


def ui_hint(tracking_uri: str) -> str:
    if tracking_uri.startswith("sqlite:"):
        return ("open the MLflow UI: `step ui` (serves this store on http://127.0.0.1:5000), "
                "then the experiment's newest run")
    return f"open the MLflow UI: {tracking_uri}"


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str))
