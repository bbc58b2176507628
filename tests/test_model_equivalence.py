"""STEP reduces to the plain ViT + Segmenter decoder, and batching never changes a result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import blocky_labels, tiny


@pytest.mark.parametrize("decoder", ["linear", "mask"])
def test_policy_none_no_exits_equals_plain_timm_vit(decoder: str) -> None:
    model = tiny("none", decoder=decoder)
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        out = model(x)
        vit = model.encoder.vit  # the plain timm model, same weights
        feats = vit.forward_features((x - 0.5) / 0.5)[:, vit.num_prefix_tokens:]
        tokens = model.decoder(feats, [48, 48])
        grid = tokens.transpose(1, 2).reshape(2, -1, 6, 8)
        # upsample="probs" (default): bilinear on the softmax, returned as log-probabilities
        ref = F.interpolate(grid.softmax(1), size=(96, 128), mode="bilinear").clamp_min(1e-8).log()
    assert out.logits.shape == (2, 5, 96, 128)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=0)
    assert out.flow.tokens_per_block.eq(48).all()


def test_size_not_multiple_of_16_is_padded_and_unpadded() -> None:
    model = tiny("none")
    x = torch.rand(1, 3, 90, 117)
    with torch.no_grad():
        out = model(x)
        padded = model(F.pad(x, (0, 128 - 117, 0, 96 - 90)))
    assert out.logits.shape == (1, 5, 90, 117)
    assert out.flow.grid == (6, 8)
    torch.testing.assert_close(out.logits, padded.logits[..., :90, :117], atol=1e-6, rtol=0)


@pytest.fixture(scope="module", params=["linear", "mask"])
def halting_model(request):
    return tiny("oracle", exits=[3, 6], decoder=request.param, inference={"exit_thresholds": [0.3], "top_k": 2})


@pytest.mark.parametrize("varlen", ["per_image", "pad_mask", "packed"])
def test_batch_with_different_token_counts_equals_one_by_one(halting_model, varlen: str) -> None:
    model = halting_model
    model.set_inference(varlen=varlen)
    x = torch.rand(3, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    y = torch.cat([blocky_labels(96, 96, seed) for seed in range(3)])
    with torch.no_grad():
        batch = model(x, y)
        single = [model(x[i : i + 1], y[i : i + 1]) for i in range(3)]
    counts = batch.flow.num_tokens.tolist()
    assert len(set(counts)) == 3, f"the test needs different token counts, got {counts}"
    assert batch.flow.halted_per_exit.sum() > 0, "the test needs some halting"
    # 1e-4: the mask decoder's LayerNorm over near-equal class similarities amplifies the
    # ~1e-7 rounding differences of batched vs single matmuls (linear decoder: < 1e-6)
    atol = 1e-4 if model.cfg.decoder == "mask" else 1e-5
    for i, one in enumerate(single):
        torch.testing.assert_close(batch.logits[i : i + 1], one.logits, atol=atol, rtol=0)
        assert batch.flow.tokens_per_block[i].tolist() == one.flow.tokens_per_block[0].tolist()
        assert torch.equal(batch.flow.cell_exit_depth[i], one.flow.cell_exit_depth[0])
