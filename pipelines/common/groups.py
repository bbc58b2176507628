"""Groups of samples: the recordings, cities or conditions a dataset's images come from.

``data.groups`` says how a sample key falls into a group: a regular expression searched in
the key (``{pattern: "^([^_]+)_"}``: CamVid's recording prefix, ``0001TP_006690`` ->
``0001TP``; ``{pattern: "^([^/]+)/"}``: a Cityscapes city), whose first capture group (or
whole match, without one) names the group; or a column of ``step prep``'s
``manifest.parquet`` (``{column: height}``: images of one size). A key the pattern does not
match falls into :data:`UNMATCHED`, which every figure reports like any other group, so
that a wrong pattern shows instead of silently merging images.

Groups serve two purposes: figures per group (evaluation, every trial, the report: a mean
over images hides a condition the model fails on), and holding whole groups out
(``data.holdout.groups``): a held-out *group* measures a change of conditions, a held-out
fraction of val only new frames of known ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from pydantic import Field, field_validator, model_validator

from pipelines.common.errors import InvalidInput
from pipelines.common.settings import StrictModel

UNMATCHED = "(unmatched)"
# manifest columns that hold one scalar per sample (the class histogram does not)
SCALAR_COLUMNS = ("split", "shard", "key", "height", "width", "image_ext")


class Groups(StrictModel):
    """Exactly one of ``pattern`` (a regex over sample keys) or ``column`` (a manifest
    column)."""

    pattern: str | None = Field(None, description="regex searched in each sample key; its "
                                "first group (or the whole match) names the key's group")
    column: str | None = Field(None, description=f"a manifest.parquet column: one of "
                               f"{', '.join(SCALAR_COLUMNS)}")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as err:
                raise ValueError(f"not a regular expression ({err})") from None
        return v

    @field_validator("column")
    @classmethod
    def _scalar(cls, v: str | None) -> str | None:
        if v is not None and v not in SCALAR_COLUMNS:
            raise ValueError(f"must be one of {list(SCALAR_COLUMNS)} (a scalar manifest "
                             f"column), got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_of(self) -> Groups:
        if (self.pattern is None) == (self.column is None):
            raise ValueError("give exactly one of pattern (a regex over sample keys, e.g. "
                             "'^([^_]+)_') or column (a manifest column)")
        return self

    def describe(self) -> str:
        return f"key pattern {self.pattern!r}" if self.pattern else f"column {self.column!r}"


def group_of_key(pattern: str, key: str) -> str:
    m = re.search(pattern, key)
    if m is None:
        return UNMATCHED
    return m.group(1) if m.re.groups else m.group(0)


def as_groups(value) -> Groups | None:
    if value is None or isinstance(value, Groups):
        return value
    return Groups.model_validate(value)


def key_grouper(uri: str, groups) -> Callable[[str], str]:
    """key -> group for the samples of the shard directory ``uri`` (any split; a directory,
    not a manifest or shard pattern: ``pipelines.common.data.resolve_data_uri`` gives it).
    A pattern needs no I/O; a column reads the manifest once."""
    g = as_groups(groups)
    if g is None:
        raise InvalidInput("no groups defined (data.groups)")
    if g.pattern is not None:
        pattern = g.pattern
        return lambda key: group_of_key(pattern, key)
    table = _manifest(uri, ["key", g.column])  # type: ignore[list-item]
    lookup = {k: str(v) for k, v in zip(table.column("key").to_pylist(),
                                         table.column(g.column).to_pylist(), strict=True)}
    return lambda key: lookup.get(key, UNMATCHED)


def split_groups(uri: str, split: str, groups) -> dict[str, str]:
    """{key: group} of every sample of ``split`` in the shard directory ``uri``, in
    manifest order."""
    grouper = key_grouper(uri, groups)
    table = _manifest(uri, ["split", "key"])
    return {k: grouper(k) for s, k in zip(table.column("split").to_pylist(),
                                          table.column("key").to_pylist(), strict=True)
            if s == split}


def group_counts(key_groups: Iterable[str]) -> dict[str, int]:
    """{group: images}, groups sorted by name (a stable order for every report)."""
    counts: dict[str, int] = {}
    for g in key_groups:
        counts[g] = counts.get(g, 0) + 1
    return dict(sorted(counts.items()))


def _manifest(root: str, columns: list[str]):
    import io

    import pyarrow.parquet as pq

    from data_prep import storage

    return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(root, "manifest.parquet"))),
                         columns=columns)
