"""The analysis figures (matplotlib, Agg): layout quality, trade-off, exit ablation, flow,
reliability of the exits."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pct(v: float | None) -> float:
    return float("nan") if v is None else 100.0 * v


def layouts_plot(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Tokens kept (fraction of the grid) against the layout's ceiling mIoU."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    styles = {"oracle": ("k", "o", "oracle (uses labels: upper bound)"),
              "threshold": ("tab:blue", "s", "learned policy, threshold"),
              "budget": ("tab:orange", "^", "learned policy, budget"),
              "predicted": ("tab:green", "D", "oracle's rule on a segmenter's predictions")}
    for kind, (color, marker, label) in styles.items():
        pts = sorted((r["tokens_fraction"], _pct(r["ceiling_miou"]), r["setting"]) for r in rows
                     if r["layout"] == kind and r["tokens_fraction"] is not None)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=label)
        for x, y, s in pts:
            ax.annotate(f"{s:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("tokens kept (fraction of the 16 px grid)")
    ax.set_ylabel("layout ceiling mIoU (%)")
    ax.set_title("layout quality: majority label per token, painted back")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def tradeoff_plot(path: Path, rows: list[dict[str, Any]]) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.2), dpi=110)
    for r in rows:
        if r.get("gflops") is None:
            continue
        ax.scatter([r["gflops"]], [_pct(r["miou"])], s=50)
        ax.annotate(r["variant"], (r["gflops"], _pct(r["miou"])), textcoords="offset points",
                    xytext=(4, 4), fontsize=9)
    ax.set_xlabel("GFLOPs per image (policy network included)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("plain ViT / dCTS / exits / STEP at the operating point")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def ablation_plot(path: Path, ablation: dict[str, Any]) -> Path:
    plt = _plt()
    names = [k for k in ("confidence", "random", "uniform") if isinstance(ablation.get(k), dict)]
    fig, ax = plt.subplots(figsize=(5.6, 4.0), dpi=110)
    vals = [_pct(ablation[k].get("miou")) for k in names]
    errs = [_pct(ablation[k].get("miou_std")) if ablation[k].get("miou_std") is not None else 0.0
            for k in names]
    ax.bar(names, vals, yerr=errs, color=["tab:green", "tab:gray", "tab:purple"][: len(names)])
    for i, k in enumerate(names):
        g = ablation[k].get("gflops")
        if g is not None:
            ax.annotate(f"{g:.3g} GFLOPs", (i, vals[i]), ha="center", xytext=(0, 3),
                        textcoords="offset points", fontsize=8)
    ax.set_ylabel("mIoU (%)")
    ax.set_title("which tokens halt: same count at every exit")
    return _save(fig, path)


def ablation_sweep_plot(path: Path, sweep: list[dict[str, Any]]) -> Path:
    """mIoU against GFLOPs for each exit rule, one point per exit threshold."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 4.0), dpi=110)
    for k, color in (("confidence", "tab:green"), ("random", "tab:gray"),
                     ("uniform", "tab:purple")):
        pts = sorted((r[k]["gflops"], _pct(r[k]["miou"]), r["exit_threshold"]) for r in sweep
                     if r[k].get("miou") is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=k)
        if k == "confidence":
            for g, m, t in pts:
                ax.annotate(f"{t:g}", (g, m), xytext=(3, 3), textcoords="offset points",
                            fontsize=7)
    ax.set_xlabel("GFLOPs per image (policy included)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("exit rules at matched counts, per exit threshold", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def flow_plot(path: Path, flow: dict[str, Any]) -> Path:
    """Per class: the share of its pixels at each superpatch level and at each exit."""
    plt = _plt()
    import numpy as np

    per_class = flow.get("per_class") or {}
    classes = list(per_class)
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.35 * max(len(classes), 4) + 1.6), dpi=110)
    for ax, key, title in ((axes[0], "level", "superpatch level"),
                           (axes[1], "exit", "exit (final = ran every block)")):
        cols = list(next(iter(per_class.values()))[key]) if classes else []
        left = np.zeros(len(classes))
        cmap = plt.get_cmap("viridis", max(len(cols), 1))
        for j, col in enumerate(cols):
            vals = np.array([per_class[c][key].get(col) or 0.0 for c in classes])
            ax.barh(classes, vals, left=left, color=cmap(j), label=col)
            left += vals
        ax.set_xlim(0, 1)
        ax.set_title(f"share of each class's pixels by {title}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def reliability_plots(folder: Path, halting: dict[str, Any]) -> list[Path]:
    """One reliability diagram per exit (``reliability_exit_<block>.png``): accuracy
    against mean confidence per confidence bin, one curve per group (all images dashed),
    for the tokens that halted there (tuned run) and for every token reaching it (merging
    only). On the diagonal a confidence means what it says; below it, overconfident."""
    plt = _plt()
    from pipelines.analyze.halting import OVERALL

    curves = list(halting["groups"].items())
    if halting.get("overall") is not None and len(curves) > 1:
        curves.append((OVERALL, halting["overall"]))
    cmap = plt.get_cmap("tab10")
    paths = []
    for e in halting["exits"]:
        fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.6), dpi=110, sharey=True)
        for ax, kind, title in ((axes[0], "halted", "tokens halted here (tuned)"),
                                (axes[1], "reaching", "every token reaching it (merging only)")):
            ax.plot([0, 1], [0, 1], color="0.6", lw=0.8)
            for i, (g, f) in enumerate(curves):
                r = f["calibration"][e][kind]
                b = r["bins"]
                pts = [(c, a) for c, a in zip(b["confidence"], b["accuracy"], strict=True)
                       if c is not None]
                if not pts:
                    continue
                ece = "n/a" if r["ece"] is None else f"{r['ece']:.3f}"
                style = dict(color="k", ls="--") if g == OVERALL else dict(color=cmap(i % 10))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                        label=f"{g} (ECE {ece}, {r['count']} tokens)", **style)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xlabel("mean confidence of the bin (max softmax)")
            ax.set_title(f"{e}: {title}", fontsize=9)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="upper left")
            else:  # e.g. no token halted at this exit
                ax.text(0.5, 0.5, "no token", ha="center", va="center", color="0.4")
        axes[0].set_ylabel("accuracy (per labelled pixel)")
        paths.append(_save(fig, Path(folder) / f"reliability_{e}.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
