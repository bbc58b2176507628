"""Evaluation progress on stderr, from one rank (rank 0 by default).

On a terminal: a tqdm bar. Anywhere else (Ray worker logs, files, CI): one plain line at
the start, one every ``every_s`` seconds, and one at the end; no carriage returns. Counts
are this rank's images; under DDP the other ranks run the same share (to within one
image), which the lines say.
"""

from __future__ import annotations

import sys
import time

from pipelines.common.progress import duration


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class EvalProgress:
    def __init__(self, *, enabled: bool, total: int | None, total_all: int | None, rank: int,
                 world: int, every_s: float, stream=None) -> None:
        self.enabled = enabled
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.where = f" [rank {rank} of {world}]" if world > 1 else ""
        self.done = 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if not enabled:
            return
        if _isatty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc=f"eval{self.where}", file=self.stream,
                            dynamic_ncols=True, leave=False)
            return
        what = _images(total) if total is not None else "images until the data ends"
        if world > 1:
            what += f" on rank {rank} of {world}"
            if total_all is not None:
                what += f" ({_images(total_all)} on all ranks)"
        self._line(f"eval: {what}")

    def _line(self, text: str) -> None:
        # stream.write, not print: Ray Train patches print and tees a wrapped sys.stderr to
        # its logger too, which prints every line twice in the worker's log
        self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, n: int) -> None:
        if not self.enabled:
            return
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        text = f"eval: {self.done}"
        if self.total:
            text += f"/{self.total} images ({100 * self.done / self.total:.0f}%)"
        else:
            text += " images"
        text += f", {rate:.2f} images/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", {duration((self.total - self.done) / rate)} left"
        self._line(text + self.where)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elapsed = time.perf_counter() - self.t0
        self._line(f"eval: done, {_images(self.done)} in {duration(elapsed)} "
                   f"({self.done / max(elapsed, 1e-9):.2f} images/s){self.where}")
