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


def effective_policy_mode(model_mode: str | None, inference: dict[str, Any] | None) -> str:
    """The mode ``StepSegmenter.set_inference(**inference)`` leaves a model of mode
    ``model_mode`` in (its rules: ``merge_thresholds`` -> threshold, ``budget`` -> budget,
    ``policy_mode`` last)."""
    inf = inference or {}
    mode = model_mode or "threshold"
    if inf.get("merge_thresholds") is not None:
        mode = "threshold"
    if inf.get("budget") is not None:
        mode = "budget"
    if inf.get("policy_mode") is not None:
        mode = str(inf["policy_mode"])
    return mode


def checkpoint_policy_mode(checkpoint: str) -> str:
    """The policy mode saved in a checkpoint's ``model_config.yaml`` (local or s3://)."""
    import yaml

    from data_prep import storage
    from pipelines.common.checkpoint import CONFIG_FILE

    data = yaml.safe_load(storage.read_bytes(storage.join(checkpoint, CONFIG_FILE)))
    return str(((data or {}).get("policy") or {}).get("mode", "threshold"))


def uses_oracle(checkpoint: str, inference: dict[str, Any] | None) -> bool:
    """Whether evaluating ``checkpoint`` with ``inference`` runs the label oracle; the
    checkpoint's config is read only when ``inference`` does not decide it."""
    inf = inference or {}
    if any(inf.get(k) is not None for k in ("policy_mode", "merge_thresholds", "budget")):
        return effective_policy_mode(None, inf) == "oracle"
    return checkpoint_policy_mode(checkpoint) == "oracle"


def refuse_oracle(what: str, flag: str = "--allow-oracle") -> None:
    raise ConfigError(
        f"{what}: policy mode 'oracle' selects the tokens from the labels, so its figures "
        f"are an upper bound, not a model's result; pass {flag} to compute them anyway "
        "(labelled uses_labels / upper_bound), or use a learned mode (threshold, budget)")
