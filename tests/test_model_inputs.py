"""Bad input gets a clear error naming the field; configs round-trip through a dict."""

from __future__ import annotations

import pytest
import torch
import yaml
from pydantic import ValidationError

from step_model import ExitConfig, PolicyConfig, StepConfig, build_step_model

from helpers import tiny


def test_unknown_backbone_lists_close_names() -> None:
    with pytest.raises(ValueError, match=r"vit_base_patch16_384") as err:
        build_step_model(StepConfig(backbone="vit_bsae_patch16_384"))
    assert "backbone" in str(err.value)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: ExitConfig(thresholds=[0.5, 1.5]), "thresholds.1"),
        (lambda: PolicyConfig(thresholds={2: -0.1, 4: 0.5, 8: 0.5, 16: 0.5}), "thresholds.2"),
        (lambda: PolicyConfig(thresholds={3: 0.5}), "thresholds"),
        (lambda: ExitConfig(policy="greedy"), "policy"),
        (lambda: PolicyConfig(mode="budget"), "budget"),
        (lambda: StepConfig(decoder="unet"), "decoder"),
        (lambda: StepConfig(unknown=1), "unknown"),
    ],
)
def test_bad_config_values_name_the_field(make, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        make()
    assert field in str(err.value)


def test_config_round_trips_through_a_yaml_dict() -> None:
    cfg = StepConfig(num_classes=7, policy=PolicyConfig(mode="budget", budget=0.4),
                     exits=ExitConfig(blocks=[4, 8], thresholds=[0.9, 0.8]))
    text = yaml.safe_dump(cfg.to_dict())
    assert StepConfig.from_dict(yaml.safe_load(text)) == cfg


def test_set_inference_validates_and_switches_modes() -> None:
    model = tiny("threshold", exits=[3, 6])
    model.set_inference(budget=0.5, exit_thresholds=[0.9, 0.8], top_k=0, exit_policy="random")
    assert model.cfg.policy.mode == "budget" and model.cfg.exits.policy == "random"
    with pytest.raises(ValidationError, match="thresholds"):
        model.set_inference(exit_thresholds=[1.2, 0.5])
    with pytest.raises(ValueError, match="3 values for 2 exits"):
        model.set_inference(exit_thresholds=[0.9, 0.9, 0.9])
    with pytest.raises(ValidationError, match="mode"):
        model.set_inference(policy_mode="magic")
    assert model.cfg.policy.budget == 0.5  # failed calls changed nothing


def test_exit_blocks_beyond_the_depth_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"exits.blocks \[13\]"):
        tiny("none", exits=[13])


def test_oracle_without_labels_and_bad_image_shape() -> None:
    model = tiny("oracle")
    with pytest.raises(ValueError, match="needs labels"):
        model(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(3, 32, 32))


def test_uint8_images_are_refused_not_normalised_as_0_to_255() -> None:
    model = tiny("threshold")
    raw = (torch.rand(1, 3, 32, 32) * 255).to(torch.uint8)
    with pytest.raises(TypeError, match="float in \\[0, 1\\].*uint8"):
        model(raw)
    with pytest.raises(TypeError, match="float in \\[0, 1\\]"):
        model.policy(raw)
    model(raw.float() / 255)  # the same batch as floats runs
