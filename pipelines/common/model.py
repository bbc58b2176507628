"""The one place where ``pipelines`` turns a model-config dict into ``step_model`` objects.

The training config keeps ``model`` as the plain dict form of ``step_model.StepConfig``
(what ``model_config.yaml`` stores), validated by ``StepConfig`` itself so that its error
messages (dotted field names) reach the user unchanged, prefixed with ``model.``.
"""

from __future__ import annotations

from typing import Any

import torch


def normalize_model_config(data: dict[str, Any]) -> dict[str, Any]:
    """Validate with ``StepConfig`` and return the resolved dict (defaults filled in)."""
    from pydantic import ValidationError
    from pydantic_core import PydanticCustomError

    from step_model import StepConfig

    try:
        return StepConfig.model_validate(data).model_dump(mode="json")
    except ValidationError as err:
        # Re-raised for the enclosing TrainConfig, which reports it under `model`:
        # "model: policy.mode: Input should be ... (given: 'x')".
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: "
            f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
            + ("" if isinstance(e.get("input"), dict) else f" (given: {e.get('input')!r})")
            for e in err.errors()
        )
        raise PydanticCustomError("step_model_config", problems) from None


def step_config(data: dict[str, Any]):
    from step_model import StepConfig

    return StepConfig.model_validate(data)


def policy_mode(data: dict[str, Any]) -> str:
    return str((data.get("policy") or {}).get("mode", "threshold"))


def build_model(data: dict[str, Any]) -> torch.nn.Module:
    """``StepSegmenter`` from the config dict (architecture only; weights come separately)."""
    from step_model import build_step_model

    return build_step_model(step_config(data))
