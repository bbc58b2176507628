"""Images the threshold search never sees (``data.holdout``, ``tune.holdout``).

Three ways, which combine (``split`` excludes ``fraction``):

* ``{split: test}``: a whole split, prepared too, that no search reads;
* ``{fraction: 0.3}``: a fixed fraction of the validation split chosen by a hash of each
  sample's key: a key is held out when the first 8 bytes of ``sha256(key)``, read as a
  fraction of 2**64, fall below ``fraction``. A hash, not a seeded shuffle, because the
  choice of one image must not depend on which other images exist, on their order, on the
  number of shards or on the Python version: adding images to the split, resharding or
  raising ``fraction`` never moves an image from the held-out part back into the searched
  part. It measures new frames of conditions the search knows;
* ``{groups: [0001TP]}``: whole groups (recordings, cities: ``data.groups``,
  :mod:`pipelines.common.groups`), which measure a change of conditions. With
  ``from_training: true`` the trainings skip those groups' images too (every stage), and
  their images in the training split join the held-out check: images nothing was fitted
  or chosen on.
"""

from __future__ import annotations

import hashlib

from pydantic import Field, model_validator

from pipelines.common.groups import Groups
from pipelines.common.settings import StrictModel


class Holdout(StrictModel):
    """``split``, ``fraction`` and/or ``groups`` (``split`` and ``fraction`` exclude each
    other)."""

    split: str | None = Field(None, description="a split the search never reads, e.g. test")
    fraction: float | None = Field(None, gt=0, lt=1, description="share of the validation "
                                   "images held out, chosen by a hash of their keys")
    groups: list[str] = Field(default_factory=list, description="whole groups (data.groups) "
                              "the search never sees")
    from_training: bool = Field(False, description="the trainings skip the held-out groups' "
                                "images too, and the held-out check also measures their "
                                "images of the training split")
    group_by: Groups | None = Field(None, description="how keys fall into groups (filled "
                                    "in from data.groups / tune.groups)")

    @model_validator(mode="after")
    def _consistent(self) -> Holdout:
        if self.split is not None and self.fraction is not None:
            raise ValueError("give split (a split name, e.g. test) or fraction (0 < "
                             "fraction < 1), not both")
        if self.split is None and self.fraction is None and not self.groups:
            raise ValueError("give split (a split name, e.g. test), fraction (0 < fraction "
                             "< 1) or groups (names of data.groups)")
        if self.from_training and not self.groups:
            raise ValueError("from_training: needs groups (only whole groups can be kept "
                             "from training)")
        if len(set(self.groups)) != len(self.groups):
            raise ValueError(f"groups: listed twice: {self.groups}")
        return self

    def describe(self) -> str:
        parts = []
        if self.split is not None:
            parts.append(f"split {self.split!r}")
        if self.fraction is not None:
            parts.append(f"{self.fraction:g} of the validation images, by key hash")
        if self.groups:
            parts.append(f"group{'s' if len(self.groups) > 1 else ''} "
                         f"{', '.join(self.groups)}"
                         + (" (also kept from training)" if self.from_training else ""))
        return " + ".join(parts)

    def needs_groups(self) -> bool:
        return bool(self.groups)


def fill_group_by(holdout: Holdout | None, groups: Groups | None, field: str) -> None:
    """Give held-out groups the definition of groups they need (``field``: where the
    config defines them, named in the error)."""
    if holdout is None or not holdout.groups or holdout.group_by is not None:
        return
    if groups is None:
        raise ValueError(f"holdout.groups: needs {field} (how sample keys fall into groups, "
                         "e.g. {pattern: '^([^_]+)_'})")
    holdout.group_by = groups


def key_unit(key: str) -> float:
    """A stable number in [0, 1) per sample key."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_held_out(key: str, fraction: float) -> bool:
    return key_unit(key) < fraction
