"""Bad input gets a clear error naming the field; configs round-trip through a dict."""

from __future__ import annotations

import pytest
import torch
import yaml
from pydantic import ValidationError

from step_model import ExitConfig, InferenceConfig, PolicyConfig, StepConfig, build_step_model

from helpers import tiny


def test_unknown_backbone_lists_close_names() -> None:
    with pytest.raises(ValueError, match=r"vit_base_patch16_384") as err:
        build_step_model(StepConfig(backbone="vit_bsae_patch16_384"))
    assert "backbone" in str(err.value)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: InferenceConfig(exit_thresholds=[0.5, 1.5]), "exit 2: 1.5 is not in [0, 1]"),
        (lambda: InferenceConfig(merge_thresholds={2: -0.1, 4: 0.5}), "merge_thresholds"),
        (lambda: InferenceConfig(merge_thresholds={3: 0.5}), "level 3 is not a superpatch"),
        (lambda: InferenceConfig(exit_policy="greedy"), "exit_policy"),
        (lambda: InferenceConfig(policy_mode="budget"), "needs budget"),
        (lambda: InferenceConfig(thresholds=0.5), "thresholds"),
        (lambda: StepConfig(decoder="unet"), "decoder"),
        (lambda: StepConfig(unknown=1), "unknown"),
        (lambda: PolicyConfig(mode="oracle"), "mode"),  # an inference setting now
        (lambda: ExitConfig(thresholds=[0.9]), "thresholds"),
    ],
)
def test_bad_config_values_name_the_field(make, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        make()
    assert field in str(err.value)


def test_config_round_trips_through_a_yaml_dict() -> None:
    cfg = StepConfig(num_classes=7, policy=PolicyConfig(levels=[2, 4], input_scale=0.5),
                     exits=ExitConfig(blocks=[4, 8]))
    text = yaml.safe_dump(cfg.to_dict())
    assert StepConfig.from_dict(yaml.safe_load(text)) == cfg
    inf = InferenceConfig(policy_mode="budget", budget=0.4, exit_thresholds=[0.9, 0.8])
    assert InferenceConfig.model_validate(yaml.safe_load(yaml.safe_dump(inf.to_dict()))) == inf


def test_configs_are_frozen() -> None:
    """The architecture never changes after the build, and inference settings are replaced
    whole, never edited in place."""
    cfg, inf = StepConfig(), InferenceConfig()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.exits.blocks = [1]  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        inf.halting = False  # type: ignore[misc]
    from step_model import StepSegmenter

    # read-only on the model: no setter to swap either (set_inference replaces the settings)
    assert StepSegmenter.cfg.fset is None and StepSegmenter.inference.fset is None


def test_set_inference_validates_and_switches_modes() -> None:
    model = tiny("threshold", exits=[3, 6])
    new = model.set_inference(budget=0.5, exit_thresholds=[0.9, 0.8], top_k=0,
                              exit_policy="random")
    assert new is model.inference
    assert model.inference.policy_mode == "budget" and model.inference.exit_policy == "random"
    with pytest.raises(ValidationError, match="not in"):
        model.set_inference(exit_thresholds=[1.2, 0.5])
    with pytest.raises(ValueError, match="3 values for 2 exits"):
        model.set_inference(exit_thresholds=[0.9, 0.9, 0.9])
    with pytest.raises(ValidationError, match="policy_mode"):
        model.set_inference(policy_mode="magic")
    with pytest.raises(ValidationError, match="exit_treshold"):
        model.set_inference(exit_treshold=0.5)
    assert model.inference is new  # failed calls changed nothing
    # merge thresholds alone switch to threshold mode and replace the levels given
    model.set_inference(merge_thresholds={4: 0.7})
    assert model.inference.policy_mode == "threshold"
    assert model.inference.merge_thresholds == {2: 0.5, 4: 0.7, 8: 0.5, 16: 0.5}
    # an InferenceConfig replaces the settings whole; overrides change only what they set
    model.set_inference(InferenceConfig(top_k=2))
    assert model.inference == InferenceConfig(top_k=2)
    model.set_inference({"halting": False}, top_k=1)
    assert model.inference == InferenceConfig(top_k=1, halting=False)


def test_inference_scope_restores_the_settings_and_the_random_draws() -> None:
    model = tiny("none", exits=[3], inference={"exit_thresholds": [0.0], "top_k": 0})
    before = model.inference
    with model.inference_scope(policy_mode="oracle", halting=False) as inside:
        assert inside.policy_mode == "oracle" and model.inference is inside
    assert model.inference is before
    with pytest.raises(RuntimeError), model.inference_scope(top_k=3):
        raise RuntimeError("the settings come back after an error too")
    assert model.inference is before
    # a new seed reseeds the random exits' generator, restoring it too
    model.set_inference(exit_policy="random", exit_seed=7)
    torch.rand(3, generator=model.exit_generator())  # draws move the generator on
    with model.inference_scope(exit_seed=8):
        assert torch.equal(model.exit_generator().get_state(),
                           torch.Generator().manual_seed(8).get_state())
        torch.rand(3, generator=model.exit_generator())
    assert torch.equal(model.exit_generator().get_state(),
                       torch.Generator().manual_seed(7).get_state())


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
