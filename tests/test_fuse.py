"""Batch norm folded into the policy network's convolutions (``step_model.fuse``): the
same policy logits within float32 rounding and the same masks on real images (the demo's
LoveDA scenes, the Cityscapes and Potsdam fixtures)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import LOVEDA, tiny

DATA = Path(__file__).parent / "data"
# documented tolerance: folding reorders float32 arithmetic; logits move by ~1e-5
LOGIT_ATOL = 1e-4
MASK_AGREEMENT = 0.999  # masks may differ only where a score sits at a threshold's rounding


def _real_images() -> list[torch.Tensor]:
    files = [*sorted((LOVEDA / "img_dir").glob("*.png"))[:2],
             *sorted((DATA / "cityscapes_mini" / "leftImg8bit").rglob("*.png"))[:1],
             *sorted((DATA / "potsdam" / "img_dir").glob("*.png"))[:1]]
    out = []
    for f in files:
        im = Image.open(f).convert("RGB")
        if max(im.size) > 256:  # keep the CPU test short; the content stays real
            im = im.resize((256, 256), Image.BILINEAR)
        out.append(torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255)
    return out


@pytest.fixture(scope="module")
def models():
    from step_model.fuse import prepare_for_inference

    model = tiny("threshold", exits=[4, 8], inference={"exit_thresholds": [0.6],
                                                       "merge_thresholds": 0.5})
    gen = torch.Generator().manual_seed(1)
    for m in model.policy.modules():  # trained-like statistics, not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
    folded = copy.deepcopy(model)
    done = prepare_for_inference(folded)
    return model, folded, done


def test_every_batchnorm_of_the_policy_network_is_folded(models):
    model, folded, done = models
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.policy.modules())
    assert n_bn > 0 and done["batchnorms_folded"] == n_bn
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.policy.modules())
    # the activations stayed: ReLU6 after the folded norms
    assert sum(isinstance(m, torch.nn.ReLU6) for m in folded.policy.modules()) == \
        sum(isinstance(m, torch.nn.ReLU6) for m in model.policy.modules())


def test_folded_policy_gives_the_same_logits_and_masks_on_real_images(models):
    model, folded, _ = models
    with torch.inference_mode():
        for img in _real_images():
            a, b = model.policy(img), folded.policy(img)
            for s in a:
                assert torch.allclose(a[s], b[s], atol=LOGIT_ATOL), s
            out_a, out_b = model(img), folded(img)
            assert torch.equal(out_a.flow.num_tokens, out_b.flow.num_tokens)
            agree = (out_a.logits.argmax(1) == out_b.logits.argmax(1)).float().mean()
            assert agree >= MASK_AGREEMENT


def test_folding_needs_eval_mode_and_leaves_batchnorm_free_networks_alone():
    from step_model.fuse import fold_conv_batchnorm, prepare_for_inference

    model = tiny("threshold")
    with pytest.raises(ValueError, match="eval mode"):
        fold_conv_batchnorm(model.policy.train(), torch.rand(1, 3, 64, 64))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    assert fold_conv_batchnorm(net, torch.rand(1, 3, 8, 8)) == 0
    # a batch norm that does not read a convolution's output is not folded
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                              torch.nn.BatchNorm2d(4)).eval()
    assert fold_conv_batchnorm(net, torch.rand(1, 3, 8, 8)) == 0
    done = prepare_for_inference(model, fold_batchnorm=False, channels_last=True)
    assert done == {"batchnorms_folded": 0, "channels_last": True, "compiled": False}


@pytest.mark.integration  # Inductor compiles C++ on the CPU: about half a minute
def test_compiled_policy_gives_the_folded_logits_and_masks_on_real_images(models):
    from step_model.fuse import prepare_for_inference

    _, folded, _ = models
    compiled = copy.deepcopy(folded)
    done = prepare_for_inference(compiled, fold_batchnorm=False, compile_policy=True)
    assert done["compiled"]
    img = _real_images()[0]
    with torch.inference_mode():
        a, b = folded.policy(img), compiled.policy(img)
        for s in a:
            assert torch.allclose(a[s], b[s], atol=LOGIT_ATOL), s
        out_a, out_b = folded(img), compiled(img)
    assert torch.equal(out_a.flow.num_tokens, out_b.flow.num_tokens)
    assert (out_a.logits.argmax(1) == out_b.logits.argmax(1)).float().mean() >= MASK_AGREEMENT
    # the checkpoint's keys survive: a compiled policy still matches the saved weights
    assert compiled.policy.state_dict().keys() == folded.policy.state_dict().keys()


def test_full_resolution_logits_are_channels_last_with_unchanged_values(models):
    """The mask's argmax reads the class axis contiguously (channels-last); the values are
    those of the upsampling done channels-first."""
    import torch.nn.functional as F

    model, _, _ = models
    img = _real_images()[0]
    with torch.inference_mode():
        tokens = model.forward_tokens(img)
        logits, token_logits = model.forward_head(tokens, model.forward_encoder(tokens))
    assert logits.is_contiguous(memory_format=torch.channels_last) or logits.stride(1) == 1
    gh, gw = tokens.layout.grid
    grid = token_logits.gather(1, tokens.layout.cell_to_token[..., None].expand(
        -1, -1, token_logits.shape[-1])).transpose(1, 2).reshape(1, -1, gh, gw)
    ref = F.interpolate(grid.softmax(1).contiguous(), size=(gh * 16, gw * 16),
                        mode="bilinear")[..., :img.shape[-2], :img.shape[-1]].clamp_min(1e-8).log()
    assert torch.allclose(logits, ref, atol=1e-6)
    assert torch.equal(logits.argmax(1), ref.argmax(1))
