"""Shipped search spaces for ``step tune`` (YAML data; loaded by ``pipelines.tune.space``).

* ``exits_only``: exit thresholds per head and top-k; merging stays as the checkpoint has it.
* ``merge_only``: merge thresholds per superpatch level; exits stay as the checkpoint has them.
* ``joint``: both at once (the STEP setting).
* ``halting_scores``: a shared exit threshold and the exit score it is compared with.
* ``tiny``: a 2-D joint space small enough to grid exhaustively (tests, the demo).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    """Names of the shipped spaces (file stems)."""
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def space_path(name: str) -> Path | None:
    """Path of the shipped space ``name`` (with or without ``.yaml``), or None."""
    stem = name[:-5] if name.endswith(".yaml") else name
    path = HERE / f"{stem}.yaml"
    return path if path.is_file() and "/" not in stem else None
