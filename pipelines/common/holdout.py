"""Validation images the threshold search never sees (``data.holdout``, ``tune.holdout``).

Either a whole split (``{split: test}``), or a fixed fraction of the validation split
(``{fraction: 0.3}``) chosen by a hash of each sample's key: a key is held out when the
first 8 bytes of ``sha256(key)``, read as a fraction of 2**64, fall below ``fraction``.
A hash, not a seeded shuffle, because the choice of one image must not depend on which
other images exist, on their order, on the number of shards or on the Python version:
adding images to the split, resharding or raising ``fraction`` never moves an image from
the held-out part back into the searched part.
"""

from __future__ import annotations

import hashlib

from pydantic import Field, model_validator

from pipelines.common.settings import StrictModel


class Holdout(StrictModel):
    """Exactly one of ``split`` or ``fraction``."""

    split: str | None = Field(None, description="a split the search never reads, e.g. test")
    fraction: float | None = Field(None, gt=0, lt=1, description="share of the validation "
                                   "images held out, chosen by a hash of their keys")

    @model_validator(mode="after")
    def _one_of(self) -> Holdout:
        if (self.split is None) == (self.fraction is None):
            raise ValueError("give exactly one of split (a split name, e.g. test) or "
                             "fraction (0 < fraction < 1)")
        return self

    def describe(self) -> str:
        if self.split is not None:
            return f"split {self.split!r}"
        return f"{self.fraction:g} of the validation images, by key hash"


def key_unit(key: str) -> float:
    """A stable number in [0, 1) per sample key."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_held_out(key: str, fraction: float) -> bool:
    return key_unit(key) < fraction
