"""FLOP counting sees what executes, fused attention kernels included."""

from __future__ import annotations

import timm
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from step_model import flop_counter, measure_gflops

from helpers import blocky_labels, tiny

aten = torch.ops.aten


def vit_block_flops(n: int, d: int, mlp_ratio: int = 4) -> int:
    """QKV + attention scores + attention-weighted sum + projection + MLP; 1 MAC = 2 FLOPs."""
    return 2 * n * d * 3 * d + 2 * n * n * d + 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * mlp_ratio * d


def test_vit_b_at_1024_counts_the_analytic_flops() -> None:
    # fake tensors: shapes and dispatch of a CPU run (the fused CPU attention kernel is what
    # gets called), no arithmetic, so ViT-B at 1024^2 is counted in well under a second
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_384", pretrained=False, dynamic_img_size=True)
    vit = vit.to_empty(device="cpu").eval()
    with FakeTensorMode(allow_non_fake_inputs=True), flop_counter() as counter:
        vit.forward_features(torch.empty(1, 3, 1024, 1024))
    counts = counter.get_flop_counts()["Global"]
    assert aten._scaled_dot_product_flash_attention_for_cpu in counts, "the fused kernel was not seen"
    n, d = 64 * 64 + 1, 768
    analytic = 2 * 4096 * 3 * 256 * d + 12 * vit_block_flops(n, d)
    assert abs(counter.get_total_flops() - analytic) / analytic < 0.01
    assert 1.30e12 < analytic < 1.34e12


def test_cuda_attention_kernels_have_formulas() -> None:
    registry = flop_counter().flop_registry
    for op in (aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_flash_attention,
               aten._scaled_dot_product_cudnn_attention, aten._scaled_dot_product_flash_attention_for_cpu,
               aten._scaled_dot_product_flash_attention_for_cpu_backward):
        assert op in registry, op


def test_step_flops_follow_the_tokens_that_run() -> None:
    """Real CPU run of a tiny STEP model with sharing and halting: the counted FLOPs equal
    the analytic count for the tokens each block actually processed."""
    model = tiny("oracle", exits=[3, 6], inference={"exit_thresholds": [0.25], "top_k": 1})
    x = torch.rand(1, 3, 128, 128)
    y = blocky_labels(128, 128, 2)
    g = measure_gflops(model, x, y)
    with torch.no_grad():
        flow = model(x, y).flow
    d, c = 192, 5
    per_block = flow.tokens_per_block[0].tolist()
    n_tok = int(flow.num_tokens[0])
    assert per_block[0] == n_tok < 64 and per_block[-1] < per_block[0]
    encoder = 2 * n_tok * 3 * 256 * d + sum(vit_block_flops(n + 1, d, 4) for n in per_block)
    exits = sum(2 * per_block[b - 1] * d * c for b in (3, 6))  # tokens present at each exit
    decoder = 2 * per_block[-1] * d * c
    assert g["policy"] == 0.0
    assert abs(g["encoder"] * 1e9 - encoder) < 1e-6 * encoder
    assert round(g["exits"] * 1e9) == exits
    assert round(g["decoder"] * 1e9) == decoder


def test_the_part_counter_gives_flop_counter_modes_figures() -> None:
    """``flop_counter(parts_of=model)`` (the cheap counter every evaluation uses) against
    torch's ``FlopCounterMode`` on the same forwards: the policy network (batch norms that
    decompose), sharing, two exits, a batch of two; the split and the total equal."""
    from step_model import flops_by_part

    model = tiny("threshold", exits=[3, 6],
                 inference={"exit_thresholds": [0.25], "top_k": 1, "merge_thresholds": 0.3})
    x = torch.rand(2, 3, 128, 128)
    y = torch.stack([blocky_labels(128, 128, 2), blocky_labels(128, 128, 4)])
    for scope in (torch.no_grad, torch.inference_mode):
        with scope(), flop_counter() as full:
            model(x, y)
        with scope(), flop_counter(parts_of=model) as parts:
            model(x, y)
        want = flops_by_part(full, type(model).__name__)
        got = flops_by_part(parts, type(model).__name__)
        assert want["policy"] > 0 and want["exits"] > 0 and want["decoder"] > 0
        assert got == want, (scope, got, want)


def test_the_part_counter_leaves_no_hooks_behind() -> None:
    model = tiny("threshold", exits=[3], inference={"exit_thresholds": [0.5]})
    hooked = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    try:
        with torch.no_grad(), flop_counter(parts_of=model):
            model(torch.rand(1, 3, 100, 100))  # not a multiple of the 16-px patch
    except Exception:  # noqa: BLE001 - the error is not the point, the hooks are
        pass
    with torch.no_grad(), flop_counter(parts_of=model) as counter:
        model(torch.rand(1, 3, 128, 128))
    assert counter.get_total_flops() > 0
    assert [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks] == hooked
