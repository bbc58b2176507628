"""Training pieces without Ray: schedule, parameter groups, checkpoints, stage-2 set-up."""

from __future__ import annotations

import pytest
import torch

from pipelines.common.checkpoint import (
    load_model,
    resolve_checkpoint_dir,
    save_checkpoint,
    state_digest,
)
from pipelines.common.model import build_model
from pipelines.train.config import load_train_config
from pipelines.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from pipelines.train.stages import StepStage, load_policy_weights

TINY = {"backbone": "vit_tiny_patch16_384", "num_classes": 4,
        "policy": {"pretrained": False, "levels": [2, 4]}, "exits": {"blocks": [2, 4]}}
TINY_INFERENCE = {"policy_mode": "oracle", "exit_thresholds": [0.2], "top_k": 0}


def test_warmup_then_poly_then_finetune() -> None:
    kw = dict(base_steps=10, warmup_steps=2, warmup_ratio=0.1, poly_power=1.0, min_ratio=0.0,
              finetune_steps=4, finetune_scale=0.5)
    got = [lr_factor(s, **kw) for s in range(14)]
    assert got[0] == pytest.approx(0.1) and got[1] == pytest.approx(0.55)
    assert got[2] == pytest.approx(1.0)  # warm-up done: the peak
    assert got[6] == pytest.approx(0.5)  # halfway through the poly decay
    assert got[10] == pytest.approx(0.5) and got[12] == pytest.approx(0.25)  # fine-tune phase
    assert all(a >= b for a, b in zip(got[2:10], got[3:10], strict=False))


def test_heads_get_the_multiplier_and_norms_no_decay() -> None:
    model = build_model(TINY)
    groups = param_groups(model.named_parameters(), lr=1e-4, weight_decay=0.05, head_lr_mult=10)
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_id[id(named["decoder.head.weight"])]["lr"] == pytest.approx(1e-3)
    backbone_w = next(n for n in named if n.startswith("encoder.") and n.endswith("qkv.weight"))
    assert by_id[id(named[backbone_w])]["lr"] == pytest.approx(1e-4)
    assert by_id[id(named[backbone_w])]["weight_decay"] == 0.05
    pos = next(n for n in named if n.endswith("pos_embed"))
    assert by_id[id(named[pos])]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_checkpoint_round_trip_and_policy_transfer(tmp_path) -> None:
    torch.manual_seed(0)
    stage1 = build_model(TINY, TINY_INFERENCE)
    for p in stage1.policy.parameters():
        p.data.normal_()  # "trained" policy weights, distinct from any init
    run = tmp_path / "run"
    for step in (3, 6):
        save_checkpoint(run / f"checkpoint_{step:08d}", stage1,
                        train_state={"loop": {"step": step}})
    assert resolve_checkpoint_dir(str(run)).endswith("checkpoint_00000006")
    loaded, cfg = load_model(run / "checkpoint_00000006")
    assert state_digest(loaded.state_dict()) == state_digest(stage1.state_dict())
    assert cfg["num_classes"] == 4
    assert loaded.inference == stage1.inference  # inference.yaml: the settings come back

    torch.manual_seed(1)
    stage2 = build_model(TINY)
    load_policy_weights(stage2, str(run))
    for (name, a), b in zip(stage1.policy.state_dict().items(),
                            stage2.policy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    other = build_model({**TINY, "policy": {**TINY.get("policy", {}), "fine_features": True}})
    with pytest.raises(ValueError, match=r"model\.policy\.fine_features: True here, False in stage 1"):
        load_policy_weights(other, str(run))


def test_finetune_phase_halts_tokens_in_training() -> None:
    cfg = load_train_config("configs/tiny/step.yaml",
                            ["finetune.steps=2", "finetune.inference={exit_thresholds: [0.0], top_k: 1}"])
    model = build_model(cfg.model, cfg.inference)
    stage = StepStage()
    stage.prepare(model, cfg)
    assert not any(p.requires_grad for p in model.policy.parameters())
    images = torch.rand(2, 3, 64, 64)
    labels = torch.randint(0, 7, (2, 64, 64))
    stage.train_mode(model)
    before = model(images, labels).flow.tokens_per_block[:, -1]
    architecture = model.cfg
    stage.start_finetune(model, cfg)
    out = model(images, labels)
    after = out.flow.tokens_per_block[:, -1]
    assert (after < before).all()  # threshold 0: everything but the top-k per class halts
    # a training phase: the model's settings and switch change, its architecture does not
    assert model.cfg is architecture and model.halts_in_training
    assert model.inference == cfg.inference.replace(exit_thresholds=0.0, top_k=1, halting=True)
    from step_model import step_loss

    loss = step_loss(out, labels, model.cfg)["total"]
    assert torch.isfinite(loss)
    loss.backward()


def test_optimizer_step_moves_the_trained_weights_and_the_lr_follows_the_schedule() -> None:
    """One real optimizer step changes every weight with a gradient and no frozen one; the
    learning rate of each group is warm-up, peak, poly decay, then the fine-tuning phase's
    restart at ``finetune.lr_scale``, times the group's multiplier."""
    from step_model import step_loss

    cfg = load_train_config("configs/tiny/step.yaml", ["finetune.steps=2"])
    model = build_model(cfg.model, cfg.inference)
    stage = StepStage()
    stage.prepare(model, cfg)  # freezes the policy
    stage.train_mode(model)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and trained
    opt = build_optimizer(trained, cfg.optim)
    base, ft = cfg.train.steps, cfg.finetune.steps
    sched = build_scheduler(opt, cfg.optim, base_steps=base, finetune_steps=ft,
                            finetune_scale=cfg.finetune.lr_scale)
    o = cfg.optim
    assert (base, o.warmup_steps, o.poly_power, o.min_lr) == (12, 2, 1.0, 0.0)  # below
    expected = {0: o.warmup_ratio, 1: (1 + o.warmup_ratio) / 2, 2: 1.0,  # warm-up, peak
                7: 0.5,  # halfway through the linear decay from step 2 to step 12
                12: cfg.finetune.lr_scale, 13: cfg.finetune.lr_scale / 2}  # the restart
    images = torch.rand(2, 3, 64, 64)
    labels = torch.randint(0, 7, (2, 64, 64))
    for step in range(base + ft):
        for group in opt.param_groups:
            if step in expected:
                assert group["lr"] == pytest.approx(o.lr * group["lr_mult"] * expected[step])
        opt.zero_grad()
        step_loss(model(images, labels), labels, model.cfg)["total"].backward()
        before = {n: p.detach().clone() for n, p in trained}
        opt.step()
        sched.step()
        if step == o.warmup_steps:  # at the peak (step 0's lr is too small to show in fp32)
            moved = {n for n, p in trained if not torch.equal(p, before[n])}
            with_grad = {n for n, p in trained if p.grad is not None and p.grad.any()}
            assert "decoder.head.weight" in with_grad and with_grad <= moved
    assert {o.lr * g["lr_mult"] for g in opt.param_groups} == {o.lr, o.lr * o.head_lr_mult}
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # the frozen policy never moves


def test_exit_mix_draws_halting_per_finetune_step_and_restores_the_configured_setting() -> None:
    from pipelines.common.settings import ConfigError

    cfg = load_train_config("configs/tiny/step.yaml", [
        "finetune.steps=2", "finetune.inference={exit_thresholds: [0.0], top_k: 1}",
        "finetune.exit_mix=[0.0, 1.0]"], stage="step")
    model = build_model(cfg.model, cfg.inference)
    stage = StepStage()
    stage.prepare(model, cfg)
    stage.train_mode(model)
    images = torch.rand(1, 3, 64, 64)
    labels = torch.randint(0, 7, (1, 64, 64))

    def halted_at(step: int) -> int:
        with stage.step_settings(model, cfg, step):
            halted = int(model(images, labels).flow.halted_per_exit.sum())
        assert model.inference is configured  # evaluation keeps the phase's setting
        return halted

    configured = model.inference
    assert {halted_at(step) for step in range(8)} == {0}  # base steps: no halting in training
    stage.start_finetune(model, cfg)
    configured = model.inference
    draws = [halted_at(step) for step in range(24)]
    assert draws == [halted_at(step) for step in range(24)]  # a function of (seed, step)
    assert 0 in draws and max(draws) > 0  # 1.0 drawn: nothing halts; 0.0: all but top-k

    with pytest.raises(ConfigError, match="finetune.exit_mix"):
        load_train_config("configs/tiny/step.yaml", ["finetune.exit_mix=[0.5]"], stage="step")


def test_progress_line_says_step_loss_speed_and_eta() -> None:
    from pipelines.train.loop import progress_line

    line = progress_line("step", 300, 1500, 0.51234, 7.25, seconds_per_step=1.5)
    assert line == ("[train step] step 300/1500 (20%)  loss 0.5123  7.2 samples/s"
                    "  ETA 30m00s")
    assert progress_line("policy", 10, 10, 1.0, 1.0, 9.0).endswith("ETA 0s")


def test_sharing_mix_draws_a_merge_threshold_per_step_and_restores_the_configured_one(tmp_path) -> None:
    from pipelines.common.settings import ConfigError

    cfg = load_train_config("configs/tiny/step.yaml", [
        "inference.policy_mode=threshold", f"policy_checkpoint={tmp_path}",
        "sharing_mix.thresholds=[0.5, 1.0]"], stage="step")
    model = build_model(cfg.model, cfg.inference)
    with torch.no_grad():  # a policy that merges every window it is asked about
        for s in model.cfg.policy.levels:
            model.policy.heads[str(s)].bias.fill_(6.0)
    configured = model.inference
    stage = StepStage()
    images = torch.rand(1, 3, 64, 64)
    grid_cells = (64 // 16) ** 2

    def tokens_at(step: int) -> tuple[int, str]:
        with stage.step_settings(model, cfg, step):
            layout, _ = model.select(images, None)
            mode = model.inference.policy_mode
        assert model.inference is configured  # evaluation and checkpoints keep the configured one
        return int(layout.num_tokens.sum()), mode

    draws = [tokens_at(step) for step in range(24)]
    assert draws == [tokens_at(step) for step in range(24)]  # a function of (seed, step)
    assert {mode for _, mode in draws} == {"threshold", "none"}  # both drawn
    assert all(n == grid_cells for n, mode in draws if mode == "none")  # 1.0: no sharing
    assert all(n < grid_cells for n, mode in draws if mode == "threshold")

    with pytest.raises(ConfigError, match="sharing_mix.thresholds"):
        load_train_config("configs/tiny/step.yaml", ["sharing_mix.thresholds=[0.5]"], stage="step")
