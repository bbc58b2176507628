"""Halted tokens kept as context (``halted_context: kv | pooled``): what later blocks see,
what stays frozen, both varlen strategies, the FLOPs it adds, training with it."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from test_model_halting import _run_with_perturbation

from step_model import flop_counter, step_loss
from step_model.config import InferenceConfig

from helpers import blocky_labels, tiny

MODES = ("kv", "pooled")
D = 192  # vit_tiny's width


def _forward(model, x, labels=None, halt_counts=None, **settings):
    with model.inference_scope(**settings), torch.no_grad():
        return model(x, labels, halt_counts)


@pytest.fixture(scope="module")
def one_exit():
    # one exit: the same tokens halt whatever the context, so the runs compare token by token
    return tiny("none", exits=[3], inference={"exit_thresholds": [0.35], "top_k": 1})


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))


def test_none_is_the_paper_halted_tokens_leave_and_active_tokens_see_only_each_other(one_exit, images) -> None:
    """``none`` (the default) runs exactly the plain blocks on the surviving tokens: the
    encoder output equals, bit for bit, timm's blocks run by hand on the active tokens."""
    model = one_exit
    assert model.inference.halted_context == "none"
    x = images[:1]
    with torch.no_grad():
        tokens = model.forward_tokens(x)
        encoded = model.forward_encoder(tokens)
        h = tokens.x
        for i, block in enumerate(model.encoder.blocks, start=1):
            h = block(h)
            if i == 3:
                keep = torch.cat([torch.ones(1, dtype=torch.bool), ~encoded.halted[0]])
                h = h[:, keep]
        h = model.encoder.final_norm(h)
    assert encoded.halted.any() and not encoded.halted.all()
    assert torch.equal(encoded.x, h)


def test_kv_is_timm_s_blocks_on_active_and_frozen_halted_tokens_keeping_only_the_active(one_exit, images) -> None:
    """``kv`` for the active tokens is the plain block run on [active, halted frozen at the
    exit], the halted rows' outputs thrown away after every block: an independent reference
    for the keys/values-only forward."""
    model = one_exit
    x = images[1:]
    with model.inference_scope(halted_context="kv"), torch.no_grad():
        tokens = model.forward_tokens(x)
        encoded = model.forward_encoder(tokens)
        h, frozen = tokens.x, None
        for i, block in enumerate(model.encoder.blocks, start=1):
            if frozen is None:
                h = block(h)
            else:
                h = block(torch.cat([h, frozen], 1))[:, :h.shape[1]]
            if i == 3:
                frozen = h[:, 1:][:, encoded.halted[0]]
                h = h[:, torch.cat([torch.ones(1, dtype=torch.bool), ~encoded.halted[0]])]
        h = model.encoder.final_norm(h)
    assert frozen.shape[1] > 0 and h.shape[1] > 1
    torch.testing.assert_close(encoded.x, h, atol=2e-5, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_without_halting_the_context_is_empty_and_the_output_is_none_s(one_exit, images, mode) -> None:
    ref = _forward(one_exit, images, exit_thresholds=1.0)  # no token reaches confidence 1
    assert int(ref.flow.halted_per_exit.sum()) == 0
    out = _forward(one_exit, images, exit_thresholds=1.0, halted_context=mode)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.token_logits, ref.token_logits)
    off = _forward(one_exit, images, halting=False, halted_context=mode)
    assert torch.equal(off.logits, ref.logits)


@pytest.mark.parametrize("mode", MODES)
def test_halted_tokens_stay_frozen_and_the_active_ones_read_them(one_exit, images, mode) -> None:
    ref = _forward(one_exit, images)
    out = _forward(one_exit, images, halted_context=mode)
    depth = out.flow.cell_exit_depth.flatten(1)  # policy none: token == cell
    assert torch.equal(depth, ref.flow.cell_exit_depth.flatten(1))  # the same tokens halted
    halted, active = depth == 3, depth == 12
    assert (halted.sum(1) > 0).all() and (active.sum(1) > 0).all()
    # halted: the exit's logits, unchanged by the context (bit for bit none's)
    assert torch.equal(out.token_logits[halted], out.exit_logits[0][halted])
    assert torch.equal(out.token_logits[halted], ref.token_logits[halted])
    # active: they attended to the halted ones too
    diff = (out.token_logits[active] - ref.token_logits[active]).abs().amax(-1)
    assert bool((diff > 1e-4).all()), diff.min()


@pytest.mark.parametrize("mode", MODES)
def test_a_halted_token_informs_the_active_ones_through_the_context(mode) -> None:
    """The counterpart of none's "a halted token influences nothing afterwards": noise on
    the halted tokens (their halting pinned) now moves the active tokens' outputs."""
    model = tiny("none", exits=[2], inference={"exit_thresholds": [0.0], "top_k": 2,
                                               "halted_context": mode})
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    seen = {}
    hook = model.exit_heads[0].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    with torch.no_grad():
        ref = model(x)
    hook.remove()
    depth = ref.flow.cell_exit_depth[0].flatten()
    halted, active = (depth == 2).nonzero().flatten(), (depth == 12).nonzero().flatten()
    assert len(halted) > 0 and len(active) > 0
    moved = _run_with_perturbation(model, x, seen["out"], halted)
    assert torch.equal(moved.token_logits[0, halted], ref.token_logits[0, halted])
    assert not torch.allclose(moved.token_logits[0, active], ref.token_logits[0, active], atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_per_image_and_pad_mask_agree_on_images_with_different_token_counts(mode) -> None:
    model = tiny("oracle", exits=[2, 4], inference={"exit_thresholds": [0.35], "top_k": 1,
                                                    "halted_context": mode})
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    y = torch.cat([blocky_labels(128, 128, 0), blocky_labels(128, 128, 2)])
    runs = {s: _forward(model, x, y, varlen=s) for s in ("per_image", "pad_mask", "packed")}
    a, b = runs["per_image"], runs["pad_mask"]
    n = a.flow.num_tokens.tolist()
    assert n[0] != n[1]
    assert bool((a.flow.halted_per_exit > 0).all()), "the test needs halting at every exit"
    assert torch.equal(a.flow.cell_exit_depth, b.flow.cell_exit_depth)
    torch.testing.assert_close(a.token_logits, b.token_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.logits, runs["packed"].logits, atol=1e-5, rtol=0)
    # and the batch is each image run alone
    for i in range(2):
        alone = _forward(model, x[i:i + 1], y[i:i + 1], varlen="per_image")
        torch.testing.assert_close(alone.token_logits[0, :n[i]], a.token_logits[i, :n[i]],
                                   atol=1e-5, rtol=0)


def _context_sizes(model, x, counts, mode) -> tuple[list[int], list[int]]:
    """(tokens entering each block, context rows each block reads) of one image."""
    with model.inference_scope(halted_context=mode), torch.no_grad():
        encoded = model.forward_encoder(model.forward_tokens(x), counts)
    depth = encoded.halt_depth[0]
    sizes = []
    for j in range(1, model.encoder.depth + 1):
        if mode == "kv":
            sizes.append(int((depth < j).sum()))
        else:  # one per class predicted at the exit, pooled over the exits so far
            classes = {int(encoded.exit_logits[e][0, t].argmax())
                       for e, blk in enumerate(model.exit_blocks) if blk < j
                       for t in (depth == blk).nonzero().flatten().tolist()}
            sizes.append(len(classes))
    return [n[0] for n in encoded.tokens_per_block], sizes


@pytest.mark.parametrize("mode", MODES)
def test_the_context_costs_its_kv_projections_and_its_keys_in_counted_flops(mode) -> None:
    """At the same halting (uniform exits at fixed counts), counted FLOPs grow by exactly
    ``4 K D^2`` (K/V of K context rows) + ``4 (n+1) K D`` (n tokens + the class token
    attending to K more keys) per block after an exit."""
    model = tiny("none", exits=[3, 6], inference={"exit_policy": "uniform", "exit_thresholds": [0.5]})
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    counts = [torch.tensor([20]), torch.tensor([15])]
    flops = {}
    for m in ("none", mode):
        with model.inference_scope(halted_context=m), torch.no_grad(), flop_counter() as counter:
            out = model(x, halt_counts=counts)
        assert out.flow.halted_per_exit.tolist() == [[20, 15]]
        flops[m] = counter.get_total_flops()
    per_block, sizes = _context_sizes(model, x, counts, mode)
    assert per_block == [64] * 3 + [44] * 3 + [29] * 6
    assert sizes[:3] == [0, 0, 0] and min(sizes[3:]) > 0
    expected = sum(4 * k * D * D + 4 * (n + 1) * k * D for n, k in zip(per_block, sizes, strict=True))
    assert flops[mode] - flops["none"] == expected


@pytest.mark.parametrize("mode", MODES)
def test_random_and_uniform_exits_halt_the_confidence_counts_with_a_context(mode) -> None:
    model = tiny("none", exits=[2, 4], inference={"exit_thresholds": [0.35], "top_k": 1,
                                                  "halted_context": mode})
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(4))
    conf = _forward(model, x)
    counts = list(conf.flow.halted_per_exit.unbind(1))
    assert bool((conf.flow.halted_per_exit > 0).all())
    for policy in ("random", "uniform"):
        out = _forward(model, x, halt_counts=counts, exit_policy=policy)
        assert out.flow.halted_per_exit.tolist() == conf.flow.halted_per_exit.tolist(), policy
        assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("mode", MODES)
def test_bf16_autocast_runs_with_a_context(one_exit, images, mode) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _forward(one_exit, images, halted_context=mode)
    assert int(out.flow.halted_per_exit.sum()) > 0 and torch.isfinite(out.logits).all()


def test_the_finetuning_phase_trains_with_halted_tokens_as_context() -> None:
    """The step stage's fine-tuning phase with ``finetune.inference.halted_context: kv``:
    tokens halt in training, the loss is finite, every gradient is finite, and the blocks
    after the exit get different gradients than without the context."""
    from pipelines.common.model import build_model
    from pipelines.train.config import load_train_config
    from pipelines.train.stages import StepStage

    cfg = load_train_config("configs/tiny/step.yaml", [
        "finetune.steps=2",
        "finetune.inference={exit_thresholds: [0.0], top_k: 1, halted_context: kv}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.inference)
    stage = StepStage()
    stage.prepare(model, cfg)
    stage.train_mode(model)
    stage.start_finetune(model, cfg)
    assert model.halts_in_training and model.inference.halted_context == "kv"
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    labels = torch.randint(0, 7, (2, 64, 64), generator=torch.Generator().manual_seed(6))

    def grads(**settings) -> dict[str, torch.Tensor]:
        model.zero_grad()
        with model.inference_scope(**settings):
            out = model(images, labels)
        assert int(out.flow.halted_per_exit[:, 0].sum()) > 0
        loss = step_loss(out, labels, model.cfg)["total"]
        assert torch.isfinite(loss)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with_context = grads()
    assert all(torch.isfinite(g).all() for g in with_context.values())
    after_exit = "encoder.vit.blocks.5.attn.qkv.weight"  # exits after blocks 4 and 8
    assert with_context[after_exit].abs().sum() > 0
    without = grads(halted_context="none")
    assert not torch.allclose(with_context[after_exit], without[after_exit])


def test_a_bad_halted_context_names_the_field_and_the_choices(capsys) -> None:
    with pytest.raises(ValidationError) as err:
        InferenceConfig(halted_context="all")
    assert "halted_context" in str(err.value) and "'none', 'kv' or 'pooled'" in str(err.value)
    from pipelines.cli import main

    assert main(["train", "step", "--config", "configs/tiny/step.yaml", "--set",
                 "finetune.inference.halted_context=all", "--print-config"]) == 2
    text = capsys.readouterr().err
    assert "finetune.inference.halted_context" in text and "'none', 'kv' or 'pooled'" in text


def test_the_search_space_can_vary_the_halted_context(tmp_path) -> None:
    from pipelines.common.settings import ConfigError
    from pipelines.tune.space import load_space

    f = tmp_path / "space.yaml"
    f.write_text("name: ctx\nhalted_context: {type: choice, values: [none, kv, pooled]}\n")
    space = load_space(f)
    assert space.searched == ["halted_context"] and space.grid_size() == 3
    assert space.to_inference({"halted_context": "pooled"}).given() == {"halted_context": "pooled"}
    f.write_text("name: ctx\nhalted_context: {type: choice, values: [none, all]}\n")
    with pytest.raises(ConfigError, match="halted_context"):
        load_space(f)
