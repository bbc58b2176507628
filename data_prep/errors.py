"""The failures of data_prep that a user's input causes (not bugs): a caller may report them
as one line. ``pipelines`` counts them among its expected failures
(:mod:`pipelines.common.errors`)."""

from __future__ import annotations


class DatasetError(ValueError):
    """The source does not hold the requested split (missing or empty folder, bad layout)."""


class DatasetNotFound(DatasetError, FileNotFoundError):
    """A dataset URI that holds no ``step prep`` output (or nothing at all)."""
