"""Feasibility under an mIoU-drop limit, the cheapest feasible trial, and the Pareto front.

Pure Python over trial records (dicts with at least ``miou`` and ``gflops``), so the rule
that picks the answer of a search is unit-tested on known inputs, independently of Ray.

Conventions (the unit of ``max_drop`` is the same in both modes: percent):

* mIoU is a fraction in [0, 1] (what ``evaluate_checkpoint`` returns).
* ``points``: drop = 100 * (baseline - miou), in mIoU points (2.0 = "two points").
* ``relative``: drop = 100 * (baseline - miou) / baseline, in percent of the baseline.
  The STEP papers quote "at most 2.0 %" without saying which; both are offered.
* Feasible means drop <= max_drop (a tolerance of 1e-9 absorbs float noise; a trial that
  *gains* mIoU has a negative drop and is feasible). Under the guard ``ci`` the drop
  compared with the limit is the upper end of the trial's bootstrap interval
  (``drop_hi``, :mod:`pipelines.evaluate.bootstrap`), so a trial is feasible only when the
  limit holds with 97.5 % confidence, not just on the images measured; ``none`` compares
  the point estimate. A trial without an interval falls back to its point estimate. The
  default guard ``robust`` adds the worst-group and cliff checks of
  :mod:`pipelines.tune.guard` (``strict`` also the tail's).
* The answer is the cheapest feasible trial: fewest GFLOPs, or under ``tune.cost:
  latency`` the lowest latency ratio against the reference (:func:`cost_of`); ties go to
  the higher mIoU.
  Both rules' answers are kept (``plain``, ``guarded``); ``best`` is the one of the guard
  asked for. With no feasible trial there is no answer; the *closest* trial (smallest
  drop under the rule, then fewest GFLOPs) is reported instead, clearly marked as
  infeasible.
* The Pareto front minimises GFLOPs and maximises mIoU over all finished trials.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pipelines.tune.guard import TOL, as_guard, point_key, ruled_drop

DropMode = Literal["points", "relative"]
Guard = Any  # a preset name (none | ci | robust | strict), its mapping, or a GuardConfig


def miou_drop(baseline_miou: float, miou: float, mode: DropMode = "points") -> float:
    """The drop of ``miou`` against the reference, in percent (see module docstring)."""
    for name, v in (("baseline_miou", baseline_miou), ("miou", miou)):
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"{name} must be a fraction in [0, 1], got {v}")
    if mode == "points":
        return 100.0 * (baseline_miou - miou)
    if mode == "relative":
        if baseline_miou <= 0:
            raise ValueError("relative drop needs a baseline mIoU > 0")
        return 100.0 * (baseline_miou - miou) / baseline_miou
    raise ValueError(f"drop mode must be 'points' or 'relative', got {mode!r}")


def is_feasible(drop: float, max_drop: float) -> bool:
    return drop <= max_drop + TOL


def rule_drop(trial: dict[str, Any], guard: Guard = "none",
              max_drop: float | None = None) -> float:
    """The drop a guard compares with the limit: the point estimate, under ``ci`` the upper
    end of the interval when the trial has one, under a guard with more checks
    (:mod:`pipelines.tune.guard`) the worst of them mapped onto the limit's scale (which
    needs ``max_drop``)."""
    g = as_guard(guard)
    if max_drop is None:
        if not (g.tail is None and g.groups is None and g.cliff is None):
            raise ValueError("rule_drop: a guard with tail, group or cliff checks needs "
                             "max_drop")
        max_drop = math.inf
    return ruled_drop(trial, g, max_drop)


def penalised_objective(gflops: float, drop: float, max_drop: float, ref_gflops: float) -> float:
    """Scalar for a single-objective searcher (minimise).

    Feasible trials score their relative cost ``gflops / ref_gflops`` (< ~1.1 even when the
    policy network makes a trial dearer than the reference). Infeasible ones score
    ``10 + violation / max(max_drop, 0.1)``: always worse than any feasible trial, yet still
    ordered by how far they miss the limit, so the searcher is pulled back towards the
    boundary instead of seeing a flat wall.
    """
    cost = gflops / ref_gflops if ref_gflops > 0 else gflops
    if is_feasible(drop, max_drop):
        return cost
    return 10.0 + (drop - max_drop) / max(max_drop, 0.1) + 0.01 * cost


def _valid(trials: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for t in trials:
        m, g = t.get("miou"), t.get("gflops")
        if m is None or g is None or not math.isfinite(m) or not math.isfinite(g):
            continue
        out.append(t)
    return out


def cost_of(t: dict[str, Any]) -> float:
    """What "cheapest" means for a trial: its ``cost`` when the search measured one
    (``tune.cost: latency``: the forward's latency over the reference's, timed in the same
    trial), else its GFLOPs (``tune.cost: gflops``, the default)."""
    cost = t.get("cost")
    return t["gflops"] if cost is None or not math.isfinite(cost) else cost


def cost_order(t: dict[str, Any]) -> tuple:
    """Cheapest first (:func:`cost_of`), ties to the higher mIoU, then to the operating
    point's parameters: the order (and so the answer) never depends on the order trials
    finished in."""
    return (cost_of(t), -t["miou"], point_key(t.get("params") or {}))


def pareto_front(trials: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials not dominated in (lower cost, higher mIoU), sorted by cost (:func:`cost_of`:
    GFLOPs, or the measured latency ratio under ``tune.cost: latency``).

    A trial is dominated when another has <= cost and >= mIoU with one strict; among
    exact duplicates the first one is kept.
    """
    ordered = sorted(_valid(trials), key=cost_order)
    front: list[dict[str, Any]] = []
    best_miou = -math.inf
    for t in ordered:
        if t["miou"] > best_miou:
            front.append(t)
            best_miou = t["miou"]
    return front


@dataclass
class Selection:
    """The outcome of a search under a drop limit."""

    baseline_miou: float
    max_drop: float
    drop_mode: DropMode
    best: dict[str, Any] | None  # cheapest feasible trial under the guard, or None
    closest: dict[str, Any] | None  # smallest drop, reported when nothing is feasible
    front: list[dict[str, Any]] = field(default_factory=list)
    n_trials: int = 0
    n_feasible: int = 0
    guard: Guard = "none"
    plain: dict[str, Any] | None = None  # cheapest with the point drop within the limit
    guarded: dict[str, Any] | None = None  # cheapest within the limit under the guard

    @property
    def feasible(self) -> bool:
        return self.best is not None

    def message(self) -> str:
        g = as_guard(self.guard)
        rule = "" if g.is_plain() else f" ({g.describe()})"
        if self.best is not None:
            b = self.best
            return (f"{self.n_feasible}/{self.n_trials} trials within the {self.max_drop:g} "
                    f"({self.drop_mode}) drop limit{rule}; cheapest: {describe_cost(b)} "
                    f"at mIoU {b['miou']:.4f} (drop {describe_drop(b)})")
        if self.closest is None:
            return f"no trial finished ({self.n_trials} evaluated): nothing to choose from"
        c = self.closest
        return (f"NO FEASIBLE CONFIGURATION: none of the {self.n_trials} trials keeps the mIoU "
                f"drop within {self.max_drop:g} ({self.drop_mode}){rule}; the closest drops "
                f"{describe_drop(c)} (mIoU {c['miou']:.4f}, {describe_cost(c)})")

    def choices(self) -> str:
        """Both rules' answers, one line each (the search prints them)."""
        g = as_guard(self.guard)
        rule = "interval's upper end" if g.is_plain() or g.name == "ci" else g.describe()
        lines = []
        for name, t in (("plain (point drop)", self.plain), (f"guarded ({rule})", self.guarded)):
            mark = " <- chosen" if t is not None and t is self.best else ""
            lines.append(f"  {name}: " + (
                f"{describe_cost(t)}, mIoU {t['miou']:.4f}, drop {describe_drop(t)}{mark}"
                if t is not None else "none within the limit"))
        return "\n".join(lines)


def describe_cost(t: dict[str, Any]) -> str:
    """``1.234 GFLOPs`` and, when the trial's latency was measured against the
    reference's, ``latency 0.52x (spread 0.08)``."""
    text = f"{t['gflops']:.3f} GFLOPs"
    if t.get("latency_ratio") is not None:
        text += f", latency {t['latency_ratio']:.2f}x of the reference"
        if t.get("latency_spread") is not None:
            text += f" (spread {t['latency_spread']:.2f})"
    return text


def describe_drop(t: dict[str, Any]) -> str:
    """``1.38`` or ``1.38 [0.41, 2.35]`` (the 95 % interval, when the trial has one)."""
    text = f"{t['drop']:.2f}"
    if t.get("drop_lo") is not None and t.get("drop_hi") is not None:
        text += f" [{t['drop_lo']:.2f}, {t['drop_hi']:.2f}]"
    return text


def annotate(trials: Sequence[dict[str, Any]], baseline_miou: float, max_drop: float,
             mode: DropMode = "points", guard: Guard = "none") -> list[dict[str, Any]]:
    """Copies of the valid trials with ``drop`` and ``feasible`` (under ``guard``) filled in."""
    out = []
    for t in _valid(trials):
        d = miou_drop(baseline_miou, t["miou"], mode)
        a = {**t, "drop": d}
        a["feasible"] = is_feasible(rule_drop(a, guard, max_drop), max_drop)
        out.append(a)
    return out


def _cheapest(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    return min(trials, key=cost_order) if trials else None


def select(trials: Sequence[dict[str, Any]], baseline_miou: float, max_drop: float,
           mode: DropMode = "points", guard: Guard = "none") -> Selection:
    """Cheapest feasible trial, the Pareto front, and the closest one when none is feasible.

    ``plain`` is the cheapest trial whose point drop keeps the limit; ``guarded`` the
    cheapest under ``guard`` (under ``ci`` when the guard is ``none``, for comparison);
    ``best`` the one the guard asks for."""
    if max_drop < 0:
        raise ValueError(f"max_drop must be >= 0, got {max_drop}")
    g = as_guard(guard)
    done = annotate(trials, baseline_miou, max_drop, mode, g)
    feasible = [t for t in done if t["feasible"]]
    plain = _cheapest([t for t in done if is_feasible(t["drop"], max_drop)])
    rule = as_guard("ci") if g.is_plain() else g
    guarded = _cheapest([t for t in done if is_feasible(rule_drop(t, rule, max_drop),
                                                        max_drop)])
    best = plain if g.is_plain() else guarded
    closest = None
    if best is None and done:
        closest = min(done, key=lambda t: (rule_drop(t, g, max_drop), cost_of(t)))
    return Selection(
        baseline_miou=baseline_miou, max_drop=max_drop, drop_mode=mode, best=best,
        closest=closest, front=pareto_front(done), n_trials=len(done), n_feasible=len(feasible),
        guard=g, plain=plain, guarded=guarded,
    )


def mark_choices(selection: Selection, trials: Sequence[dict[str, Any]],
                 best: dict[str, Any] | None, plain: dict[str, Any] | None) -> Selection:
    """``selection`` (over ``trials``, figures on the searched images) with the answers of
    a later stage (the confirmation) as its ``best`` / ``plain``: the same trials, found by
    ``trial_id``, so that the plot marks them where the search measured them."""
    by_id = {t.get("trial_id"): t for t in trials}

    def find(t: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if t is None else by_id.get(t.get("trial_id"), t)

    return replace(selection, best=find(best), plain=find(plain))


# ---------------------------------------------------------------------------------------
# artifacts: the trials table and the plot

CSV_FIELDS = ("trial_id", "on_front", "feasible", "miou", "drop", "gflops", "tokens_mean",
              "halted_fraction", "latency_ms", "latency_ratio", "latency_spread",
              "drop_lo", "drop_hi", "tail_drop", "worst_group_drop", "cliff_step")


def trials_csv(trials: list[dict[str, Any]], selection: Selection) -> str:
    """All trials, one row each, with their params and whether they are on the front."""
    front = {id(t) for t in selection.front}
    front_ids = {t.get("trial_id") for t in selection.front}
    names = sorted({k for t in trials for k in t["params"]})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*CSV_FIELDS, *names])
    for t in sorted(trials, key=cost_of):
        on_front = id(t) in front or t.get("trial_id") in front_ids
        drop = t.get("drop", miou_drop(selection.baseline_miou, t["miou"], selection.drop_mode))
        feasible = is_feasible(rule_drop({**t, "drop": drop}, selection.guard,
                                         selection.max_drop), selection.max_drop)
        row = [t.get("trial_id"), int(on_front), int(feasible), t["miou"], drop, t["gflops"],
               t.get("tokens_mean"), t.get("halted_fraction"), t.get("latency_ms"),
               t.get("latency_ratio"), t.get("latency_spread"), t.get("drop_lo"), t.get("drop_hi"), t.get("tail_drop"),
               t.get("worst_group_drop"), t.get("cliff_step")]
        w.writerow(row + [t["params"].get(n) for n in names])
    return buf.getvalue()


def pareto_plot(path: str | Path, trials: list[dict[str, Any]], selection: Selection,
                baseline: dict[str, Any], title: str = "GFLOPs vs mIoU") -> Path:
    """GFLOPs (x) against mIoU (y): all trials (with their drop's 95 % interval as a
    vertical error bar, when they have one), the front, the limit and the answers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    timed = [t for t in trials if t.get("latency_ratio") is not None]
    if timed:  # tune.cost: latency: the measured latency beside the GFLOPs
        fig, (ax, lat_ax) = plt.subplots(1, 2, figsize=(11.5, 4.2), dpi=120)
        latency_panel(lat_ax, timed, selection, baseline)
    else:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ann = [{**t, "feasible": is_feasible(rule_drop({"drop": 0.0, **t}, selection.guard,
                                                   selection.max_drop), selection.max_drop)}
           for t in trials]
    # a drop of 1 (points, or percent of the reference) is this many mIoU points
    unit = 1.0 if selection.drop_mode == "points" else selection.baseline_miou
    for feas, colour, label in ((True, "tab:blue", "feasible trial"),
                                (False, "tab:gray", "infeasible trial")):
        pts = [t for t in ann if t["feasible"] == feas]
        if pts:
            ax.scatter([t["gflops"] for t in pts], [100 * t["miou"] for t in pts], s=18,
                       c=colour, alpha=0.7, label=label)
            bars = [t for t in pts if t.get("drop_lo") is not None
                    and t.get("drop_hi") is not None and "drop" in t]
            if bars:
                # a higher drop is a lower mIoU: drop_hi sets the lower end of the bar
                low = [max(0.0, (t["drop_hi"] - t["drop"]) * unit) for t in bars]
                high = [max(0.0, (t["drop"] - t["drop_lo"]) * unit) for t in bars]
                ax.errorbar([t["gflops"] for t in bars], [100 * t["miou"] for t in bars],
                            yerr=[low, high], fmt="none", ecolor=colour, alpha=0.45,
                            elinewidth=0.8, capsize=2)
    if selection.front:
        ax.plot([t["gflops"] for t in selection.front],
                [100 * t["miou"] for t in selection.front], "-o", c="tab:orange", ms=4,
                lw=1.2, label="Pareto front")
    ax.scatter([baseline["gflops"]], [100 * baseline["miou"]], marker="*", s=140, c="k",
               label="unpruned reference", zorder=5)
    limit = selection.baseline_miou * 100 - (
        selection.max_drop if selection.drop_mode == "points"
        else selection.max_drop * selection.baseline_miou)
    ax.axhline(limit, ls="--", c="tab:red", lw=1,
               label=f"drop limit {selection.max_drop:g} ({selection.drop_mode})")
    if selection.plain is not None and selection.plain is not selection.best:
        ax.scatter([selection.plain["gflops"]], [100 * selection.plain["miou"]], marker="s",
                   s=60, facecolors="none", edgecolors="tab:purple", linewidths=1.5,
                   label="plain choice (point drop)", zorder=6)
    if selection.best is not None:
        rule = "cheapest feasible" if as_guard(selection.guard).is_plain() else "guarded"
        ax.scatter([selection.best["gflops"]], [100 * selection.best["miou"]], marker="D",
                   s=60, facecolors="none", edgecolors="tab:green", linewidths=2,
                   label=f"chosen ({rule})", zorder=6)
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("mIoU (%)")
    if any(t.get("drop_hi") is not None for t in trials):
        title += " (bars: 95 % interval of the drop)"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def latency_panel(ax, trials: list[dict[str, Any]], selection: Selection,
                  baseline: dict[str, Any]) -> None:
    """Latency ratio (trial / reference, measured in the same trial; bars: the spread of
    the repeats) against mIoU, the chosen trial marked."""
    ax.errorbar([t["latency_ratio"] for t in trials], [100 * t["miou"] for t in trials],
                xerr=[[t["latency_ratio"] * t.get("latency_spread", 0.0) / 2 for t in trials]] * 2,
                fmt="o", ms=4, c="tab:blue", alpha=0.7, elinewidth=0.8, label="trial")
    ax.scatter([1.0], [100 * baseline["miou"]], marker="*", s=140, c="k",
               label="unpruned reference", zorder=5)
    if selection.best is not None and selection.best.get("latency_ratio") is not None:
        ax.scatter([selection.best["latency_ratio"]], [100 * selection.best["miou"]],
                   marker="D", s=60, facecolors="none", edgecolors="tab:green",
                   linewidths=2, label="chosen", zorder=6)
    ax.set_xlabel("forward latency / reference's (same trial)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("latency vs mIoU (bars: spread over repeats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
