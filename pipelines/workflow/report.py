"""The pipeline's report: what a reader of the MLflow run needs to judge the tuned model.

Artifacts logged on the report step's run (all under ``report/``):

* ``summary.md`` / ``summary.csv``: baseline (the same checkpoint, unpruned) and, when the
  pipeline trained one, the plain ViT trained on its own, against the tuned STEP model:
  mIoU, GFLOPs, tokens, halted %, latency, from the ``evaluate`` step's re-evaluation on
  the validation set; the drop against both, the guard's verdict check by check, and mIoU
  and drop per group (validation and held-out images) with the worst group;
* ``pareto.png`` / ``pareto.csv``: GFLOPs against mIoU over all search trials, the front,
  the drop limit and the chosen configuration;
* ``token_maps/<i>.png``: for a few validation images, the image, the superpatch level of
  every grid cell (1 = a single 16 x 16 token ... 16) and the exit depth of every cell
  (the number of blocks its token went through; shallower = halted earlier), over the image;
* ``per_class_halting.md`` / ``.csv``: for every class, which share of its tokens halted at
  each exit (and ran to the end), from the tuned evaluation.

Everything is computed from result dicts plus one forward pass per shown image; nothing
re-runs the search or the evaluation.
"""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path
from typing import Any

ROWS = (("baseline", "baseline (unpruned)"), ("plain_vit", "plain ViT (trained on its own)"),
        ("tuned", "tuned STEP"))
COLUMNS = (("miou", "mIoU (%)"), ("gflops", "GFLOPs"), ("tokens_mean", "tokens"),
           ("halted_fraction", "halted (%)"), ("latency_ms", "latency (ms)"))


def _fmt(key: str, v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    if key in ("miou", "halted_fraction"):
        return f"{100 * v:.2f}"
    if key == "gflops":
        return f"{v:.3f}"
    return f"{v:.1f}"


def summary_rows(eval_doc: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, label in ROWS:
        m = eval_doc.get(key)
        if m:
            rows.append({"model": label, **{k: m.get(k) for k, _ in COLUMNS}})
    return rows


def summary_table(eval_doc: dict[str, Any]) -> str:
    """Baseline vs tuned, as a Markdown table (also printed by ``step run``)."""
    rows = summary_rows(eval_doc)
    head = ["model", *[h for _, h in COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["model"], *[_fmt(k, r[k]) for k, _ in COLUMNS]]) + " |")
    b, t = eval_doc.get("baseline"), eval_doc.get("tuned")
    if b and t and t.get("gflops"):
        lines.append("")
        lines.append(f"GFLOPs reduction: {b['gflops'] / t['gflops']:.2f}x; mIoU drop: "
                     f"{100 * (b['miou'] - t['miou']):.2f} points"
                     + _against("the STEP network run unshared", eval_doc.get("vs_unshared")))
        vit, vs = eval_doc.get("plain_vit"), eval_doc.get("vs_plain_vit")
        if vit and vs:
            lines.append(f"against the plain ViT trained on its own (mIoU "
                         f"{100 * vit['miou']:.2f}, {vit['gflops']:.3f} GFLOPs): GFLOPs "
                         f"reduction {vit['gflops'] / t['gflops']:.2f}x; mIoU drop "
                         f"{vs['drop']:.2f} [{vs['drop_lo']:.2f}, {vs['drop_hi']:.2f}] "
                         f"({'within' if vs['within_limit'] else 'BEYOND'} the limit)")
    elif b and not t:
        lines.append("")
        lines.append("no tuned model: no configuration met the mIoU-drop limit")
    if b and b.get("majority_miou") is not None:
        lines.append(f"majority-class predictor (the split's most frequent class everywhere): "
                     f"{100 * b['majority_miou']:.2f} mIoU; the baseline scores "
                     f"{b['miou'] / b['majority_miou']:.1f}x that")
    from pipelines.workflow.holdout import holdout_line

    line = holdout_line(eval_doc.get("holdout"))
    if line:
        lines += ["", line]
    return "\n".join(lines)


def _against(name: str, c: dict[str, Any] | None) -> str:
    if not c:
        return ""
    return (f" [{c['drop_lo']:.2f}, {c['drop_hi']:.2f}] against {name}"
            + (f"; on the worst {c['tail']['fraction']:g} of the images "
               f"({c['tail']['images']}): {c['tail']['drop']:.2f}"
               if (c.get("tail") or {}).get("drop") is not None else ""))


def groups_md(eval_doc: dict[str, Any]) -> str | None:
    """mIoU and drop per group (validation images, then held-out images), the worst group
    marked; None without groups."""
    sections = []
    for title, doc in (("validation", eval_doc),
                       ("held-out images", _holdout_as_eval(eval_doc.get("holdout")))):
        vs = (doc or {}).get("vs_unshared") or {}
        if not vs.get("groups"):
            continue
        vit = (doc or {}).get("vs_plain_vit") or {}
        head = ["group", "images", "unshared mIoU", "tuned mIoU", "drop"]
        if vit.get("groups"):
            head += ["plain ViT mIoU", "drop vs plain ViT"]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for g, f in vs["groups"].items():
            mark = " (worst)" if g == vs.get("worst_group") else ""
            cells = [f"{g}{mark}", str(f["images"]), _pct(f["reference_miou"]),
                     _pct(f["miou"]), f"{f['drop']:.2f}"]
            v = (vit.get("groups") or {}).get(g)
            if vit.get("groups"):
                cells += [_pct(v["reference_miou"]), f"{v['drop']:.2f}"] if v else ["-", "-"]
            rows.append("| " + " | ".join(cells) + " |")
        sections.append(f"per group, {title}:\n" + "\n".join(rows))
    return "\n\n".join(sections) or None


def _holdout_as_eval(check: dict[str, Any] | None) -> dict[str, Any] | None:
    """The held-out check's figures in the shape of the evaluation's comparisons."""
    if not check or check.get("drop") is None:
        return None
    return {"vs_unshared": check, "vs_plain_vit": check.get("vs_plain_vit")}


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}" if isinstance(v, (int, float)) else "-"


def guard_lines(tune_doc: dict[str, Any]) -> list[str]:
    """The guard's verdict on the chosen trial: each check, its figure and its limit."""
    verdict = tune_doc.get("guard_verdict") or []
    if not verdict:
        return []
    best = tune_doc.get("best") is not None
    tail = ((tune_doc.get("guard_config") or {}).get("tail") or {}).get("fraction")
    names = {"drop": "point drop", "interval": "upper end of the interval",
             "tail": f"drop on the worst {tail:g} of the images" if tail else "tail drop",
             "worst_group": "worst group's drop",
             "cliff": "steepest step to a neighbour beyond the limit"}
    head = (f"guard {tune_doc.get('guard')}: "
            + ("the chosen configuration passes every check" if best else
               "no configuration passes; the closest one"))
    return [head] + [f"- {names.get(c['name'], c['name'])}: {c['value']:.2f} "
                     f"{'<=' if c['ok'] else '>'} {c['limit']:g}" for c in verdict]


def choices_lines(tune_doc: dict[str, Any]) -> list[str]:
    """The search's two answers (point-drop rule, guarded rule) with their GFLOPs."""
    out = []
    for name in ("plain", "guarded"):
        t = tune_doc.get(name)
        if name not in tune_doc:
            continue
        chosen = t is not None and (tune_doc.get("best") or {}).get("trial_id") == t.get(
            "trial_id") and (tune_doc.get("guard", "none") == "none") == (name == "plain")
        text = "none within the limit" if t is None else (
            f"{t['gflops']:.3f} GFLOPs, mIoU {100 * t['miou']:.2f}, drop {t['drop']:.2f}"
            + (f" [{t['drop_lo']:.2f}, {t['drop_hi']:.2f}]" if t.get("drop_hi") is not None
               else "") + (f" on {t['num_images']} images" if t.get("num_images") else ""))
        rule = "point drop" if name == "plain" else (
            "upper end of the interval" if tune_doc.get("guard") in ("ci", "none", None)
            else f"guard {tune_doc['guard']}")
        out.append(f"- {name} choice ({rule} within the limit): {text}"
                   + (" (chosen)" if chosen else ""))
    return out


def summary_csv(eval_doc: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", *[k for k, _ in COLUMNS]])
    for r in summary_rows(eval_doc):
        w.writerow([r["model"], *[r[k] for k, _ in COLUMNS]])
    return buf.getvalue()


def per_class_halting_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(header, rows): per class, the share of its tokens halted at each exit."""
    pch = metrics.get("per_class_halting")
    if not pch:
        return [], []
    names = metrics.get("class_names")
    if isinstance(pch, dict):
        items = list(pch.items())
    else:  # list indexed by class
        items = [(names[i] if names and i < len(names) else str(i), v) for i, v in enumerate(pch)]
    exits: list[str] = []
    for _, v in items:
        if isinstance(v, dict):
            exits += [k for k in v if k not in exits]
    if not exits:
        n = max((len(v) for _, v in items if isinstance(v, (list, tuple))), default=0)
        exits = [f"exit_{i + 1}" for i in range(n)]
    rows = []
    for cls, v in items:
        vals = [v.get(e) for e in exits] if isinstance(v, dict) else list(v) + [None] * (
            len(exits) - len(v))
        rows.append([cls, *vals])
    return ["class", *exits], rows


def per_class_halting_md(metrics: dict[str, Any]) -> str:
    header, rows = per_class_halting_rows(metrics)
    if not rows:
        return "no per-class halting figures (the model has no exits, or halting is off)"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([str(r[0]), *[
            f"{100 * x:.1f} %" if isinstance(x, (int, float)) else "-" for x in r[1:]]]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# token maps

def token_map_figure(path: str | Path, image, cell_level, cell_exit_depth, depth: int,
                     title: str = "") -> Path:
    """Image | superpatch level per cell | exit depth per cell (both over the image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    img = np.asarray(image)
    h, w = img.shape[:2]
    level = np.asarray(cell_level, dtype=float)
    depth_map = np.asarray(cell_exit_depth, dtype=float)
    extent = (0, w, h, 0)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.9), dpi=110)
    axes[0].imshow(img)
    axes[0].set_title("image")
    axes[1].imshow(img)
    # one discrete colour per level: log2(level) = 0..4 -> bins centred on integers
    levels = matplotlib.colors.ListedColormap(
        ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"])
    norm = matplotlib.colors.BoundaryNorm([-0.5, 0.5, 1.5, 2.5, 3.5, 4.5], levels.N)
    im1 = axes[1].imshow(np.log2(np.maximum(level, 1)), extent=extent, alpha=0.55,
                         cmap=levels, norm=norm, interpolation="nearest")
    axes[1].set_title("superpatch level per cell")
    cb1 = fig.colorbar(im1, ax=axes[1], fraction=0.046, ticks=[0, 1, 2, 3, 4])
    cb1.ax.set_yticklabels(["1x1", "2x2", "4x4", "8x8", "16x16"])
    axes[2].imshow(img)
    im2 = axes[2].imshow(depth_map, extent=extent, alpha=0.55, cmap="magma",
                         vmin=0, vmax=depth, interpolation="nearest")
    axes[2].set_title("exit depth per cell (blocks run)")
    fig.colorbar(im2, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def token_maps(checkpoint: str, val_data: str, inference: dict[str, Any] | None,
               out_dir: Path, num_images: int) -> list[Path]:
    """Run the tuned model (``inference``: its settings, or changes to the checkpoint's) on
    the first ``num_images`` validation images; one figure each."""
    import torch

    from pipelines.common.checkpoint import load_model
    from pipelines.common.data import batch_to_device, eval_loader

    if num_images <= 0:
        return []
    model, _ = load_model(checkpoint)
    model.set_inference(inference)
    loader = eval_loader(val_data, batch_size=1, num_workers=0, rank=0, world_size=1)
    paths = []
    with torch.no_grad():
        for i, (images, labels) in enumerate(loader):
            if i >= num_images:
                break
            images, labels = batch_to_device(images, labels, "cpu")
            out = model(images, labels)
            flow = out.flow
            img = (images[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype("uint8")
            tokens = int(flow.num_tokens[0])
            paths.append(token_map_figure(
                out_dir / f"{i:02d}.png", img, flow.cell_level[0].cpu().numpy(),
                flow.cell_exit_depth[0].cpu().numpy(), depth=len(flow.tokens_per_block[0]),
                title=f"val image {i}: {tokens} tokens of {flow.tokens_in}"))
    return paths


def report_selection(tune_doc: dict[str, Any]):
    """The search's trials selected as the search did: by the guard's checks as configured
    (``guard_config``; its name is ``custom`` for anything but a preset), the answers after
    confirmation marked where the search saw them."""
    from pipelines.tune.pareto import mark_choices, select

    trials = tune_doc.get("trials") or []
    selection = select(trials, tune_doc["baseline"]["miou"], tune_doc["max_drop"],
                       tune_doc["drop_mode"],
                       tune_doc.get("guard_config") or tune_doc.get("guard", "none"))
    if "plain" in tune_doc:
        selection = mark_choices(selection, trials, tune_doc.get("best"), tune_doc.get("plain"))
    return selection


# ---------------------------------------------------------------------------------------

def build_report(*, run_id: str, tracking_uri: str, tune_doc: dict[str, Any],
                 eval_doc: dict[str, Any], checkpoint: str, val_data: str,
                 num_images: int, allow_oracle: bool = False,
                 note: str | None = None) -> dict[str, Any]:
    """Write every artifact to the report run; return the summary (what ``--json`` shows).

    A tuned model that selects tokens with the label oracle is refused unless
    ``allow_oracle``; then the summary and the run say it is an upper bound."""
    from pipelines.common.oracle import ORACLE_NOTE, ORACLE_TAGS, refuse_oracle, uses_oracle
    from pipelines.tracking.runs import RunLogger
    from pipelines.tune.pareto import pareto_plot, trials_csv

    inference = eval_doc.get("inference") or (tune_doc.get("best") or {}).get("inference")
    oracle = uses_oracle(checkpoint, inference)
    if oracle and not allow_oracle:
        refuse_oracle("report", "tune.allow_oracle: true (--allow-oracle)")
    tracker = RunLogger(run_id, tracking_uri)
    if oracle:
        tracker.set_tags(ORACLE_TAGS)
        tracker.log_text(ORACLE_NOTE + "\n", "report/UPPER_BOUND.txt")
    table = summary_table(eval_doc)
    choices = choices_lines(tune_doc)
    if choices:
        table += "\n\nthe search's answers:\n" + "\n".join(choices)
    verdict = guard_lines(tune_doc)
    if verdict:
        table += "\n\n" + "\n".join(verdict)
    per_group = groups_md(eval_doc)
    if per_group:
        table += "\n\n" + per_group
    if note:
        table = f"{note.strip()}\n\n{table}"
    if oracle:
        table = f"**{ORACLE_NOTE}**\n\n{table}"
    tracker.log_text(table, "report/summary.md")
    tracker.log_text(summary_csv(eval_doc), "report/summary.csv")

    trials = tune_doc.get("trials") or []
    baseline = tune_doc["baseline"]
    selection = report_selection(tune_doc)
    tracker.log_text(trials_csv(trials, selection), "report/pareto.csv")
    tuned_metrics = eval_doc.get("tuned") or {}
    tracker.log_text(per_class_halting_md(tuned_metrics), "report/per_class_halting.md")
    header, rows = per_class_halting_rows(tuned_metrics)
    if rows:
        buf = io.StringIO()
        csv.writer(buf).writerows([header, *rows])
        tracker.log_text(buf.getvalue(), "report/per_class_halting.csv")

    maps: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        pareto_plot(tmp_path / "pareto.png", trials, selection, baseline)
        tracker.log_artifact(tmp_path / "pareto.png", "report")
        (tmp_path / "maps").mkdir()
        for p in token_maps(checkpoint, val_data, inference, tmp_path / "maps", num_images):
            tracker.log_artifact(p, "report/token_maps")
            maps.append(f"report/token_maps/{p.name}")

    best = tune_doc.get("best")
    return {
        "max_drop": tune_doc["max_drop"],
        "drop_mode": tune_doc["drop_mode"],
        "baseline": eval_doc.get("baseline") and {
            k: eval_doc["baseline"].get(k) for k, _ in COLUMNS},
        "tuned": eval_doc.get("tuned") and {k: eval_doc["tuned"].get(k) for k, _ in COLUMNS},
        "search": {"baseline": baseline, "best": best, "message": tune_doc.get("message")},
        "best": best and {"miou": best["miou"], "gflops": best["gflops"],
                          "params": best["params"], "inference": best.get("inference")},
        "pareto": tune_doc.get("pareto", []),
        "registered_model": tune_doc.get("registered_model"),
        "drop_on_reevaluation": eval_doc.get("drop"),
        "within_limit_on_reevaluation": eval_doc.get("within_limit"),
        "guard": tune_doc.get("guard"),
        "guard_verdict": tune_doc.get("guard_verdict"),
        "plain_vit": eval_doc.get("plain_vit") and {
            k: eval_doc["plain_vit"].get(k) for k, _ in COLUMNS},
        "drop_vs_plain_vit": (eval_doc.get("vs_plain_vit") or {}).get("drop"),
        "within_limit_vs_plain_vit": (eval_doc.get("vs_plain_vit") or {}).get("within_limit"),
        "worst_group": {k: (eval_doc.get("vs_unshared") or {}).get(k)
                        for k in ("worst_group", "worst_group_drop")},
        "plain": tune_doc.get("plain"),
        "guarded": tune_doc.get("guarded"),
        "holdout": eval_doc.get("holdout"),
        "table_md": table,
        "token_maps": maps,
        "report_run_id": run_id,
        "uses_labels": oracle,
        "upper_bound": oracle,
    }
