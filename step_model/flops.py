"""Honest FLOP counting.

``torch.utils.flop_counter.FlopCounterMode`` has no formula for the fused CPU attention
kernel ``aten._scaled_dot_product_flash_attention_for_cpu`` (nor its backward), so a ViT's
attention FLOPs silently vanish on CPU: 0.70 instead of 1.32 TFLOP for ViT-B/16 at 1024^2.
:func:`flop_counter` adds those formulas (the CUDA flash / efficient / cuDNN kernels are
counted by torch already). Convention: 1 multiply-add = 2 FLOPs, as torch counts.

:func:`measure_gflops` splits the count of one forward by sub-network: ``policy``,
``encoder`` (embedding + blocks + final norm: everything not in another part), ``exits``
and ``decoder``. Gathers, scatters and the final bilinear upsampling are data movement and
count 0, as torch counts them.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode wraps custom formulas so that they receive shapes, like the built-in ones.
EXTRA_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
}


def flop_counter(display: bool = False) -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the fused CPU attention kernels."""
    return FlopCounterMode(display=display, custom_mapping=EXTRA_FORMULAS)


# sub-network -> its module under the model (what ``flops_by_part`` reports it as)
PARTS = {"policy": "policy", "exits": "exit_heads", "decoder": "decoder"}


def _module_flops(counts: dict, name: str) -> int:
    """FLOPs under module ``name``; a container that is never called itself (ModuleList)
    has no entry, so sum its direct children instead (never deeper names: those are
    already inside the children's counts)."""
    if name in counts:
        return sum(counts[name].values())
    depth = name.count(".") + 1
    return sum(
        sum(v.values()) for k, v in counts.items()
        if k.startswith(name + ".") and k.count(".") == depth
    )


def flops_by_part(counter: FlopCounterMode, root: str) -> dict[str, float]:
    """GFLOPs of what ``counter`` counted, split by sub-network of the model whose class
    name is ``root``: {"policy", "encoder", "exits", "decoder", "total"}; ``encoder`` is
    everything not in another part (embedding, blocks, final norm)."""
    counts = counter.get_flop_counts()
    part = {key: _module_flops(counts, f"{root}.{name}") / 1e9 for key, name in PARTS.items()}
    total = counter.get_total_flops() / 1e9
    return {"policy": part["policy"], "encoder": total - sum(part.values()),
            "exits": part["exits"], "decoder": part["decoder"], "total": total}


def measure_gflops(model, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
    """GFLOPs of one ``model(images, labels)`` forward (no grad), split by sub-network:
    {"policy", "encoder", "exits", "decoder", "total"} for the whole batch."""
    with torch.no_grad(), flop_counter() as counter:
        model(images, labels)
    return flops_by_part(counter, type(model).__name__)
