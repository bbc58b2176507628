"""The autocast rule of training, evaluation and the benchmarks (one function for all).

``auto`` is bf16 autocast on CUDA and fp32 elsewhere: bf16 on most CPUs is slower than
fp32 and changes the numerics the tests compare. ``bf16`` asked for explicitly is honoured
on the CPU too; ``fp32`` never autocasts. bf16 needs no GradScaler.
"""

from __future__ import annotations

import contextlib
from typing import Literal

Precision = Literal["auto", "bf16", "fp32"]


def autocast(device, precision: Precision):
    """The autocast context for ``precision`` on ``device`` (a ``torch.device`` or its
    name); a null context for fp32. Torch is imported here: configs import this module."""
    import torch

    device = torch.device(device)
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if bf16 and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
