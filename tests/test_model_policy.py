"""The dCTS policy network: pretrained weights fully loaded, heads trained by its loss;
gradients reach what stage 2 trains."""

from __future__ import annotations

import pytest
import timm
import torch

from step_model import PolicyNet, load_lite0_weights, policy_loss, step_loss
from step_model.policy import LITE0_TENSORS, lite0_weights_path

from helpers import blocky_labels, tiny


def test_every_lite0_tensor_finds_its_home() -> None:
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    mapping = load_lite0_weights(net)
    src = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    assert len(src) == len(mapping) == LITE0_TENSORS
    assert len(set(mapping.values())) == LITE0_TENSORS == len(net.state_dict())
    state = net.state_dict()
    for src_name, dst_name in mapping.items():
        assert torch.equal(state[dst_name], src[src_name]), (src_name, dst_name)
    assert mapping["_conv_stem.weight"] == "conv_stem.weight"
    assert mapping["_fc.weight"] == "classifier.weight"


def test_a_partial_weight_file_is_rejected(tmp_path) -> None:
    src = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    src.pop(next(iter(src)))
    torch.save(src, tmp_path / "partial.pth")
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    with pytest.raises(ValueError, match="295 tensors"):
        load_lite0_weights(net, tmp_path / "partial.pth")


def test_policy_heads_and_backbone_learn_from_the_policy_loss() -> None:
    torch.manual_seed(0)
    policy = PolicyNet(pretrained=True).train()
    x = torch.rand(1, 3, 128, 160)
    y = blocky_labels(128, 160, 1)
    logits = policy(x)
    assert {s: tuple(v.shape) for s, v in logits.items()} == {2: (1, 4, 5), 4: (1, 2, 2), 8: (1, 1, 1), 16: (1, 0, 0)}
    losses = policy_loss({s: v for s, v in logits.items() if v.numel()}, y)
    losses["total"].backward()
    for s in (2, 4, 8):
        assert policy.heads[str(s)].weight.grad.abs().sum() > 0, s
    assert policy.net.conv_stem.weight.grad.abs().sum() > 0


def test_gradients_reach_decoder_and_exit_heads_not_the_frozen_policy() -> None:
    model = tiny("oracle", exits=[2, 4], decoder="mask").train()
    model.policy.requires_grad_(False)
    x = torch.rand(2, 3, 64, 96)
    y = torch.cat([blocky_labels(64, 96, 0), blocky_labels(64, 96, 1)])
    out = model(x, y)
    losses = step_loss(out, y, model.cfg)
    assert set(losses) == {"seg", "exit_2", "exit_4", "total"}
    losses["total"].backward()
    assert model.decoder.cls_emb.grad.abs().sum() > 0
    assert model.decoder.proj_dec.weight.grad.abs().sum() > 0
    for head in model.exit_heads:
        assert head.head.weight.grad.abs().sum() > 0
    assert model.encoder.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.encoder.vit.pos_embed.grad.abs().sum() > 0


@pytest.mark.parametrize("scale, stride, channels", [(0.5, 16, 112), (1.0, 32, 320)])
def test_fine_features_add_the_stage_at_32_image_pixels_to_the_heads(scale, stride, channels) -> None:
    torch.manual_seed(0)
    fine = PolicyNet((2, 4), pretrained=False, input_scale=scale, fine_features=True).eval()
    info = fine.net.feature_info[fine.fine_index]
    assert (info["reduction"], info["num_chs"]) == (stride, channels)
    plain = PolicyNet((2, 4), pretrained=False, input_scale=scale).eval()
    plain.net.load_state_dict(fine.net.state_dict())
    width = plain.net.num_features
    x = torch.rand(1, 3, 160, 224)
    with torch.no_grad():
        for s in ("2", "4"):
            assert fine.heads[s].in_channels == width + channels
            plain.heads[s].weight.copy_(fine.heads[s].weight[:, :width])
            plain.heads[s].bias.copy_(fine.heads[s].bias)
        with_fine, base = fine(x), plain(x)
        for h in fine.heads.values():  # drop the fine map's share: the final map alone
            h.weight[:, width:] = 0
        without_fine = fine(x)
    for s in (2, 4):
        assert not torch.allclose(with_fine[s], base[s])
        assert torch.allclose(without_fine[s], base[s], atol=1e-5)
