"""The rule that picks a search's answer, on hand-made trials with known outcomes."""

from __future__ import annotations

import pytest

from pipelines.tune.pareto import miou_drop, pareto_front, penalised_objective, select

# baseline 0.50; drops in points: a 0.0, b 1.0, c 2.0, d 3.0, e 0.5, f -0.5 (a gain)
TRIALS = [
    {"id": "a", "miou": 0.50, "gflops": 10.0},
    {"id": "b", "miou": 0.49, "gflops": 6.0},
    {"id": "c", "miou": 0.48, "gflops": 4.0},
    {"id": "d", "miou": 0.47, "gflops": 3.0},
    {"id": "e", "miou": 0.495, "gflops": 7.0},
    {"id": "f", "miou": 0.505, "gflops": 12.0},
    {"id": "g", "miou": 0.48, "gflops": 5.0},   # dominated by c
    {"id": "h", "miou": None, "gflops": 1.0},   # failed trial: ignored
]


def ids(ts):
    return [t["id"] for t in ts]


def test_drop_points_and_relative():
    assert miou_drop(0.5, 0.48, "points") == pytest.approx(2.0)
    assert miou_drop(0.5, 0.48, "relative") == pytest.approx(4.0)
    assert miou_drop(0.5, 0.51, "points") == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="fraction"):
        miou_drop(50.0, 48.0)
    with pytest.raises(ValueError, match="drop mode"):
        miou_drop(0.5, 0.4, "percent")


def test_cheapest_feasible_points():
    sel = select(TRIALS, 0.50, max_drop=2.0, mode="points")
    assert sel.feasible and sel.best["id"] == "c"  # drop exactly 2.0 counts as feasible
    assert sel.n_trials == 7 and sel.n_feasible == 6
    assert sel.closest is None
    assert "cheapest: 4.000 GFLOPs" in sel.message()


def test_relative_mode_is_stricter():
    # relative: c drops 4 %, b 2 %, e 1 % -> with D = 2, b is the cheapest feasible
    sel = select(TRIALS, 0.50, max_drop=2.0, mode="relative")
    assert sel.best["id"] == "b"


def test_tie_on_gflops_prefers_higher_miou():
    trials = [{"id": "x", "miou": 0.45, "gflops": 4.0}, {"id": "y", "miou": 0.49, "gflops": 4.0}]
    assert select(trials, 0.50, 10.0).best["id"] == "y"


def test_none_feasible_reports_closest():
    sel = select(TRIALS, 0.50, max_drop=0.0)
    assert sel.best["id"] == "a" and sel.n_feasible == 2  # no drop, and f's gain, are feasible
    trials = [t for t in TRIALS if t["id"] in "bcd"]
    sel = select(trials, 0.50, max_drop=0.5)
    assert not sel.feasible and sel.best is None
    assert sel.closest["id"] == "b"
    assert "NO FEASIBLE CONFIGURATION" in sel.message() and "1.00" in sel.message()


def test_pareto_front_known():
    front = pareto_front(TRIALS)
    assert ids(front) == ["d", "c", "b", "e", "a", "f"]
    assert all(front[i]["gflops"] < front[i + 1]["gflops"] for i in range(len(front) - 1))
    assert all(front[i]["miou"] < front[i + 1]["miou"] for i in range(len(front) - 1))


def test_penalised_objective_orders_feasible_before_infeasible():
    feasible_dear = penalised_objective(12.0, 1.0, 2.0, ref_gflops=10.0)
    infeasible_cheap = penalised_objective(1.0, 2.5, 2.0, ref_gflops=10.0)
    infeasible_worse = penalised_objective(1.0, 5.0, 2.0, ref_gflops=10.0)
    assert feasible_dear < infeasible_cheap < infeasible_worse
    assert penalised_objective(4.0, 1.0, 2.0, 10.0) < penalised_objective(6.0, 0.0, 2.0, 10.0)


def test_negative_limit_rejected():
    with pytest.raises(ValueError, match="max_drop"):
        select(TRIALS, 0.5, -1.0)
