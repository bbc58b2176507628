"""The pipeline's review page: one self-contained HTML file, ``report.html``, on the parent run.

MLflow 3's artifact viewer shows an ``.html`` artifact in a sandboxed iframe (a blob URL;
scripts allowed, nothing else), so the page carries everything inline: images as base64
``data:`` URIs, its style in ``<style>``, no script and no external file. It is built once
every step is done, from what the steps logged (the report step's ``report/`` artifacts, any
``analysis/`` figures of the step runs) and the pipeline's summary, so that a rerun whose
steps were all skipped (and reuse earlier runs' artifacts) gets its page too.

Links to the runs: the iframe's sandbox allows neither popups nor top-level navigation, so
a link inside the page cannot move the UI. The page still lists every run with its id and
its UI address (absolute for a tracking server, ``#/experiments/...`` otherwise), and the
parent run's description, which the UI renders itself, gets the same links: they work there.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable
from typing import Any

from pipelines.common.errors import InputNotFound
from pipelines.tracking.links import local_ui_base, run_link, server_base
from pipelines.tracking.notes import describe
from pipelines.tracking.pipeline import PipelineRuns, RunView

REVIEW_FILE = "report.html"
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em 2em;
       color: #1f2328; max-width: 1200px; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin-top: 1.6em;
     border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .92em; }
th, td { border: 1px solid #d0d7de; padding: .3em .7em; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f6f8fa; }
td.pct { font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eaeef2; margin: .3em 0; }
figure { margin: .8em 0; } figcaption { color: #57606a; font-size: .85em; }
code { background: #f6f8fa; padding: 0 .25em; border-radius: 3px; }
.muted { color: #57606a; } .facts td, .facts th { text-align: left; }
ul.runs { padding-left: 1.2em; } ul.runs li { margin: .15em 0; }
"""


# ---------------------------------------------------------------------------------------
# small HTML pieces

def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def md_to_html(md: str) -> str:
    """The Markdown the report step writes (pipe tables, plain lines) as HTML.

    Cells like ``12.5 %`` get a background as strong as the share, so that a table of
    shares (per-class halting) reads as a heat map.
    """
    out: list[str] = []
    rows: list[list[str]] = []
    items: list[str] = []

    def flush() -> None:
        if rows:
            head, *body = rows
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head)
                       + "</tr>")
            out.extend("<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in body)
            out.append("</table>")
            rows.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in md.splitlines():
        s = line.strip()
        if s.startswith("|"):
            cells = [c.strip() for c in s.strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
        elif s.startswith(("- ", "* ")):
            items.append(s[2:])
        else:
            flush()
            if s:
                out.append(f"<p>{_inline(s)}</p>")
    flush()
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escaped text with `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _e(text))


def _cell(text: str) -> str:
    m = re.fullmatch(r"(-?[0-9.]+) ?%", text)
    if not m:
        return f"<td>{_inline(text)}</td>"
    share = min(max(float(m.group(1)) / 100, 0.0), 1.0)
    return (f'<td class="pct" style="background: rgba(33, 145, 140, {0.08 + 0.6 * share:.2f})">'
            f"{_e(text)}</td>")


def _img(data: bytes, alt: str) -> str:
    return (f'<img alt="{_e(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(data).decode()}">')


# ---------------------------------------------------------------------------------------
# what the page shows

class Review:
    """Reads the pipeline's runs once; renders the page and the parent's description."""

    def __init__(self, runs: PipelineRuns, parent_run_id: str, summary: dict[str, Any]):
        self.runs = runs
        self.summary = summary or {}
        self.parent = runs.get(parent_run_id)
        if self.parent is None:
            raise InputNotFound(f"parent run {parent_run_id} not found at {runs.tracking_uri}")
        self.tree = runs.tree(parent_run_id)
        self.base = server_base(runs.tracking_uri)
        self._views: dict[str, RunView | None] = {r.run_id: r for r in self.tree}

    # ---- runs ------------------------------------------------------------------------

    def view(self, run_id: str) -> RunView | None:
        if run_id not in self._views:
            self._views[run_id] = self.runs.get(run_id)
        return self._views[run_id]

    def steps(self) -> list[RunView]:
        return [r for r in self.tree if r.depth == 1]

    def source(self, step: RunView) -> RunView:
        """The run holding a step's artifacts: itself, or the run a skipped step reuses."""
        reused = step.tags.get("step.reused_run_id")
        if step.tags.get("step.skipped") == "true" and reused:
            return self.view(reused) or step
        return step

    def step(self, name: str) -> RunView | None:
        found = [r for r in self.steps() if r.tags.get("step.name") == name]
        return found[-1] if found else None  # a resumed step: its last attempt

    def href(self, run: RunView) -> str:
        return self.base + run_link(run.experiment_id, run.run_id)

    # ---- artifacts -------------------------------------------------------------------

    def report_files(self) -> tuple[RunView | None, list[str]]:
        rep = self.step("report")
        if rep is None:
            return None, []
        src = self.source(rep)
        return src, self.runs.artifact_files(src.run_id, "report")

    def analysis(self) -> list[tuple[RunView, str]]:
        """(run, path) of every ``analysis/`` artifact of the steps and the runs below them
        (trials excepted: they log none, and there can be hundreds)."""
        seen: set[str] = set()
        out = []
        for r in self.tree:
            if r.tags.get("step.kind") == "tune-trial":
                continue
            src = self.source(r)
            if src.run_id in seen:
                continue
            seen.add(src.run_id)
            out += [(src, p) for p in self.runs.artifact_files(src.run_id, "analysis")]
        return out

    # ---- the page --------------------------------------------------------------------

    def html(self) -> str:
        name = self.parent.tags.get("step.workflow") or self.parent.name
        parts = [
            "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{_e(name)}: pipeline review</title><style>{STYLE}</style></head><body>",
            f"<h1>Pipeline <code>{_e(name)}</code></h1>",
            f'<p class="muted">parent run <code>{_e(self.parent.run_id)}</code> · '
            f"experiment {_e(self.parent.experiment_id)}</p>",
            self._summary(),
        ]
        rep, files = self.report_files()
        parts.append(self._pareto(rep, files))
        parts.append(self._token_maps(rep, files))
        parts.append(self._halting(rep, files))
        parts.append(self._analysis())
        parts.append(self._runs())
        parts.append("</body></html>")
        return "\n".join(p for p in parts if p)

    def _summary(self) -> str:
        s = self.summary
        out = ["<h2>Baseline vs tuned</h2>"]
        table = s.get("table_md")
        out.append(md_to_html(table) if table else
                   '<p class="muted">no summary (the report step wrote none)</p>')
        facts: list[tuple[str, str]] = []
        unit = "% of the baseline" if s.get("drop_mode") == "relative" else "points"
        if s.get("max_drop") is not None:
            facts.append(("mIoU-drop limit", f"{s['max_drop']} {unit}"))
        if isinstance(s.get("drop_on_reevaluation"), (int, float)):
            facts.append(("mIoU drop on re-evaluation",
                          f"{s['drop_on_reevaluation']:.2f} {unit}, within the limit: "
                          f"{s.get('within_limit_on_reevaluation')}"))
        if isinstance(s.get("drop_vs_plain_vit"), (int, float)):
            facts.append(("mIoU drop against the plain ViT trained on its own",
                          f"{s['drop_vs_plain_vit']:.2f} {unit}, within the limit: "
                          f"{s.get('within_limit_vs_plain_vit')}"))
        worst = s.get("worst_group") or {}
        if worst.get("worst_group") is not None:
            facts.append(("worst group (validation)", f"{worst['worst_group']}: drop "
                          f"{worst['worst_group_drop']:.2f} {unit}"))
        held = s.get("holdout") or {}
        if held.get("worst_group") is not None:
            facts.append(("worst group (held-out images)", f"{held['worst_group']}: drop "
                          f"{held['worst_group_drop']:.2f} {unit}"))
        verdict = s.get("guard_verdict") or []
        if verdict:
            facts.append((f"guard {s.get('guard')}", "; ".join(
                f"{c['name']} {c['value']:.2f} {'<=' if c['ok'] else '>'} {c['limit']:g}"
                for c in verdict)))
        best = s.get("best") or {}
        if best.get("inference"):
            facts.append(("chosen thresholds", ", ".join(
                f"{k} = {v if isinstance(v, str) else json.dumps(v)}"
                for k, v in best["inference"].items())))
        reg = s.get("registered_model")
        if reg:
            facts.append(("registered model", f"models:/{reg['name']}/{reg['version']}"))
        if facts:
            out.append('<table class="facts">' + "".join(
                f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts) + "</table>")
        return "\n".join(out)

    def _pareto(self, rep: RunView | None, files: list[str]) -> str:
        if rep is None or "report/pareto.png" not in files:
            return ""
        return ("<h2>Pareto front</h2><p class='muted'>GFLOPs against mIoU over every trial "
                "of the search: the front, the drop limit and the chosen configuration.</p>"
                + _img(self.runs.read_artifact(rep.run_id, "report/pareto.png"), "Pareto plot"))

    def _token_maps(self, rep: RunView | None, files: list[str]) -> str:
        maps = sorted(f for f in files
                      if f.startswith("report/token_maps/") and f.endswith(".png"))
        if rep is None or not maps:
            return ""
        out = ["<h2>Token maps</h2><p class='muted'>Per validation image: the superpatch "
               "level of every grid cell (1x1 = one 16 x 16 token ... 16x16) and the exit "
               "depth of every cell (blocks its token went through; shallower = halted "
               "earlier).</p>"]
        out += [f"<figure>{_img(self.runs.read_artifact(rep.run_id, p), p)}"
                f"<figcaption>{_e(p)}</figcaption></figure>" for p in maps]
        return "\n".join(out)

    def _halting(self, rep: RunView | None, files: list[str]) -> str:
        path = "report/per_class_halting.md"
        if rep is None or path not in files:
            return ""
        md = self.runs.read_artifact(rep.run_id, path).decode()
        return ("<h2>Per-class halting</h2><p class='muted'>For every class, the share of "
                "its tokens that halted at each exit (tuned model, validation set).</p>"
                + md_to_html(md))

    def _analysis(self) -> str:
        found = self.analysis()
        if not found:
            return ""
        out = ["<h2>Analysis</h2>"]
        others = []
        for run, path in found:
            if path.lower().endswith(".png"):
                out.append(f"<figure>{_img(self.runs.read_artifact(run.run_id, path), path)}"
                           f"<figcaption>{_e(path)} (run {_e(run.name)})</figcaption></figure>")
            else:
                others.append(f"<li><code>{_e(path)}</code> (run <a href='{_e(self.href(run))}'>"
                              f"{_e(run.name)}</a>)</li>")
        if others:
            out.append("<p>Tables and other files:</p><ul>" + "".join(others) + "</ul>")
        return "\n".join(out)

    def _runs(self) -> str:
        where = (f"on the tracking server <code>{_e(self.base)}</code>" if self.base else
                 "relative to the MLflow UI's address (e.g. <code>step ui</code>: "
                 f"{local_ui_base()})")
        out = ["<h2>Runs</h2>",
               f"<p class='muted'>Addresses {where}. In the UI's artifact viewer this page is "
               "sandboxed: use the links in the parent run's description, or copy one.</p>",
               "<ul class='runs'>"]
        trials: list[RunView] = []
        for r in self.tree:
            if r.tags.get("step.kind") == "tune-trial":
                trials.append(r)
                continue
            out.append(self._run_item(r))
        out.append("</ul>")
        if trials:
            out.append(f"<details><summary>{len(trials)} Tune trial runs</summary>"
                       "<ul class='runs'>" + "".join(self._run_item(t) for t in trials)
                       + "</ul></details>")
        return "\n".join(out)

    def _run_item(self, r: RunView) -> str:
        label = r.tags.get("step.name") or r.name
        extra = ""
        reused = r.tags.get("step.reused_run_id")
        if r.tags.get("step.skipped") == "true" and reused:
            src = self.view(reused)
            target = (f"<a href='{_e(self.href(src))}'>{_e(reused)}</a>" if src
                      else f"<code>{_e(reused)}</code>")
            extra = f" · skipped, reuses {target}"
        pad = f" style='margin-left: {1.2 * (r.depth - 1):.1f}em'" if r.depth > 1 else ""
        return (f"<li{pad}><b>{_e(label)}</b> · <a href='{_e(self.href(r))}'>"
                f"<code>{_e(r.run_id)}</code></a> · {_e(r.status)}{extra}</li>")

    # ---- the parent's description -----------------------------------------------------

    def note(self) -> str:
        """The parent's description plus a link per step (these work in the UI)."""
        text = describe(self.parent.tags, self.parent.experiment_id) or ""
        lines = [text, "", "Steps:", ""]
        for r in self.steps():
            label = r.tags.get("step.name") or r.name
            line = f"- **{label}**: [{r.run_id}]({run_link(r.experiment_id, r.run_id)})"
            src = self.source(r)
            if src.run_id != r.run_id:
                line += f", skipped: reuses [{src.run_id}]({run_link(src.experiment_id, src.run_id)})"
            lines.append(line)
        return "\n".join(lines)


def log_review(runs: PipelineRuns, parent_run_id: str, summary: dict[str, Any], *,
               echo: Callable[[str], None] = print) -> str | None:
    """Build the page, log it as ``report.html`` on the parent run, link the steps from the
    parent's description. Returns the artifact path, or None (with a warning line) when it
    failed: the page only presents results that are already logged, so a failure here
    must not turn a finished pipeline into a failed one."""
    try:
        review = Review(runs, parent_run_id, summary)
        runs.log_text(parent_run_id, review.html(), REVIEW_FILE)
        runs.set_note(parent_run_id, review.note())
    except Exception as err:  # noqa: BLE001 - see the docstring
        echo(f"warning: the review page ({REVIEW_FILE}) was not logged: "
             f"{type(err).__name__}: {str(err)[:300]}")
        return None
    return REVIEW_FILE
