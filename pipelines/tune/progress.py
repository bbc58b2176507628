"""What the user sees while a search runs: one line per finished trial, and trial errors
as ``Type: message`` (from a Ray error or a trial's error file)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from pipelines.common.progress import duration
from pipelines.tune.space import SearchSpace

# ``pydantic_core._pydantic_core.ValidationError: ...`` -> ("ValidationError", ": ...")
_EXC_LINE = re.compile(
    r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt))\b(.*)$")


def error_summary(error: BaseException | str | None) -> str:
    """The exception a trial died of, as ``Type: message``, from a Ray error or the text
    of a trial's error file (whose traceback and Ray wrapper lines are dropped)."""
    if error is None:
        return "unknown error"
    cause = getattr(error, "cause", None)  # RayTaskError / RayActorError
    if isinstance(cause, BaseException):
        error = cause
    if isinstance(error, BaseException) and not type(error).__name__.startswith(
            ("RayTaskError", "TuneError")):
        return f"{type(error).__name__}: {error}".strip()[:4000]
    lines = [ln.rstrip() for ln in str(error).strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        m = _EXC_LINE.match(lines[i])
        if m and not m.group(1).startswith(("RayTaskError", "TuneError")):
            rest = "\n".join([m.group(1) + m.group(2), *lines[i + 1:]])
            return rest.strip()[:4000]
    return next((ln for ln in reversed(lines) if ln.strip()), "unknown error")[:4000]


def trial_error(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        return error_summary(Path(path).read_text(errors="replace"))
    return "trial error (no error file)"


def _short(params: dict[str, Any]) -> str:
    """``exit=0.9,0.8 merge=0.5 top_k=5``: a trial's parameters on one line."""
    groups: dict[str, list[str]] = {}
    for name, value in params.items():
        key = {"exit_threshold": "exit", "merge_threshold": "merge"}.get(
            re.sub(r"_\d+$", "", name), name)
        groups.setdefault(key, []).append(f"{value:g}" if isinstance(value, float)
                                          else str(value))
    return " ".join(f"{k}={','.join(v)}" for k, v in groups.items() if k != "exit_policy")


def progress_callback(total: int, space: SearchSpace, start: float):
    """One line per finished trial: ``trial 3/24: exit=.. merge=.. miou=.. gflops=..
    (elapsed 1m05s, ETA 7m30s)``; failed trials print their error instead."""
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self) -> None:
            self.done = 0
            self.before = 0  # trials a resumed search had finished before this process
            self.errors: dict[str, str] = {}

        def _line(self, trial, tail: str) -> None:
            self.done += 1
            elapsed = time.monotonic() - start
            eta = elapsed / (self.done - self.before) * max(0, total - self.done)
            try:
                params = _short(space.normalise(trial.config))
            except Exception:  # a config the space cannot read: show the error anyway
                params = ""
            print(f"trial {self.done}/{total}: {params} {tail} "
                  f"(elapsed {duration(elapsed)}, ETA {duration(eta)})", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            if "miou" not in r:
                self._line(trial, "FAILED: reported no metrics")
                return
            self._line(trial, f"miou={100 * r['miou']:.2f} drop={r['drop']:.2f} "
                              f"gflops={r['gflops']:.3f}"
                              + ("" if r.get("feasible") else " (infeasible)"))

        def on_trial_error(self, iteration, trials, trial, **info):
            err = trial_error(trial)
            self.errors[trial.trial_id] = err
            one_line = " ".join(err.split())
            self._line(trial, "FAILED: " + (one_line[:160] + "..." if len(one_line) > 160
                                            else one_line))

        def get_state(self) -> dict[str, Any]:  # a resumed search counts on
            return {"done": self.done, "errors": dict(self.errors)}

        def set_state(self, state: dict[str, Any]) -> None:
            self.done = self.before = state["done"]
            self.errors = dict(state["errors"])

    return Progress()
