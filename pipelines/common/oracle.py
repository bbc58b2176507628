"""The label oracle as a policy mode: allowed only when asked for, and labelled when used.

Policy mode ``oracle`` chooses the superpatches from the *labels*: its figures are an upper
bound that no deployed model can reach, not a result. ``step eval``, ``step tune`` and the
pipeline's report refuse it unless ``--allow-oracle`` (``allow_oracle``) is given, and
whatever they compute with it carries ``uses_labels`` / ``upper_bound`` (JSON, MLflow tags,
the printed line).
"""

from __future__ import annotations

from typing import Any

from pipelines.common.settings import ConfigError

ORACLE_TAGS = {"step.uses_labels": "true", "step.upper_bound": "true"}
ORACLE_NOTE = "upper bound: the oracle policy selects tokens from the labels"


def checkpoint_inference(checkpoint: str, inference: Any = None):
    """The inference settings ``checkpoint`` runs with once ``inference`` (changes:
    ``InferenceOverrides`` or its dict) is applied to its own (local or s3://)."""
    from pipelines.common.checkpoint import read_configs

    return read_configs(checkpoint)[1].apply(inference)


def uses_oracle(checkpoint: str, inference: Any = None) -> bool:
    """Whether evaluating ``checkpoint`` with ``inference`` runs the label oracle."""
    return checkpoint_inference(checkpoint, inference).policy_mode == "oracle"


def refuse_oracle(what: str, flag: str = "--allow-oracle") -> None:
    raise ConfigError(
        f"{what}: policy mode 'oracle' selects the tokens from the labels, so its figures "
        f"are an upper bound, not a model's result; pass {flag} to compute them anyway "
        "(labelled uses_labels / upper_bound), or use a learned mode (threshold, budget)")
