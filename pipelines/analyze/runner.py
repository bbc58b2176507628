"""``step analyze`` as a function: every part of the analysis of one checkpoint on one split.

:func:`analyze` returns the JSON document (``layouts``, ``policy_vs_oracle``, ``tradeoff``,
``ablation``, ``flow``); :func:`log_analysis` writes its CSVs, plots and the document to an
MLflow run under ``analysis/``. The operating point (the thresholds of the ``dcts``,
``step`` and ablation figures) is the given inference settings, else the checkpoint's own;
its sharing is always the learned policy: the oracle only appears in the layout curve,
where every row says that it reads the labels.
"""

from __future__ import annotations

import csv
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.analyze.settings import (
    DEFAULT_BUDGETS,
    DEFAULT_PURITIES,
    DEFAULT_SEEDS,
    DEFAULT_THRESHOLDS,
)
from pipelines.common.errors import InvalidInput
from pipelines.common.storage import json_safe
from step_model.config import InferenceConfig, overrides_given

LEARNED = ("threshold", "budget")


def operating_point(own: InferenceConfig, inference: Any = None
                    ) -> tuple[InferenceConfig, str | None]:
    """(the operating point: the checkpoint's settings ``own`` with ``inference``'s changes
    applied, its policy mode a learned one; a note or None).

    The halting and the exit rule of ``inference`` are left out (every part sets its own);
    a checkpoint trained with the oracle (or none) is analysed with its policy network at
    its own merge thresholds, which the note says."""
    given = {k: v for k, v in overrides_given(inference).items()
             if k not in ("halting", "exit_policy")}
    op = own.apply(given)
    note = None
    if op.policy_mode not in LEARNED:
        if "policy_mode" in given:
            raise InvalidInput(f"inference.policy_mode={op.policy_mode!r}: the analysis measures "
                             f"the learned policy at its operating point; use one of "
                             f"{list(LEARNED)}")
        note = (f"the checkpoint's policy mode is {op.policy_mode!r}; the operating point "
                "uses its policy network in mode 'threshold' at its configured thresholds")
        op = op.replace(policy_mode="threshold")
    return op, note


def analyze(checkpoint: str, data: str, *, inference: Any = None,
            max_samples: int | None = None, device: str = "cpu", batch_size: int = 1,
            purities: list[float] | None = None, thresholds: list[float] | None = None,
            budgets: list[float] | None = None, seeds: list[int] | None = None,
            ablation_thresholds: list[float] | None = None, layouts_only: bool = False,
            protocol: Any = None, halting_only: bool = False,
            predicted_layouts: str | None = None,
            echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every part; returns the ``step analyze`` JSON document. ``protocol`` (a
    :class:`pipelines.analyze.measured.ProtocolRequest`): the halting protocol's images
    (None: no halting protocol); ``halting_only``: that protocol alone;
    ``predicted_layouts``: a segmenter checkpoint (``"self"``: ``checkpoint``) whose
    unpruned predictions choose the predicted layouts (:mod:`pipelines.analyze.layouts`)."""
    from pipelines.analyze.ablation import ablation_sweep, confidence_wins, run_ablation
    from pipelines.analyze.flow import FlowMeter
    from pipelines.analyze.layouts import PREDICTED, LayoutSweep, policy_vs_oracle
    from pipelines.analyze.tradeoff import run_tradeoff
    from pipelines.common.checkpoint import load_model
    from pipelines.common.data import batch_to_device, dataset_info, eval_loader

    purities = DEFAULT_PURITIES if purities is None else purities
    thresholds = DEFAULT_THRESHOLDS if thresholds is None else thresholds
    budgets = DEFAULT_BUDGETS if budgets is None else budgets
    seeds = DEFAULT_SEEDS if seeds is None else seeds
    model, _ = load_model(checkpoint, device=device)
    model.eval()
    num_classes = model.cfg.num_classes
    info = dataset_info(data)
    if info.num_classes != num_classes:
        raise InvalidInput(f"{data} has {info.num_classes} classes but the checkpoint "
                         f"{checkpoint} predicts {num_classes}")
    names = list(info.class_names)
    op, note = operating_point(model.inference, inference)
    model.set_inference(op)  # validates the operating point before any pass

    def loader():
        return eval_loader(data, batch_size=batch_size, num_workers=0, rank=0, world_size=1,
                           max_samples=max_samples)

    def batches():
        for images, labels in loader():
            yield batch_to_device(images, labels, device)

    seconds: dict[str, float] = {}
    if halting_only:
        if protocol is None:
            raise ValueError("halting_only needs the protocol's images")
        doc = _document(checkpoint, data, names, op, note, seconds)
        doc["halting_only"] = True
        doc["halting"] = _timed_halting(model, protocol, seconds, num_classes=num_classes,
                                        op=op, batch_size=batch_size,
                                        max_samples=max_samples, device=device, echo=echo)
        doc["num_images"] = (doc["halting"]["overall"] or {}).get("images", 0)
        return json_safe(doc)

    t0 = time.monotonic()
    predict = None if predicted_layouts is None else _unpruned_masks(
        checkpoint if predicted_layouts == "self" else predicted_layouts, num_classes, device)
    sweep = LayoutSweep(model, num_classes, list(purities), list(thresholds), list(budgets),
                        predict=predict)
    for images, labels in batches():
        sweep.update(images, labels)
    layouts = sweep.rows()
    seconds["layouts"] = time.monotonic() - t0
    echo(f"analyze: {len(layouts)} layouts in {seconds['layouts']:.1f}s")
    doc = _document(checkpoint, data, names, op, note, seconds)
    doc.update(num_images=sweep.images, layouts=layouts, policy_vs_oracle=policy_vs_oracle(layouts),
               layouts_only=layouts_only)
    if predict is not None:
        doc.update(predicted_layouts=predicted_layouts,
                   predicted_vs_oracle=policy_vs_oracle(layouts, layouts=(PREDICTED,)))
    if layouts_only:  # only the policy network ran: a stage-1 checkpoint is enough
        doc["operating_point"] = None
        return json_safe(doc)

    t0 = time.monotonic()
    tradeoff = run_tradeoff(model, loader, num_classes=num_classes, op=op, device=device,
                            max_samples=max_samples, class_names=names)
    seconds["tradeoff"] = time.monotonic() - t0
    echo(f"analyze: trade-off (4 variants) in {seconds['tradeoff']:.1f}s")

    t0 = time.monotonic()
    meter = FlowMeter(num_classes, tuple(model.cfg.policy.levels), list(model.exit_blocks),
                      model.encoder.depth, names)
    ablation = run_ablation(model, batches, num_classes=num_classes, inference=op,
                            seeds=list(seeds), on_confidence=lambda out, lab: meter.update(out.flow, lab))
    if not model.exit_blocks:  # no ablation pass: the flow needs its own STEP forwards
        import torch

        model.set_inference(op, halting=True)
        with torch.no_grad():
            for images, labels in batches():
                meter.update(model(images, labels).flow, labels)
    seconds["ablation_and_flow"] = time.monotonic() - t0
    echo(f"analyze: exit ablation and token flow in {seconds['ablation_and_flow']:.1f}s")

    t0 = time.monotonic()
    sweep_rows = ablation_sweep(model, batches, num_classes=num_classes, inference=op,
                                seeds=list(seeds), thresholds=list(ablation_thresholds or []))
    if sweep_rows:
        seconds["ablation_sweep"] = time.monotonic() - t0
        echo(f"analyze: exit ablation at {len(sweep_rows)} more thresholds in "
             f"{seconds['ablation_sweep']:.1f}s")

    doc.update(num_images=meter.images, tradeoff=tradeoff, ablation=ablation,
               ablation_sweep=sweep_rows, confidence_wins=confidence_wins(ablation, sweep_rows),
               flow=meter.result())
    if protocol is not None:
        doc["halting"] = _timed_halting(model, protocol, seconds, num_classes=num_classes,
                                        op=op, batch_size=batch_size,
                                        max_samples=max_samples, device=device, echo=echo)
    return json_safe(doc)


def _unpruned_masks(checkpoint: str, num_classes: int, device: str
                    ) -> Callable[[Any], Any]:
    """images -> the masks of ``checkpoint``'s unpruned forward (the trade-off's ``plain``
    variant: 16-px tokens, no halting)."""
    from pipelines.analyze.tradeoff import variant_inference
    from pipelines.common.checkpoint import load_model, resolve_checkpoint_dir

    ref, _ = load_model(resolve_checkpoint_dir(checkpoint), device=device)
    if ref.cfg.num_classes != num_classes:
        raise InvalidInput(f"predicted_layouts: {checkpoint} predicts {ref.cfg.num_classes} "
                           f"classes, the analysed checkpoint {num_classes}")
    ref.eval().set_inference(variant_inference("plain", ref.inference))
    return lambda images: ref(images).logits.argmax(1)


def _document(checkpoint: str, data: str, names: list[str], op: InferenceConfig,
              note: str | None, seconds: dict[str, float]) -> dict[str, Any]:
    """The document with every part empty (each part fills its own)."""
    return {
        "checkpoint": checkpoint, "data": data, "num_images": 0,
        "class_names": names, "operating_point": {"inference": op.to_dict(), "note": note},
        "layouts": [], "policy_vs_oracle": None,
        "predicted_layouts": None, "predicted_vs_oracle": None,
        "tradeoff": [], "ablation": {}, "ablation_sweep": [], "confidence_wins": None,
        "flow": None, "halting": None,
        "units": {"miou": "fraction of 1 (as step eval)", "gflops": "per image, policy "
                  "network included", "tokens": "per image",
                  "tokens_fraction": "tokens / grid cells over all images",
                  "halting.drop_from_halting": "mIoU points (100 x fraction)",
                  "halting.calibration": "weight = labelled pixels, count = tokens"},
        "uses_labels": {"layouts.oracle": True, "everything else": False},
        "seconds": seconds, "layouts_only": False, "halting_only": False,
    }


def _timed_halting(model, protocol, seconds: dict[str, float], *, echo, **kw) -> dict[str, Any]:
    from pipelines.analyze.measured import run_halting

    t0 = time.monotonic()
    res = run_halting(model, protocol, echo=echo, **kw)
    seconds["halting"] = time.monotonic() - t0
    echo(f"analyze: halting protocol in {seconds['halting']:.1f}s")
    return res


# ---- tables and MLflow -------------------------------------------------------------------

def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    return buf.getvalue()


def tables(doc: dict[str, Any]) -> dict[str, str]:
    """{file name: CSV text} of every part that ran."""
    from pipelines.analyze.halting_report import halting_tables

    out = {name: _csv(*table) for name, table in halting_tables(doc.get("halting")).items()}
    keys = ["layout", "setting", "tokens_fraction", "token_cut", "ceiling_miou", "uses_labels"]
    if doc["layouts"]:
        out["layouts.csv"] = _csv(keys, [[r.get(k) for k in keys] for r in doc["layouts"]])
    keys = ["variant", "miou", "gflops", "gflops_policy", "tokens_mean", "halted_fraction"]
    if doc["tradeoff"]:
        out["tradeoff.csv"] = _csv(keys, [[r.get(k) for k in keys] for r in doc["tradeoff"]])
    abl = doc.get("ablation") or {}
    if "confidence" in abl:
        exits = list(abl["confidence"]["halted_per_exit"])
        rows = [[k, "", abl[k]["miou"], abl[k]["gflops"], abl[k].get("halted_cell_fraction"),
                 *abl[k]["halted_per_exit"].values()] for k in ("confidence", "uniform")]
        rows += [["random", r["seed"], r["miou"], r["gflops"], r.get("halted_cell_fraction"),
                  *r["halted_per_exit"].values()] for r in abl["random"]["seeds"]]
        out["ablation.csv"] = _csv(["exit_policy", "seed", "miou", "gflops",
                                    "halted_cell_fraction", *[f"halted_{e}" for e in exits]], rows)
    sweep = doc.get("ablation_sweep") or []
    if sweep:
        exits = list(sweep[0]["confidence"]["halted_per_exit"])
        out["ablation_sweep.csv"] = _csv(
            ["exit_threshold", "exit_policy", "miou", "miou_std", "gflops",
             "halted_cell_fraction", *[f"halted_{e}" for e in exits]],
            [[r["exit_threshold"], k, r[k]["miou"], r[k].get("miou_std"), r[k]["gflops"],
              r[k].get("halted_cell_fraction"), *r[k]["halted_per_exit"].values()]
             for r in sweep for k in ("confidence", "uniform", "random")])
    flow = doc["flow"]
    if flow is None:  # layouts only
        return out
    out["flow_tokens.csv"] = _csv(
        ["what", "key", "tokens_per_image"],
        [["level", k, v] for k, v in flow["tokens_per_level"].items()]
        + [["block", i + 1, v] for i, v in enumerate(flow["tokens_per_block"])]
        + [["halted", k, v] for k, v in flow["halted_per_exit"].items()])
    per_class = flow.get("per_class") or {}
    if per_class:
        first = next(iter(per_class.values()))
        lv, ex = list(first["level"]), list(first["exit"])
        out["flow_per_class.csv"] = _csv(
            ["class", "pixels", *[f"level_{k}" for k in lv], *ex],
            [[c, v["pixels"], *v["level"].values(), *v["exit"].values()]
             for c, v in per_class.items()])
    return out


def log_analysis(doc: dict[str, Any], tracking_uri: str, run_id: str) -> list[str]:
    """CSVs, plots and the document on run ``run_id`` under ``analysis/``; the headline
    numbers as metrics. Returns the artifact paths."""
    from pipelines.analyze import plots
    from pipelines.analyze.halting_report import halting_metrics
    from pipelines.tracking.runs import RunLogger

    tracker = RunLogger(run_id, tracking_uri)
    logged = []
    for name, text in tables(doc).items():
        tracker.log_text(text, f"analysis/{name}")
        logged.append(f"analysis/{name}")
    tracker.log_dict(doc, "analysis/analysis.json")
    logged.append("analysis/analysis.json")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        figures = [plots.layouts_plot(tmp_path / "layouts.png", doc["layouts"])] \
            if doc["layouts"] else []
        if doc["flow"] is not None:
            figures += [plots.tradeoff_plot(tmp_path / "tradeoff.png", doc["tradeoff"]),
                        plots.flow_plot(tmp_path / "flow_per_class.png", doc["flow"])]
        if "confidence" in (doc.get("ablation") or {}):
            figures.append(plots.ablation_plot(tmp_path / "ablation.png", doc["ablation"]))
        if doc.get("ablation_sweep"):
            figures.append(plots.ablation_sweep_plot(tmp_path / "ablation_sweep.png",
                                                     doc["ablation_sweep"]))
        if doc.get("halting"):
            figures += plots.reliability_plots(tmp_path, doc["halting"])
        for fig in figures:
            tracker.log_artifact(fig, "analysis")
            logged.append(f"analysis/{fig.name}")
    metrics: dict[str, float] = {}
    pvo = (doc["policy_vs_oracle"] or {}).get("value")
    if pvo is not None:
        metrics["policy_vs_oracle"] = pvo
    for r in doc["tradeoff"]:
        for k in ("miou", "gflops"):
            if r.get(k) is not None:
                metrics[f"tradeoff_{r['variant']}_{k}"] = r[k]
    for k in ("confidence", "random", "uniform"):
        v = (doc.get("ablation") or {}).get(k) or {}
        if v.get("miou") is not None:
            metrics[f"ablation_{k}_miou"] = v["miou"]
    if doc.get("confidence_wins") is not None:
        metrics["ablation_confidence_wins"] = float(doc["confidence_wins"])
    metrics.update(halting_metrics(doc.get("halting")))
    tracker.log_metrics(metrics)
    if doc["layouts"]:  # the layout curve's oracle rows read the labels: say so where browsed
        tracker.set_tags({"step.analysis.oracle_rows": "upper bound: uses labels"})
    return logged
