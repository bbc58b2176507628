"""Every shipped training config loads and validates; bad configs fail with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.common.settings import ConfigError
from pipelines.train.config import TrainConfig, load_train_config
from step_model.config import StepConfig, split_legacy

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
    assert cfg.model.num_classes >= 1
    # the shipped configs are in the current layout: the architecture alone under model
    assert not split_legacy(yaml.safe_load(path.read_text())["model"])[1]
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
    assert cfg.model.backbone == backbone
    assert cfg.data.crop_size == size
    assert cfg.model.num_classes == classes
    assert cfg.model.exits.blocks == exits
    assert cfg.finetune.steps > 0 and cfg.policy_checkpoint
    assert cfg.inference.policy_mode == "threshold"
    assert cfg.inference.apply(cfg.finetune.inference).exit_thresholds == [0.95, 0.95]


def test_errors_name_every_bad_field() -> None:
    with pytest.raises(ConfigError) as err:
        load_train_config(REPO / "configs/tiny/step.yaml",
                          ["optim.lr=-1", "data.bogus=1", "inference.policy_mode=sometimes",
                           "data.crop_size=100"])
    text = str(err.value)
    assert "optim.lr" in text and "greater than 0" in text
    assert "data.bogus: unknown key" in text
    assert "inference.policy_mode" in text and "sometimes" in text
    assert "data.crop_size" in text and "multiple of the 16-pixel patch" in text


def test_stage_rules() -> None:
    with pytest.raises(ConfigError, match="the command is 'train policy'"):
        load_train_config(REPO / "configs/tiny/step.yaml", stage="policy")
    with pytest.raises(ConfigError, match="policy_checkpoint: required"):
        load_train_config(REPO / "configs/tiny/step.yaml", ["inference.policy_mode=threshold"])
    with pytest.raises(ConfigError, match="exactly one of train.steps and train.epochs"):
        load_train_config(REPO / "configs/tiny/step.yaml", ["train.epochs=2"])
    cfg = load_train_config(REPO / "configs/tiny/step.yaml",
                            ["inference.policy_mode=threshold", "policy_checkpoint=runs/x"])
    assert cfg.policy_checkpoint == "runs/x"
    # the fine-tuning phase's mode needs the policy too
    with pytest.raises(ConfigError, match="policy_checkpoint: required"):
        load_train_config(REPO / "configs/tiny/step.yaml",
                          ["finetune.steps=2", "finetune.inference.merge_thresholds=0.5"])
    # thresholds that do not fit the exits or the levels are refused before any training
    with pytest.raises(ConfigError, match=r"finetune.inference.exit_thresholds has 3 values"):
        load_train_config(REPO / "configs/tiny/step.yaml",
                          ["finetune.steps=2", "finetune.inference.exit_thresholds=0.5,0.6,0.7"])
    with pytest.raises(ConfigError, match=r"inference.merge_thresholds has no threshold for "
                                          r"level\(s\) \[8\]"):
        load_train_config(REPO / "configs/tiny/step.yaml",
                          ["inference.merge_thresholds=2=0.5,4=0.5"])


def test_model_section_is_resolved_by_step_model() -> None:
    cfg = TrainConfig.model_validate({"stage": "step", "model": {"num_classes": 3},
                                      "inference": {"policy_mode": "oracle"}})
    # defaults of StepConfig filled in: the resolved config is what gets saved
    assert cfg.model.backbone and cfg.model.exits.aux_weight == 0.4 and cfg.model.num_classes == 3
    assert cfg.inference.policy_mode == "oracle" and cfg.inference.exit_thresholds == [0.95]


def test_older_layout_moves_to_inference_and_errors_name_the_key_as_written() -> None:
    """Inference keys inside ``model`` (every config written before the split) still load:
    they become the ``inference`` section's defaults; a bad one is named as written."""
    cfg = TrainConfig.model_validate({"stage": "step", "model": {
        "num_classes": 3, "varlen": "per_image",
        "policy": {"mode": "oracle", "thresholds": {2: 0.8, 4: 0.6}, "levels": [2, 4]},
        "exits": {"blocks": [4, 8], "thresholds": [0.9, 0.8], "top_k": 2,
                  "halt_in_training": True}},
        "inference": {"top_k": 3}})
    assert cfg.model == StepConfig(num_classes=3, policy={"levels": [2, 4]},
                                   exits={"blocks": [4, 8]})
    inf = cfg.inference
    assert (inf.policy_mode, inf.merge_thresholds[2], inf.exit_thresholds, inf.varlen) == \
        ("oracle", 0.8, [0.9, 0.8], "per_image")
    assert inf.top_k == 2  # an older key wins: a --set made for an older file is later
    with pytest.raises(ConfigError) as err:
        load_train_config(REPO / "configs/tiny/step.yaml", ["model.policy.mode=sometimes",
                                                           "model.exits.top_k=-1"])
    text = str(err.value)
    assert "model.policy.mode: Input should be" in text and "'sometimes'" in text
    assert "model.exits.top_k: Input should be greater than or equal to 0" in text


@pytest.mark.parametrize(("setting", "field"), [
    ("finetune.inference.exit_treshold=0.5", "finetune.inference.exit_treshold"),
    ("finetune.inference.policy_mode=sometimes", "finetune.inference.policy_mode"),
    ("finetune.inference.top_k=-2", "finetune.inference.top_k"),
])
def test_a_typo_in_finetune_inference_is_refused_when_the_config_loads(setting, field, capsys):
    """Not after the 64k base steps of a recipe: exit 2 before anything starts, naming the
    field."""
    from pipelines.cli import main

    code = main(["train", "step", "--config", str(REPO / "configs/recipes/loveda_1024_vitb.yaml"),
                 "--set", setting])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("step train step: error: ") and field in err


def test_cli_reports_config_errors_without_training(capsys) -> None:
    from pipelines.cli import main

    code = main(["train", "step", "--config", str(REPO / "configs/tiny/step.yaml"),
                 "--set", "optim.lr=0", "--set", "data.train=x", "--set", "data.val=y"])
    assert code == 2
    assert "optim.lr" in capsys.readouterr().err
    code = main(["train", "step", "--config", str(REPO / "configs/tiny/step.yaml")])
    assert code == 2
    assert "data.train: required" in capsys.readouterr().err
