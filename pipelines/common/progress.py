"""Progress lines shared by training, evaluation and the search."""

from __future__ import annotations

import time


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m07s``: elapsed times and ETAs in progress lines."""
    seconds = int(round(max(seconds, 0)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# How often a long step prints its progress on a terminal (``--verbose``: every line)
PROGRESS_EVERY_S = 30.0


class Every:
    """``due(final)`` is true at most once per ``seconds``, the first and the final call
    always: progress lines on a terminal at a readable pace, whatever the step rate."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.last: float | None = None

    def due(self, final: bool = False) -> bool:
        now = time.monotonic()
        if final or self.last is None or now - self.last >= self.seconds:
            self.last = now
            return True
        return False
