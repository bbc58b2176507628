"""The report's tables and figures from known result dicts (no model, no Ray)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipelines.tune.pareto import pareto_plot, select, trials_csv
from pipelines.workflow.report import (
    per_class_halting_md,
    per_class_halting_rows,
    summary_csv,
    summary_table,
    token_map_figure,
)

EVAL = {
    "baseline": {"miou": 0.5, "gflops": 10.0, "tokens_mean": 256.0, "halted_fraction": 0.0,
                 "latency_ms": 50.0},
    "tuned": {"miou": 0.49, "gflops": 4.0, "tokens_mean": 80.5, "halted_fraction": 0.25,
              "latency_ms": 21.0,
              "per_class_halting": {"road": {"exit_4": 0.5, "exit_8": 0.2, "final": 0.3},
                                    "water": {"exit_4": 0.0, "exit_8": 0.1, "final": 0.9}}},
}


def test_summary_table_baseline_vs_tuned():
    table = summary_table(EVAL)
    lines = table.splitlines()
    assert lines[0] == "| model | mIoU (%) | GFLOPs | tokens | halted (%) | latency (ms) |"
    assert lines[2] == "| baseline (unpruned) | 50.00 | 10.000 | 256.0 | 0.00 | 50.0 |"
    assert lines[3] == "| tuned STEP | 49.00 | 4.000 | 80.5 | 25.00 | 21.0 |"
    assert "GFLOPs reduction: 2.50x; mIoU drop: 1.00 points" in table
    assert summary_csv(EVAL).splitlines()[2].startswith("tuned STEP,0.49,4.0,80.5,0.25,21.0")
    assert "no configuration met" in summary_table({"baseline": EVAL["baseline"], "tuned": None})


def test_per_class_halting_table():
    header, rows = per_class_halting_rows(EVAL["tuned"])
    assert header == ["class", "exit_4", "exit_8", "final"]
    assert rows == [["road", 0.5, 0.2, 0.3], ["water", 0.0, 0.1, 0.9]]
    md = per_class_halting_md(EVAL["tuned"])
    assert "| road | 50.0 % | 20.0 % | 30.0 % |" in md
    assert "no per-class halting" in per_class_halting_md({})


def test_pareto_csv_and_plot(tmp_path):
    trials = [{"trial_id": "a", "miou": 0.50, "gflops": 9.0, "params": {"x": 1}},
              {"trial_id": "b", "miou": 0.49, "gflops": 5.0, "params": {"x": 2}},
              {"trial_id": "c", "miou": 0.40, "gflops": 3.0, "params": {"x": 3}},
              {"trial_id": "d", "miou": 0.45, "gflops": 6.0, "params": {"x": 4}}]
    sel = select(trials, 0.5, 2.0)
    rows = trials_csv(trials, sel).splitlines()
    assert rows[0].startswith("trial_id,on_front,feasible,miou,drop,gflops")
    by_id = {r.split(",")[0]: r.split(",") for r in rows[1:]}
    assert by_id["b"][1:3] == ["1", "1"]  # on the front, feasible
    assert by_id["c"][1:3] == ["1", "0"]  # on the front, infeasible
    assert by_id["d"][1:3] == ["0", "0"]  # dominated by b
    png = pareto_plot(tmp_path / "p.png", trials, sel, {"miou": 0.5, "gflops": 10.0})
    assert Image.open(png).size[0] > 300


def test_token_map_figure(tmp_path):
    img = np.zeros((64, 96, 3), dtype=np.uint8)
    level = np.ones((4, 6))
    level[:2, :2] = 2
    depth = np.full((4, 6), 12)
    depth[2:, :] = 4
    png = token_map_figure(tmp_path / "m.png", img, level, depth, depth=12, title="t")
    im = np.asarray(Image.open(png).convert("RGB"))
    assert im.shape[1] > im.shape[0] > 100  # three panels side by side


def test_the_report_selects_with_a_guard_configured_beyond_its_presets():
    """A guard set field by field (camvid.yaml's cliff budget) is named "custom" in the tune
    document; the report selects with its checks, as the search did, not by that name."""
    from pipelines.tune.guard import GuardConfig
    from pipelines.workflow.report import report_selection

    trials = [{"trial_id": "a", "miou": 0.50, "gflops": 9.0, "params": {"x": 1},
               "drop": 0.0, "drop_lo": -0.5, "drop_hi": 0.5},
              {"trial_id": "b", "miou": 0.49, "gflops": 5.0, "params": {"x": 2},
               "drop": 1.0, "drop_lo": 0.0, "drop_hi": 2.5}]
    guard = GuardConfig.model_validate({"tail": None, "groups": None, "cliff": None})
    assert guard.name == "custom"
    doc = {"trials": trials, "baseline": {"miou": 0.5, "gflops": 10.0}, "max_drop": 2.0,
           "drop_mode": "points", "guard": guard.name,
           "guard_config": guard.model_dump(mode="json")}
    sel = report_selection(doc)
    # the interval check of the configured guard rules out b (upper end 2.5 > 2)
    assert sel.best["trial_id"] == "a"
    assert select(trials, 0.5, 2.0, "points", guard).best["trial_id"] == "a"
