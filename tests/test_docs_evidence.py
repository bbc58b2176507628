"""Every run record a doc quotes (`docs/runs/...`) is in the repository, or listed as lost.

The records were once written under a folder that `.gitignore` matched: docs quoted files that
no clone had. This keeps a new record from going the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORDS = REPO / "docs" / "runs"
REFERENCE = re.compile(r"docs/runs/([A-Za-z0-9_.{},/-]*[A-Za-z0-9_}/])")
BRACES = re.compile(r"\{([^{}]*)\}")


def _expand(name: str) -> list[str]:
    """`a.{py,json}` -> `a.py`, `a.json` (the shell's brace form the docs use)."""
    match = BRACES.search(name)
    if match is None:
        return [name]
    head, tail = name[: match.start()], name[match.end() :]
    return [out for alt in match.group(1).split(",") for out in _expand(head + alt + tail)]


def _lost() -> set[str]:
    text = (RECORDS / "README.md").read_text()
    section = text.split("## Not in the repository", 1)[1]
    return {line[2:].strip().rstrip("/") for line in section.splitlines() if line.startswith("- ")}


def _references() -> dict[str, set[str]]:
    docs = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    found: dict[str, set[str]] = {}
    for doc in docs:
        for raw in REFERENCE.findall(doc.read_text()):
            for name in _expand(raw):
                found.setdefault(name.rstrip("/"), set()).add(str(doc.relative_to(REPO)))
    return found


def test_every_quoted_record_is_committed_or_listed_as_lost() -> None:
    lost = _lost()
    missing = {
        name: sorted(docs)
        for name, docs in _references().items()
        if not (RECORDS / name).exists() and name.split("/")[0] not in lost
    }
    assert not missing, f"docs quote run records that no clone has: {missing}"


def test_the_lost_list_names_only_records_that_are_absent() -> None:
    # A record that turns up again should leave the list, so the list stays the truth.
    back = sorted(name for name in _lost() if (RECORDS / name).exists())
    assert not back, f"listed as lost but present: {back}"


def test_records_are_not_ignored_by_git() -> None:
    patterns = (REPO / ".gitignore").read_text().split()
    assert "runs/" not in patterns and "docs/" not in patterns, (
        "an unanchored `runs/` in .gitignore also ignores docs/runs"
    )
