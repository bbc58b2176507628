"""Fidelity of the model to the method: supertoken embedding, frozen
exit logits, the exit ablation at matched counts, budget selection, probability upsampling,
the frozen policy in stage 2 and the EfficientNet-Lite0 weight mapping."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from step_model import build_step_model, load_lite0_weights
from step_model.exits import halting_mask, spread_key
from step_model.policy import LITE0_TENSORS, lite0_weights_path
from step_model.selection import _token_count, build_layout, select_by_budget, select_by_threshold

from helpers import REPO, blocky_labels, tiny

EXIT_TAU = 0.4  # random heads: every exit halts some tokens of both test images at 0.4


@pytest.fixture(scope="module")
def shared_model():
    return tiny("none", exits=[2, 4, 6], inference={"exit_thresholds": [EXIT_TAU], "top_k": 1})


@pytest.fixture
def model(shared_model):
    with shared_model.inference_scope():  # each test's settings are undone after it
        yield shared_model


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))


def _halt_map(out) -> torch.Tensor:
    return out.flow.cell_exit_depth.clone()


# ---- supertoken embedding ---------------------------------------------------------------

def test_supertokens_at_4_8_16_are_an_area_resize_then_the_patch_embedding(model) -> None:
    grid = (16, 32)
    accepted = {s: torch.zeros(1, 16 // s, 32 // s, dtype=torch.bool) for s in (2, 4, 8, 16)}
    accepted[16][0, 0, 0] = True  # rows 0-16, cols 0-16
    accepted[8][0, 0, 2] = True  # rows 0-8, cols 16-24
    accepted[4][0, 2, 6] = True  # rows 8-12, cols 24-28
    layout = build_layout(accepted, grid, 1, "cpu")
    x = torch.rand(1, 3, 256, 512, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = model.embed(x, layout)
        enc = model.encoder
        _, grid_pos = enc.grid_pos_embed(*grid)
        norm = enc.normalize(x)
    prefix = tokens.shape[1] - layout.max_tokens
    grid_pos = grid_pos.view(16, 32, -1)
    for s, (r, c) in ((16, (0, 0)), (8, (0, 16)), (4, (8, 24))):
        block = norm[..., r * 16:(r + s) * 16, c * 16:(c + s) * 16]
        area = F.interpolate(block, size=(16, 16), mode="area")  # area resize by s
        with torch.no_grad():
            expected = enc.vit.patch_embed.norm(enc.vit.patch_embed.proj(area).flatten(1))[0]
        expected = expected + grid_pos[r:r + s, c:c + s].reshape(s * s, -1).mean(0)
        token = int(layout.cell_to_token[0, r * 32 + c])
        assert int(layout.token_level[0, token]) == s
        torch.testing.assert_close(tokens[0, prefix + token], expected, atol=1e-5, rtol=0)


# ---- exits ------------------------------------------------------------------------------

def test_halted_tokens_keep_their_exit_heads_logits(model, images) -> None:
    x = images[:1]
    seen: list[torch.Tensor] = []
    hooks = [h.register_forward_hook(lambda m, i, o: seen.append(o[0].detach())) for h in model.exit_heads]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    depth = out.flow.cell_exit_depth[0].flatten()  # policy none: token == cell
    active = torch.arange(depth.numel())  # token numbers in slot order at the current exit
    for block, head_out in zip(model.exit_blocks, seen, strict=True):
        halted_here = (depth == block).nonzero().flatten()
        assert len(halted_here) > 0, block
        slot = {int(t): i for i, t in enumerate(active)}
        for t in halted_here.tolist():
            torch.testing.assert_close(out.token_logits[0, t], head_out[slot[t]], atol=0, rtol=0)
        active = active[depth[active] != block]  # the survivors, re-packed in token order


def test_random_and_uniform_halt_the_confidence_counts_at_every_exit(model, images) -> None:
    with torch.no_grad():
        conf = model(images)
    counts = list(conf.flow.halted_per_exit.unbind(1))
    assert bool((conf.flow.halted_per_exit > 0).all()), "the test needs halting at every exit"
    for policy in ("random", "uniform"):
        model.set_inference(exit_policy=policy)
        with torch.no_grad():
            out = model(images, halt_counts=counts)
        assert out.flow.halted_per_exit.tolist() == conf.flow.halted_per_exit.tolist(), policy
        assert not torch.equal(_halt_map(out), _halt_map(conf)), policy
    with pytest.raises(ValueError, match="halt_counts"):
        model(images, halt_counts=counts[:2])


def test_halt_counts_are_capped_by_the_active_tokens() -> None:
    logits = torch.randn(2, 40, 3)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 25:] = False
    for policy in ("random", "uniform"):
        halt = halting_mask(logits, valid, 0.9, 1, policy, torch.Generator().manual_seed(0),
                            count=torch.tensor([100, 7]))
        assert halt.sum(1).tolist() == [40, 7] and not (halt & ~valid).any()


def _quadrant_counts(halt: torch.Tensor, anchor: torch.Tensor, grid) -> list[int]:
    gh, gw = grid
    r, c = anchor // gw, anchor % gw
    q = (r >= gh / 2).long() * 2 + (c >= gw / 2).long()
    return torch.bincount(q[halt], minlength=4).tolist()


def test_uniform_spreads_the_halted_tokens_over_the_grid(model, images) -> None:
    grid = (16, 16)
    anchor = torch.arange(256)[None]
    key = spread_key(anchor, torch.ones_like(anchor), grid)
    valid = torch.ones(1, 256, dtype=torch.bool)
    logits = torch.zeros(1, 256, 3)
    for m in (4, 16, 40):
        halt = halting_mask(logits, valid, 0.5, 0, "uniform", count=torch.tensor([m]), key=key)
        assert _quadrant_counts(halt[0], anchor[0], grid) == [m // 4] * 4, m
    # evenly spaced in token (raster) order, 4 tokens land in the first column only
    halt = halting_mask(logits, valid, 0.5, 0, "uniform", count=torch.tensor([4]))
    assert _quadrant_counts(halt[0], anchor[0], grid) == [2, 0, 2, 0]

    # in the model, at the first exit and after the tokens were re-packed (6 x 6 grid)
    model.set_inference(exit_policy="uniform")
    counts = [torch.tensor([4, 4]), torch.tensor([8, 8]), torch.tensor([0, 0])]
    with torch.no_grad():
        depth = model(images, halt_counts=counts).flow.cell_exit_depth
    for b in range(2):
        for block, per_quadrant in ((2, 1), (4, 2)):
            quadrants = (depth[b] == block).view(2, 3, 2, 3).sum((1, 3)).flatten().tolist()
            assert quadrants == [per_quadrant] * 4, (b, block, quadrants)


def test_random_draws_differ_per_forward_and_repeat_on_a_fresh_model(model, images) -> None:
    images, counts = images[:1], [torch.tensor([6])] * 3
    model.set_inference(exit_policy="random", exit_seed=11)  # a new seed: a new generator
    with torch.no_grad():
        first = _halt_map(model(images, halt_counts=counts))
        second = _halt_map(model(images, halt_counts=counts))
    assert not torch.equal(first, second), "reseeded on every forward"
    fresh = build_step_model(model.cfg, model.inference).eval()  # seed 11; draws ignore weights
    with torch.no_grad():
        assert torch.equal(_halt_map(fresh(images, halt_counts=counts)), first)
    model.set_inference(exit_seed=12)
    model.set_inference(exit_seed=11)  # the seed changed: the generator starts again
    with torch.no_grad():
        assert torch.equal(_halt_map(model(images, halt_counts=counts)), first)


# ---- budget selection -------------------------------------------------------------------

def test_budget_selection_is_threshold_selection_at_an_equal_token_count() -> None:
    grid = (23, 30)  # CamVid's 480 x 368
    g = torch.Generator().manual_seed(0)
    scores = {s: torch.rand(3, 23 // s, 30 // s, generator=g) for s in (2, 4, 8, 16)}
    for tau in (0.3, 0.6, 0.85):
        by_threshold = select_by_threshold(scores, dict.fromkeys(scores, tau), grid)
        counts = _token_count(by_threshold, 23 * 30).tolist()
        for i, n in enumerate(counts):
            one = {s: v[i:i + 1] for s, v in scores.items()}
            by_budget = select_by_budget(one, n / (23 * 30), grid)
            assert set(by_budget) == set(by_threshold)
            for s in by_budget:
                assert torch.equal(by_budget[s][0], by_threshold[s][i]), (tau, i, s)
    # any other budget: the target or at most 2 tokens above it (a level-2 window saves 3)
    for keep in (0.2, 0.45, 0.7):
        n = build_layout(select_by_budget(scores, keep, grid), grid, 3, "cpu").num_tokens
        target = round(keep * 23 * 30)
        assert bool(((n >= target) & (n <= target + 2)).all()), (keep, n.tolist())


def test_budget_takes_a_coarse_window_that_fine_windows_outscore() -> None:
    # greedy by raw score took the 16 level-2 windows (0.9) first; they blocked the
    # level-8 window (0.7) and the budget of 1 token could not be met (16 tokens)
    grid = (8, 8)
    scores = {2: torch.full((1, 4, 4), 0.9), 4: torch.full((1, 2, 2), 0.2), 8: torch.full((1, 1, 1), 0.7)}
    accepted = select_by_budget(scores, 1 / 64, grid)
    assert int(build_layout(accepted, grid, 1, "cpu").num_tokens[0]) == 1
    assert bool(accepted[8].all()) and not accepted[2].any()


# ---- upsampling -------------------------------------------------------------------------

def test_output_is_upsampled_probabilities_unless_asked_for_logits(model, images) -> None:
    x = images[:1, :, :90, :85]  # not a multiple of 16: cropped after upsampling
    with torch.no_grad():
        out = model(x)
    grid = out.token_logits.gather(1, out.flow.cell_to_token[..., None].expand(-1, -1, 5))
    grid = grid.transpose(1, 2).reshape(1, 5, 6, 6)
    probs = F.interpolate(grid.softmax(1), size=(96, 96), mode="bilinear")[..., :90, :85]
    torch.testing.assert_close(out.logits, probs.clamp_min(1e-8).log(), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logits.exp().sum(1), torch.ones(1, 90, 85), atol=1e-5, rtol=0)
    # cross-entropy on the log-probabilities is the NLL of the upsampled probabilities
    y = torch.randint(0, 5, (1, 90, 85), generator=torch.Generator().manual_seed(0))
    nll = -probs.gather(1, y[:, None]).log().mean()
    torch.testing.assert_close(F.cross_entropy(out.logits, y), nll, atol=1e-5, rtol=0)

    assert model.set_inference(upsample="logits").upsample == "logits"
    with torch.no_grad():
        old = model(x)
    torch.testing.assert_close(old.logits, F.interpolate(grid, size=(96, 96), mode="bilinear")[..., :90, :85],
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="upsample"):
        model.set_inference(upsample="nearest")


# ---- stage 2 and the policy's weights ------------------------------------------------------

def test_a_frozen_policy_gets_no_gradient_and_no_update_in_stage_2(tmp_path) -> None:
    from pipelines.common.checkpoint import save_checkpoint
    from pipelines.common.model import build_model
    from pipelines.train import stages
    from pipelines.train.config import load_train_config
    from pipelines.train.optim import build_optimizer

    cfg = load_train_config(REPO / "configs/tiny/step.yaml",
                            ["inference.policy_mode=threshold", f"policy_checkpoint={tmp_path}"], stage="step")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.inference)
    heads = [model.policy.heads[str(s)].bias for s in (2, 4, 8)]
    with torch.no_grad():  # a stage-1 checkpoint whose heads say "merge everything"
        for bias in heads:
            bias.fill_(6.0)
        save_checkpoint(tmp_path, model)
        for bias in heads:
            bias.zero_()
    stage = stages.get("step")
    stage.prepare(model, cfg)
    assert all(bool((bias == 6.0).all()) for bias in heads)  # the stage-1 policy was loaded
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, cfg.optim)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in model.policy.parameters()}
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}  # BN stats included
    backbone_before = model.encoder.vit.blocks[0].attn.qkv.weight.detach().clone()

    stage.train_mode(model)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = torch.cat([blocky_labels(64, 64, 0), blocky_labels(64, 64, 1)])
    ran: list[dict] = []
    hook = model.policy.register_forward_hook(lambda m, i, o: ran.append(o))
    losses = stage.losses(model, model, x, y, cfg)
    hook.remove()
    assert len(ran) == 1 and all(bool((v > 0).all()) for v in ran[0].values())  # it selected
    losses["total"].backward()
    optimizer.step()
    assert all(p.grad is None for p in model.policy.parameters())
    for k, v in model.policy.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(model.encoder.vit.blocks[0].attn.qkv.weight, backbone_before)


# EfficientNet-PyTorch -> timm names, written out independently of step_model.policy:
# blocks per stage of EfficientNet-Lite0, and the modules of its two block types.
LITE0_STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)
LITE0_NAMES = {
    "top": {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
            "_fc": "classifier"},
    "first_block": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                    "_bn2": "bn2"},
    "block": {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
              "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"},
}


def _expected_timm_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] != "_blocks":
        return ".".join([LITE0_NAMES["top"][parts[0]], *parts[1:]])
    flat = int(parts[1])
    starts = [sum(LITE0_STAGE_SIZES[:i]) for i in range(len(LITE0_STAGE_SIZES))]
    stage = max(i for i, s in enumerate(starts) if s <= flat)
    table = LITE0_NAMES["first_block" if flat == 0 else "block"]
    return ".".join(["blocks", str(stage), str(flat - starts[stage]), table[parts[2]], *parts[3:]])


def test_lite0_weights_are_mapped_by_name_for_every_tensor(tmp_path) -> None:
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    mapping = load_lite0_weights(net)
    src = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    assert len(mapping) == LITE0_TENSORS
    state = net.state_dict()
    for src_name, tensor in src.items():
        assert mapping[src_name] == _expected_timm_name(src_name), src_name
        assert torch.equal(state[mapping[src_name]], tensor), src_name
    assert mapping["_blocks.3._depthwise_conv.weight"] == "blocks.2.0.conv_dw.weight"
    assert mapping["_blocks.14._bn2.running_var"] == "blocks.5.3.bn3.running_var"

    # a file in another order (same names): loaded by name, the result is the same, where
    # a positional mapping would swap the two same-shaped running statistics
    names = list(src)
    i, j = names.index("_bn0.running_mean"), names.index("_bn0.running_var")
    names[i], names[j] = names[j], names[i]
    torch.save({k: src[k] for k in names}, tmp_path / "reordered.pth")
    other = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    load_lite0_weights(other, tmp_path / "reordered.pth")
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k]), k
