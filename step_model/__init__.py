"""STEP: SuperToken and Early-Pruning ViTs for high-resolution semantic segmentation.

Public API (see docs/architecture.md)::

    cfg = StepConfig(backbone="vit_tiny_patch16_384", num_classes=7,
                     exits=ExitConfig(blocks=[4, 8]))                     # the architecture
    model = build_step_model(cfg, InferenceConfig(policy_mode="oracle"))  # + how it runs
    out = model(images, labels)          # StepOutput: logits, flow, exit_logits, policy_logits
    model.set_inference(exit_thresholds=0.9)                # a new InferenceConfig, validated
    # the same, piece by piece (see step_model.model):
    tokens = model.forward_tokens(images, labels)             # SuperTokens
    encoded = model.forward_encoder(tokens)                   # EncodedTokens
    logits, token_logits = model.forward_head(tokens, encoded)
    flow = model.token_flow(tokens, encoded)                  # TokenFlow
    losses = step_loss(out, labels, cfg)

The names load on first use (PEP 562), so that ``import step_model.config`` (the configs
and constants, pydantic only) does not import torch and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the submodule that defines it
_EXPORTS = {
    "IGNORE_INDEX": "config",
    "LEVELS": "config",
    "PATCH": "config",
    "ExitConfig": "config",
    "InferenceConfig": "config",
    "InferenceOverrides": "config",
    "PolicyConfig": "config",
    "StepConfig": "config",
    "split_model_config": "config",
    "flop_counter": "flops",
    "flops_by_part": "flops",
    "measure_gflops": "flops",
    "policy_loss": "losses",
    "step_loss": "losses",
    "token_majority_labels": "losses",
    "EncodedTokens": "model",
    "StepOutput": "model",
    "StepSegmenter": "model",
    "SuperTokens": "model",
    "TokenFlow": "model",
    "build_step_model": "model",
    "PolicyNet": "policy",
    "load_lite0_weights": "policy",
    "policy_targets": "policy",
    "TokenLayout": "selection",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
