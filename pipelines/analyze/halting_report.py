"""The halting protocol's figures as tables (CSV), MLflow metrics and printed lines.

Rows go group by group (sorted by name), then the overall row, named ``all images``.
"""

from __future__ import annotations

import re
from typing import Any

from pipelines.analyze.halting import COUNTED, OVERALL, SETTINGS

Table = tuple[list[str], list[list[Any]]]


def _rows(halting: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rows = list(halting["groups"].items())
    if halting.get("overall") is not None:
        rows.append((OVERALL, halting["overall"]))
    return rows


def halting_tables(halting: dict[str, Any] | None) -> dict[str, Table]:
    """{file name: (header, rows)}: mIoU of the three settings, halted and active pixels,
    calibration per exit, reliability bins. Empty when the protocol did not run."""
    if not halting:
        return {}
    rows = _rows(halting)
    out: dict[str, Table] = {
        "halting_miou.csv": (["group", "images", *SETTINGS, "drop_from_halting",
                              *(f"gflops_{s}" for s in COUNTED)],
                             [[g, f["images"], *(f["miou"][s] for s in SETTINGS),
                               f["drop_from_halting"], *(f["gflops"][s] for s in COUNTED)]
                              for g, f in rows]),
        "halting_pixels.csv": (
            ["group", "pixels_of", "pixels", "share", "accuracy_tuned", "accuracy_merging_only"],
            [[g, k, v["pixels"], v["share"], v["accuracy_tuned"], v["accuracy_merging_only"]]
             for g, f in rows for k, v in f["pixels"].items()]),
    }
    cal, bins = [], []
    for g, f in rows:
        for exit_name, kinds in f["calibration"].items():
            for kind, r in kinds.items():
                cal.append([g, exit_name, kind, r["count"], r["weight"], r["ece"],
                            r["mean_confidence"], r["accuracy"]])
                b = r["bins"]
                for i in range(len(b["count"])):
                    bins.append([g, exit_name, kind, i, b["edges"][i], b["edges"][i + 1],
                                 b["count"][i], b["weight"][i], b["confidence"][i],
                                 b["accuracy"][i]])
    out["calibration.csv"] = (["group", "exit", "tokens", "tokens_count", "pixels", "ece",
                               "mean_confidence", "accuracy"], cal)
    out["reliability.csv"] = (["group", "exit", "tokens", "bin", "lo", "hi", "tokens_count",
                               "pixels", "mean_confidence", "accuracy"], bins)
    return out


def _metric_name(*parts: str) -> str:
    # MLflow keys allow letters, digits, _ - . / and space; a group is any string
    return "_".join(re.sub(r"[^A-Za-z0-9_.\-/]", "_", p) for p in parts)


def halting_metrics(halting: dict[str, Any] | None) -> dict[str, float]:
    """Per group (and ``all``): each setting's mIoU, the drop from halting, the halted
    pixels' share, each exit's ECE over its halted tokens and over all tokens reaching it."""
    out: dict[str, float] = {}
    for g, f in _rows(halting) if halting else []:
        name = "all" if g == OVERALL else g
        vals = {**{f"{s}_miou": f["miou"][s] for s in SETTINGS},
                "drop_from_halting": f["drop_from_halting"],
                "gflops_tuned": f["gflops"]["tuned"],
                "halted_pixel_share": f["pixels"]["halted"]["share"]}
        for e, kinds in f["calibration"].items():
            for kind, r in kinds.items():
                vals[f"{e}_ece_{kind}"] = r["ece"]
        out.update({_metric_name("halting", name, k): float(v) for k, v in vals.items()
                    if v is not None})
    return out


def _p(v: float | None, scale: float = 100.0, digits: int = 2) -> str:
    return "n/a" if v is None else f"{scale * v:.{digits}f}"


def summary_lines(halting: dict[str, Any] | None) -> list[str]:
    """The printed summary: one table per part, a row per group."""
    if not halting:
        return []
    sets = "; ".join(f"{s['data']}" + (f" (groups {', '.join(s['groups'])})" if s["groups"]
                                       else "") + f": {s['images']} images"
                     for s in halting.get("sets", []))
    tuned = halting["inference"]["tuned"]
    lines = [f"halting protocol (exits {tuned['exit_thresholds']}, top_k {tuned['top_k']}, "
             f"policy {tuned['policy_mode']}; groups by {halting.get('group_by')}); {sets}",
             f"  {'group':<14}{'images':>7}{'plain':>8}{'merging':>9}{'tuned':>8}"
             f"{'drop from halting':>19}{'GFLOPs plain / tuned':>22}"]
    rows = _rows(halting)
    for g, f in rows:
        m = f["miou"]
        drop = "n/a" if f["drop_from_halting"] is None else f"{f['drop_from_halting']:.2f}"
        gf = f.get("gflops") or {}
        cost = ("n/a" if gf.get("tuned") is None else
                f"{gf['plain']:.3f} / {gf['tuned']:.3f}")
        lines.append(f"  {g:<14}{f['images']:>7}{_p(m['plain']):>8}{_p(m['merging_only']):>9}"
                     f"{_p(m['tuned']):>8}{drop:>19}{cost:>22}")
    lines.append("  pixels (share of labelled pixels: accuracy tuned / merging only, %):")
    for g, f in rows:
        parts = [f"{k} {_p(v['share'], digits=1)} %: {_p(v['accuracy_tuned'], digits=1)} / "
                 f"{_p(v['accuracy_merging_only'], digits=1)}"
                 for k, v in f["pixels"].items() if k in ("halted", "active")]
        lines.append(f"  {g:<14}" + "; ".join(parts))
    if halting["exits"]:
        lines.append("  exits, ECE (mean confidence / accuracy): halted tokens | every token "
                     "reaching the exit (merging only):")
    for g, f in rows:
        for e, kinds in f["calibration"].items():
            h, r = kinds["halted"], kinds["reaching"]
            lines.append(
                f"  {g:<14}{e:<8} {_p(h['ece'], 1, 3)} ({_p(h['mean_confidence'], 1, 3)} / "
                f"{_p(h['accuracy'], 1, 3)}, {h['count']} tokens) | {_p(r['ece'], 1, 3)} "
                f"({_p(r['mean_confidence'], 1, 3)} / {_p(r['accuracy'], 1, 3)})")
    return lines
