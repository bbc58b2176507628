"""Latency of evaluation forwards, timed apart from the counted ones.

FLOP counting slows a forward down, so latency is timed on separate plain forwards of the
first ``samples`` batches, after one untimed warm-up forward (allocator, kernel
selection). CUDA runs asynchronously: the clock is read after a synchronize.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LatencyTimer:
    """Milliseconds per image of the first ``samples`` batches (``timed``)."""

    def __init__(self, samples: int, device: torch.device) -> None:
        self.samples = samples
        self.device = device
        self.timed: list[float] = []

    def time(self, forward: Callable[[], object], batch_size: int) -> None:
        """Times ``forward()`` while fewer than ``samples`` batches are timed."""
        if len(self.timed) >= self.samples:
            return
        if not self.timed:  # warm-up
            forward()
        sync(self.device)
        t0 = time.perf_counter()
        forward()
        sync(self.device)
        self.timed.append((time.perf_counter() - t0) * 1000 / batch_size)
