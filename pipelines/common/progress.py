"""Progress lines shared by training, evaluation and the search."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m07s``: elapsed times and ETAs in progress lines."""
    seconds = int(round(max(seconds, 0)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"
