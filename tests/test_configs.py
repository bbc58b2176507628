"""Every shipped training config loads and validates; bad configs fail with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.common.settings import ConfigError
from pipelines.train.config import TrainConfig, load_train_config

REPO = Path(__file__).resolve().parents[1]
# Training configs (configs/ also holds pipeline configs, validated by their own tests).
SHIPPED = [REPO / "configs" / "tiny" / "policy.yaml", REPO / "configs" / "tiny" / "step.yaml",
           *sorted((REPO / "configs" / "recipes").glob("*.yaml"))]


def test_the_recipes_are_all_there() -> None:
    names = {p.name for p in SHIPPED}
    assert {"policy.yaml", "step.yaml", "ade20k_512_vitb.yaml", "cityscapes_1024_vitl.yaml",
            "loveda_1024_vitb.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_validates(path: Path) -> None:
    cfg = load_train_config(path)
    assert cfg.stage in ("policy", "step")
    assert cfg.model["num_classes"] >= 1
    if "recipes" in path.parts:  # what a GPU cluster runs
        assert cfg.scaling.use_gpu and cfg.scaling.num_workers >= 4
        assert cfg.data.train and cfg.data.val
        assert cfg.data.crop_size in (512, 1024)
    else:  # what the tests and the demo run on this CPU
        assert not cfg.scaling.use_gpu and cfg.scaling.num_workers == 2


@pytest.mark.parametrize(("name", "backbone", "size", "classes", "exits"), [
    ("ade20k_512_vitb.yaml", "vit_base_patch16_384", 512, 150, [6, 8]),
    ("cityscapes_1024_vitl.yaml", "vit_large_patch16_384", 1024, 19, [8, 16]),
    ("loveda_1024_vitb.yaml", "vit_base_patch16_384", 1024, 7, [6, 8]),
])
def test_recipes_match_their_names(name, backbone, size, classes, exits) -> None:
    cfg = load_train_config(REPO / "configs" / "recipes" / name)
    assert cfg.model["backbone"] == backbone
    assert cfg.data.crop_size == size
    assert cfg.model["num_classes"] == classes
    assert cfg.model["exits"]["blocks"] == exits
    assert cfg.finetune.steps > 0 and cfg.policy_checkpoint


def test_errors_name_every_bad_field() -> None:
    with pytest.raises(ConfigError) as err:
        load_train_config(REPO / "configs/tiny/step.yaml",
                          ["optim.lr=-1", "data.bogus=1", "model.policy.mode=sometimes",
                           "data.crop_size=100"])
    text = str(err.value)
    assert "optim.lr" in text and "greater than 0" in text
    assert "data.bogus: unknown key" in text
    assert "policy.mode" in text and "sometimes" not in text.split("policy.mode")[0]
    assert "data.crop_size" in text and "multiple of the 16-pixel patch" in text


def test_stage_rules() -> None:
    with pytest.raises(ConfigError, match="the command is 'train policy'"):
        load_train_config(REPO / "configs/tiny/step.yaml", stage="policy")
    with pytest.raises(ConfigError, match="policy_checkpoint: required"):
        load_train_config(REPO / "configs/tiny/step.yaml", ["model.policy.mode=threshold"])
    with pytest.raises(ConfigError, match="exactly one of train.steps and train.epochs"):
        load_train_config(REPO / "configs/tiny/step.yaml", ["train.epochs=2"])
    cfg = load_train_config(REPO / "configs/tiny/step.yaml",
                            ["model.policy.mode=threshold", "policy_checkpoint=runs/x"])
    assert cfg.policy_checkpoint == "runs/x"


def test_model_section_is_resolved_by_step_model() -> None:
    cfg = TrainConfig.model_validate({"stage": "step", "model": {"num_classes": 3,
                                                                  "policy": {"mode": "oracle"}}})
    # defaults of StepConfig filled in: the resolved config is what gets saved
    assert cfg.model["backbone"] and "exits" in cfg.model and cfg.model["num_classes"] == 3


def test_cli_reports_config_errors_without_training(capsys) -> None:
    from pipelines.cli import main

    code = main(["train", "step", "--config", str(REPO / "configs/tiny/step.yaml"),
                 "--set", "optim.lr=0", "--set", "data.train=x", "--set", "data.val=y"])
    assert code == 2
    assert "optim.lr" in capsys.readouterr().err
    code = main(["train", "step", "--config", str(REPO / "configs/tiny/step.yaml")])
    assert code == 2
    assert "data.train: required" in capsys.readouterr().err
