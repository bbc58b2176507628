"""Halted tokens really leave the computation."""

from __future__ import annotations

import torch

from step_model.exits import halting_mask

from helpers import tiny


def _run_with_perturbation(model, x, exit_output, rows: torch.Tensor | None):
    """Forward with the exit head's output pinned to ``exit_output`` (so the same tokens
    halt) and large noise added, right before the exit, to the token ``rows``."""
    hooks = [model.exit_heads[0].register_forward_hook(lambda m, i, o: exit_output)]
    if rows is not None:
        def perturb(module, inputs, output):
            output = output.clone()
            output[0, 1 + rows] += 10.0 * torch.randn_like(output[0, 1 + rows])
            return output
        hooks.append(model.encoder.blocks[1].register_forward_hook(perturb))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in hooks:
            h.remove()


def test_a_halted_token_influences_nothing_afterwards() -> None:
    # threshold 0: every token halts at block 2 except the 2 most confident of each class
    model = tiny("none", exits=[2], inference={"exit_thresholds": [0.0], "top_k": 2})
    x = torch.rand(1, 3, 96, 96)
    seen = {}
    hook = model.exit_heads[0].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    seen_in = []
    pre = [model.encoder.blocks[i].register_forward_pre_hook(lambda m, a: seen_in.append(a[0].shape[1])) for i in range(3)]
    with torch.no_grad():
        ref = model(x)
    hook.remove()
    for h in pre:
        h.remove()
    depth = ref.flow.cell_exit_depth[0].flatten()  # tokens == cells here (policy none)
    halted = (depth == 2).nonzero().flatten()
    active = (depth == 12).nonzero().flatten()
    assert 0 < len(active) <= 2 * 5 and len(halted) == 36 - len(active)
    # blocks after the exit see only the prefix token + active tokens
    assert seen_in == [37, 37, 1 + len(active)]
    assert ref.flow.tokens_per_block[0].tolist() == [36, 36] + [len(active)] * 10

    moved = _run_with_perturbation(model, x, seen["out"], halted)
    torch.testing.assert_close(moved.token_logits, ref.token_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(moved.logits, ref.logits, atol=1e-6, rtol=0)

    # control: the same perturbation of one *active* token does change the others
    control = _run_with_perturbation(model, x, seen["out"], active[:1])
    others = active[1:]
    assert not torch.allclose(control.token_logits[0, others], ref.token_logits[0, others], atol=1e-3)


def test_random_and_uniform_exit_policies_halt_the_same_number() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 50, 4) * 3
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, 40:] = False
    ref = halting_mask(logits, valid, 0.6, 1, "confidence")
    assert 0 < ref.sum() < valid.sum()
    for policy in ("random", "uniform"):
        other = halting_mask(logits, valid, 0.6, 1, policy, torch.Generator().manual_seed(1))
        assert other.sum(1).tolist() == ref.sum(1).tolist()
        assert not (other & ~valid).any()
    # top-k per class: with threshold 0 exactly k tokens of each predicted class stay
    kept = ~halting_mask(logits, valid, 0.0, 2, "confidence") & valid
    pred = logits.argmax(-1)
    for b in range(2):
        classes = pred[b][valid[b]].unique()
        for c in classes:
            n_c = int(((pred[b] == c) & valid[b]).sum())
            assert int((kept[b] & (pred[b] == c)).sum()) == min(2, n_c)


def test_halting_lowers_counted_flops() -> None:
    from step_model import measure_gflops

    model = tiny("none", exits=[4], inference={"exit_thresholds": [0.0], "top_k": 1})
    x = torch.rand(1, 3, 128, 128)
    with_halting = measure_gflops(model, x)
    model.set_inference(halting=False)
    without = measure_gflops(model, x)
    assert with_halting["exits"] > 0 and without["exits"] == 0
    with torch.no_grad():
        flow = model(x).flow
    assert flow.exit_blocks == [4] and flow.halted_per_exit.tolist() == [[0]]
    assert with_halting["encoder"] < 0.5 * without["encoder"]
