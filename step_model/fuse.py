"""Inference-only rewrites of the policy network: batch norm folded into convolutions,
channels-last memory format, compilation.

**Folding.** In eval mode a batch norm is an affine map per channel; after a convolution
it folds into the convolution's weights and bias (``torch.nn.utils.fusion.
fuse_conv_bn_weights``), one kernel less per pair. Which convolution feeds which batch
norm is not read from module names: one eval forward with hooks records, for every batch
norm, whether its input *is* the output of a convolution (the same tensor object), and
only those pairs are folded. The timm policy networks use a convolution's output for its
batch norm alone, which folding needs. timm's ``BatchNormAct2d`` keeps its dropout and
activation (:class:`AfterNorm`). Folding changes rounding only: the masks agree with the
unfolded model's except where a merge score sits within float32 rounding of its threshold
(the tolerance, tested on real images in ``tests/test_fuse.py``).

**Compilation.** ``torch.compile`` of the policy network (``nn.Module.compile``: in place,
the state dict keeps its keys). EfficientNet-Lite0's depthwise convolutions and timm's
"same" padding run as many small kernels; fused by Inductor, the CamVid policy's forward
took 8.7 instead of 20 ms on a 2-core CPU (``step bench model --compile-policy``,
docs/speed.md). The first forward of each input size compiles (tens of seconds on a CPU,
with a C++ compiler), so it is opt-in: it pays on long prediction jobs, not on a few images.
Outputs agree with eager mode within float32 rounding.

A folded model is for inference: its state dict no longer matches the checkpoint's
(never save it), and its policy cannot be trained again.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights


class AfterNorm(nn.Module):
    """What a folded ``BatchNormAct2d`` still does: its dropout, then its activation."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def conv_bn_pairs(net: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(convolution, batch norm) module names where the norm reads the convolution's
    output tensor itself, found by one no-grad forward of ``example``."""
    convs = {n: m for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    norms = {n: m for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # tensors kept alive: ids stay unique
    pairs: list[tuple[str, str]] = []
    handles = []
    for name, conv in convs.items():
        def keep(_m, _i, out, name=name):
            outputs[id(out)] = (name, out)
        handles.append(conv.register_forward_hook(keep))
    for name, bn in norms.items():
        def match(_m, args, name=name):
            hit = outputs.get(id(args[0]))
            if hit is not None and hit[1] is args[0]:
                pairs.append((hit[0], name))
        handles.append(bn.register_forward_pre_hook(match))
    try:
        with torch.no_grad():
            net(example)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(pairs))


def fold_conv_batchnorm(net: nn.Module, example: torch.Tensor) -> int:
    """Fold every eval-mode batch norm that follows a convolution into it, in place;
    returns the number folded. ``net`` must be in eval mode (running statistics)."""
    if net.training:
        raise ValueError("fold_batchnorm: the network must be in eval mode")
    pairs = conv_bn_pairs(net, example)
    for conv_name, bn_name in pairs:
        conv, bn = net.get_submodule(conv_name), net.get_submodule(bn_name)
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                    bn.eps, bn.weight, bn.bias)
        conv.weight, conv.bias = w, b
        after = AfterNorm(bn.drop, bn.act) if hasattr(bn, "act") else nn.Identity()
        parent, _, leaf = bn_name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, leaf, after)
    return len(pairs)


COMPILE_FREEZING = True


def prepare_for_inference(model, *, fold_batchnorm: bool = True,
                          channels_last: bool = False, compile_policy: bool = False,
                          example_size: int = 64) -> dict:
    """The inference rewrites of a :class:`~step_model.model.StepSegmenter`'s policy
    network, in place (eval mode set): batch norms folded, channels-last weights, compiled.
    Returns what was done ({"batchnorms_folded": n, "channels_last": bool, "compiled": bool})."""
    model.eval()
    policy = model.policy
    done = {"batchnorms_folded": 0, "channels_last": False, "compiled": False}
    if fold_batchnorm and any(isinstance(m, nn.BatchNorm2d) for m in policy.modules()):
        p = next(policy.parameters())
        example = torch.rand(1, 3, example_size, example_size, device=p.device)
        done["batchnorms_folded"] = fold_conv_batchnorm(policy, example)
    if channels_last:
        policy.to(memory_format=torch.channels_last)
        done["channels_last"] = True
    if compile_policy and policy is not None:
        # after folding: the compiled graph is the folded network's. Freezing (inductor's
        # inference-only pass) treats the weights as constants, so that on a CPU the
        # convolutions' weights are packed once for oneDNN instead of at every call
        policy.compile(options={"freezing": COMPILE_FREEZING})
        done["compiled"] = True
    return done
