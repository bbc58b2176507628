"""Expected failures: what a user's input or environment causes, as opposed to a bug.

The ``step`` command layer prints an expected failure as one line
(``step <cmd>: error: <message>``) with its exit ``code`` (1: a runtime failure; 2: the
input is wrong) and lets every other exception, a bug, keep its traceback. Raise
:class:`ExpectedFailure` (or :class:`InputNotFound` / :class:`InvalidInput`, which also stay
a ``FileNotFoundError`` / ``ValueError`` for callers that catch those) where the user's
input is at fault: a missing checkpoint or dataset, data that does not fit the model, all
trials failed. ``ConfigError`` (a setting that does not validate) is the other expected
failure, exit 2.

The lower layers cannot import this module (step_model and data_prep know nothing of
pipelines); their own expected failures are listed in :data:`LIBRARY_FAILURES`.
"""

from __future__ import annotations


class ExpectedFailure(Exception):
    """A failure the user can fix, reported as one line with exit ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class InputNotFound(ExpectedFailure, FileNotFoundError):
    """A path or URI the user named (checkpoint, data, images, store) does not exist."""


class InvalidInput(ExpectedFailure, ValueError):
    """Inputs that exist but do not fit together (the data's classes and the checkpoint's,
    an oracle without labels ...)."""


def library_failures() -> tuple[type[Exception], ...]:
    """The expected failures of the lower layers (exit 1, as any runtime failure)."""
    from data_prep.errors import DatasetError
    from step_model.bench import BenchInputError
    from step_model.config import SettingsMismatch

    return (DatasetError, BenchInputError, SettingsMismatch)
