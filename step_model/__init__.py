"""STEP: SuperToken and Early-Pruning ViTs for high-resolution semantic segmentation.

Public API (see docs/architecture.md)::

    cfg = StepConfig(backbone="vit_tiny_patch16_384", num_classes=7,
                     policy=PolicyConfig(mode="oracle"), exits=ExitConfig(blocks=[4, 8]))
    model = build_step_model(cfg)
    out = model(images, labels)          # StepOutput: logits, flow, exit_logits, policy_logits
    # the same, piece by piece (see step_model.model):
    tokens = model.forward_tokens(images, labels)             # SuperTokens
    encoded = model.forward_encoder(tokens)                   # EncodedTokens
    logits, token_logits = model.forward_head(tokens, encoded)
    flow = model.token_flow(tokens, encoded)                  # TokenFlow
    losses = step_loss(out, labels, cfg)
"""

from .config import IGNORE_INDEX, ExitConfig, PolicyConfig, StepConfig
from .flops import flop_counter, measure_gflops
from .losses import policy_loss, step_loss, token_majority_labels
from .model import (
    EncodedTokens,
    StepOutput,
    StepSegmenter,
    SuperTokens,
    TokenFlow,
    build_step_model,
)
from .policy import PolicyNet, load_lite0_weights, policy_targets
from .selection import TokenLayout

__all__ = [
    "IGNORE_INDEX",
    "EncodedTokens",
    "ExitConfig",
    "PolicyConfig",
    "PolicyNet",
    "StepConfig",
    "StepOutput",
    "StepSegmenter",
    "SuperTokens",
    "TokenFlow",
    "TokenLayout",
    "build_step_model",
    "flop_counter",
    "load_lite0_weights",
    "measure_gflops",
    "policy_loss",
    "policy_targets",
    "step_loss",
    "token_majority_labels",
]
