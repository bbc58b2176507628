"""The policies on 16-px patches (``policy.network: patch_features | patch_entropy``):
shapes and levels, FLOPs counted, learning on real data, selection, checkpoints, stage-2
fine-tuning and the config errors that name the field."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from step_model import InferenceConfig, PolicyConfig, StepConfig, build_step_model, measure_gflops
from step_model.flops import flop_counter
from step_model.patch_policy import PatchEntropyPolicy, PatchFeaturePolicy
from step_model.policy import PolicyNet, build_policy

from helpers import blocky_labels, loveda_pairs

NETWORKS = ("patch_features", "patch_entropy")


def _model(network: str, mode: str = "threshold", budget: float | None = None, **policy):
    torch.manual_seed(0)
    cfg = StepConfig(backbone="vit_tiny_patch16_384", num_classes=5,
                     policy=PolicyConfig(network=network, pretrained=False, **policy),
                     exits={"blocks": [2, 4]})
    return build_step_model(cfg, InferenceConfig(policy_mode=mode, budget=budget)).eval()


def _real_batch(side: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The three LoveDA scenes, area-downscaled to ``side`` px (labels: nearest)."""
    pairs = loveda_pairs()
    images = torch.cat([F.interpolate(img, size=(side, side), mode="area") for _, img, _ in pairs])
    labels = torch.cat([F.interpolate(lab[:, None].float(), size=(side, side), mode="nearest")[:, 0]
                        for _, _, lab in pairs]).long()
    return images, labels


@pytest.mark.parametrize("network", NETWORKS)
def test_one_logit_map_per_level_on_its_window_grid(network) -> None:
    policy = build_policy(PolicyConfig(network=network, pretrained=False)).eval()
    out = policy(torch.rand(2, 3, 128, 160))
    # 8 x 10 cells: 4 x 5 windows of 2, 2 x 2 of 4, 1 x 1 of 8, none of 16
    assert {s: tuple(v.shape) for s, v in out.items()} == {
        2: (2, 4, 5), 4: (2, 2, 2), 8: (2, 1, 1), 16: (2, 0, 0)}
    assert tuple(policy.levels) == (2, 4, 8, 16)
    odd = build_policy(PolicyConfig(network=network, levels=[4], pretrained=False))(torch.rand(1, 3, 80, 48))
    assert {s: tuple(v.shape) for s, v in odd.items()} == {4: (1, 1, 0)}


def test_build_policy_follows_the_network_and_its_width() -> None:
    assert isinstance(build_policy(PolicyConfig(pretrained=False)), PolicyNet)
    narrow = build_policy(PolicyConfig(network="patch_features", width=16, depth=1))
    wide = build_policy(PolicyConfig(network="patch_features", width=64, depth=3))
    assert isinstance(narrow, PatchFeaturePolicy) and isinstance(wide, PatchFeaturePolicy)
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in wide.parameters())
    assert isinstance(build_policy(PolicyConfig(network="patch_entropy")), PatchEntropyPolicy)


def test_patch_entropy_is_apt_luma_entropy_in_bits() -> None:
    policy = PatchEntropyPolicy((2,), bins=64)
    img = torch.full((1, 3, 32, 64), 0.5)
    img[:, :, :16, 32:] = 1.0  # right window: half mid-grey, half white -> 1 bit
    h = policy.entropy(img, 2)
    assert h.shape == (1, 1, 2)
    assert h[0, 0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert h[0, 0, 1].item() == pytest.approx(1.0, abs=1e-5)
    logits = policy(img)[2]  # scale * (offset - H): the flat window is the more homogeneous
    assert logits[0, 0, 0] > logits[0, 0, 1]


@pytest.mark.parametrize("network", NETWORKS)
def test_flops_of_the_policy_are_counted_and_far_below_efficientnet(network) -> None:
    images = torch.rand(1, 3, 368, 480)
    model = _model(network, levels=[2, 4, 8])
    gflops = measure_gflops(model, images)
    with torch.no_grad(), flop_counter() as counter:
        model.policy(images)
    alone = counter.get_total_flops() / 1e9
    assert gflops["policy"] == pytest.approx(alone)
    paper = measure_gflops(_model("efficientnet_lite0", levels=[2, 4, 8], input_scale=0.5,
                                  fine_features=True), images)["policy"]
    assert paper > 0.5  # 0.71 at 480 x 368 (docs/camvid.md)
    if network == "patch_features":
        assert 0 < gflops["policy"] < paper / 4
    else:  # a histogram: no multiply-adds at all
        assert gflops["policy"] == 0


@pytest.mark.parametrize("network", NETWORKS)
def test_stage1_steps_on_real_images_lower_the_policy_loss(network) -> None:
    """Stage 1's own loss (``PolicyStage.losses``): the level BCEs and, for patch_features,
    the cells' class cross-entropy."""
    from pipelines.train.stages import PolicyStage

    images, labels = _real_batch()
    torch.manual_seed(0)
    cfg = StepConfig(num_classes=7, policy=PolicyConfig(network=network, pretrained=False,
                                                        levels=[2, 4, 8]))
    model = build_step_model(cfg)
    stage = PolicyStage()
    stage.prepare(model, None)
    stage.train_mode(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=0.1 if network == "patch_entropy" else 2e-3)
    losses = []
    for _ in range(15):
        terms = stage.losses(model.policy, model, images, labels, None)
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        losses.append(terms["total"].item())
    assert ("policy_cells" in terms) == (network == "patch_features")
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("mode", ["threshold", "budget"])
def test_selection_with_the_patch_networks(network, mode) -> None:
    extra = {"budget": 0.5} if mode == "budget" else {}
    model = _model(network, mode=mode, **extra)
    images = torch.rand(2, 3, 128, 160)
    out = model(images)
    assert out.logits.shape == (2, 5, 128, 160)
    assert set(out.policy_logits) == {2, 4, 8, 16}
    if mode == "budget":  # 0.5 of 80 cells, at most 2 tokens above
        assert all(40 <= int(n) <= 42 for n in out.flow.num_tokens)
    # threshold 0 merges whatever fits: on 8 x 10 cells one 8 x 8 window, then the last two
    # columns in four 2 x 2 windows
    model.set_inference(merge_thresholds=dict.fromkeys((2, 4, 8, 16), 0.0))
    assert model(images).flow.num_tokens.tolist() == [5, 5]
    assert model.cfg.policy.network == network


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"policy\.network"):
        StepConfig(policy={"network": "vit_patch"})
    with pytest.raises(ValueError, match="fine_features: not a setting of policy.network 'patch_features'"):
        StepConfig(policy={"network": "patch_features", "fine_features": True})
    with pytest.raises(ValueError, match="depth, width: not a setting of policy.network 'efficientnet_lite0'"):
        StepConfig(policy={"width": 32, "depth": 1})
    with pytest.raises(ValueError, match=r"policy\.width"):
        StepConfig(policy={"network": "patch_features", "width": 2})
    # a round trip through the plain dict keeps every field (defaults of the others included)
    cfg = StepConfig(policy={"network": "patch_features", "width": 32})
    assert StepConfig.from_dict(cfg.to_dict()) == cfg


PATCH_MODEL = {"backbone": "vit_tiny_patch16_384", "num_classes": 5,
               "policy": {"network": "patch_features", "width": 16,
                          "depth": 1, "pretrained": False, "levels": [2, 4]},
               "exits": {"blocks": [2, 4]}}


def test_checkpoint_round_trip_and_the_network_must_match_stage1(tmp_path) -> None:
    from pipelines.common.checkpoint import load_model, save_checkpoint, state_digest
    from pipelines.common.model import build_model
    from pipelines.train.stages import load_policy_weights

    torch.manual_seed(0)
    stage1 = build_model(PATCH_MODEL)
    for p in stage1.policy.parameters():
        p.data.normal_()  # "trained" weights, distinct from any init
    ckpt = save_checkpoint(tmp_path / "ckpt", stage1)
    loaded, cfg = load_model(ckpt)
    assert cfg["policy"]["network"] == "patch_features" and cfg["policy"]["width"] == 16
    assert state_digest(loaded.state_dict()) == state_digest(stage1.state_dict())
    images = torch.rand(1, 3, 64, 96)
    stage1.eval()
    assert torch.equal(loaded.select(images, None)[0].cell_to_token,
                       stage1.select(images, None)[0].cell_to_token)

    torch.manual_seed(1)
    stage2 = build_model(PATCH_MODEL)
    load_policy_weights(stage2, str(ckpt))
    assert state_digest(stage2.policy.state_dict()) == state_digest(stage1.policy.state_dict())
    paper = build_model({**PATCH_MODEL, "policy": {"mode": "threshold", "pretrained": False,
                                                    "levels": [2, 4]}})
    with pytest.raises(ValueError, match=r"model\.policy\.network: 'efficientnet_lite0' here, "
                                         r"'patch_features' in stage 1"):
        load_policy_weights(paper, str(ckpt))
    wider = build_model({**PATCH_MODEL, "policy": {**PATCH_MODEL["policy"], "width": 32}})
    with pytest.raises(ValueError, match=r"model\.policy\.width: 32 here, 16 in stage 1"):
        load_policy_weights(wider, str(ckpt))


@pytest.mark.parametrize("finetune", [False, True])
def test_stage2_keeps_the_policy_frozen_or_finetunes_it(finetune, tmp_path) -> None:
    from pipelines.common.checkpoint import save_checkpoint
    from pipelines.common.model import build_model
    from pipelines.train.config import load_train_config
    from pipelines.train.stages import StepStage

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "stage1", build_model(PATCH_MODEL))
    overrides = [f"model.policy={PATCH_MODEL['policy']}", "model.num_classes=5",
                 f"policy_checkpoint={ckpt}", "inference.policy_mode=threshold",
                 "sharing_mix.thresholds=[0.5, 1.0]",
                 f"policy_finetune.enabled={str(finetune).lower()}"]
    cfg = load_train_config("configs/tiny/step.yaml", overrides, stage="step")
    model = build_model(cfg.model, cfg.inference)
    stage = StepStage()
    stage.prepare(model, cfg)
    stage.train_mode(model)
    assert all(p.requires_grad == finetune for p in model.policy.parameters())
    images, labels = torch.rand(2, 3, 64, 64), torch.cat([blocky_labels(64, 64, s) for s in (0, 1)])
    for step in (0, 1, 2, 3):  # sharing drawn per step: 1.0 (no sharing) and 0.5 both come up
        model.zero_grad(set_to_none=True)
        with stage.step_settings(model, cfg, step):
            losses = stage.losses(lambda *a: model(*a), model, images, labels, cfg)
        losses["total"].backward()
        grads = [p.grad for p in model.policy.parameters()]
        if finetune:
            assert "policy" in losses and torch.isfinite(losses["policy"])
            assert all(g is not None for g in grads), step  # every step, shared or not
        else:
            assert "policy" not in losses and all(g is None for g in grads)
        assert model.decoder.head.weight.grad is not None


def test_policy_finetune_is_refused_in_stage1() -> None:
    from pipelines.common.settings import ConfigError
    from pipelines.train.config import load_train_config

    with pytest.raises(ConfigError, match="policy_finetune.enabled: only for stage 'step'"):
        load_train_config("configs/tiny/policy.yaml", ["policy_finetune.enabled=true"],
                          stage="policy")


def test_cell_homogeneity_counts_the_cells_majority_classes() -> None:
    """A 2 x 2 window of class 0 crossed by a 2 px pole of class 1: mixed by its pixels,
    homogeneous by its cells (each cell's majority is 0); a cell of class 2 breaks it."""
    from step_model.policy import policy_targets

    lab = torch.zeros(1, 32, 96, dtype=torch.long)
    lab[0, :, 10:12] = 1             # the pole, in the first window
    lab[0, :16, 48:64] = 255         # second window: one all-ignore cell (no vote)
    lab[0, :, 64:] = 0
    lab[0, 16:, 80:] = 2             # third window: a cell of class 2
    pixels = policy_targets(lab, (2,), num_classes=3)[2]
    cells = policy_targets(lab, (2,), num_classes=3, homogeneity="cells")[2]
    assert pixels.tolist() == [[[0.0, 1.0, 0.0]]]
    assert cells.tolist() == [[[1.0, 1.0, 0.0]]]
    with pytest.raises(ValueError, match="homogeneity"):
        policy_targets(lab, (2,), num_classes=3, homogeneity="tokens")
    with pytest.raises(ValueError, match=r"policy\.homogeneity"):
        StepConfig(policy={"homogeneity": "tokens"})


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_analyze_registry_and_predict_with_the_patch_policy(tiny_shards, mlflow_server, tmp_path):
    """A patch_features checkpoint through `step analyze --layouts-only` (its policy_vs_oracle),
    the registry (thresholds registered with it) and `step predict` from the registry."""
    import json

    import numpy as np
    from PIL import Image

    from pipelines.analyze.layouts import LayoutSweep
    from pipelines.cli import main
    from pipelines.common.checkpoint import load_model, save_checkpoint
    from pipelines.common.data import batch_to_device, eval_loader
    from pipelines.common.model import build_model
    from pipelines.tracking.registry import register_tuned_model
    from pipelines.tracking.runs import create_run

    from helpers import LOVEDA

    torch.manual_seed(0)
    cfg = {**PATCH_MODEL, "num_classes": 7, "policy": {**PATCH_MODEL["policy"], "levels": [2, 4, 8]}}
    ckpt = save_checkpoint(tmp_path / "ckpt", build_model(cfg))

    out = tmp_path / "layouts.json"
    assert main(["analyze", "--checkpoint", str(ckpt), "--data", tiny_shards["val"],
                 "--layouts-only", "--layout-thresholds", "0.3", "0.5", "--budgets", "0.5",
                 "--no-mlflow", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    model, _ = load_model(ckpt)
    sweep = LayoutSweep(model, 7, purities=[1.0, 0.98, 0.95, 0.9], thresholds=[0.3, 0.5], budgets=[0.5])
    for images, labels in eval_loader(tiny_shards["val"], num_workers=0):
        sweep.update(*batch_to_device(images, labels, "cpu"))
    assert [r["tokens_fraction"] for r in doc["layouts"]] == pytest.approx(
        [r["tokens_fraction"] for r in sweep.rows()])
    assert doc["policy_vs_oracle"]["oracle_cut"] is not None

    tuned = {"exit_thresholds": [0.5, 0.5], "merge_thresholds": {"2": 0.0, "4": 0.0, "8": 0.0}}
    run_id = create_run(mlflow_server, "patch-policy", run_name="tune")
    reg = register_tuned_model(mlflow_server, run_id, str(ckpt), tuned,
                               {"miou": 0.5, "gflops": 1.0, "drop": 0.1}, name="patch-policy",
                               max_drop=1.0, drop_mode="absolute", baseline_miou=0.6)
    assert reg is not None
    images = tmp_path / "images"
    images.mkdir()
    scene = sorted((LOVEDA / "img_dir").glob("*.png"))[0]
    Image.open(scene).convert("RGB").crop((0, 0, 128, 128)).save(images / "a.png")
    pred = tmp_path / "pred"
    assert main(["predict", "--model", f"models:/{reg['name']}/{reg['version']}",
                 "--images", str(images), "--out", str(pred), "--no-ray", "--token-maps",
                 "--tracking-uri", mlflow_server]) == 0
    summary = json.loads((pred / "summary.json").read_text())
    assert summary["images"] == 1
    levels = np.asarray(Image.open(pred / "levels" / "a.png"))
    assert levels.shape == (8, 8) and (levels == 8).all()  # merge threshold 0: one 8 x 8 token
