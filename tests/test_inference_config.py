"""One inference config for the whole system: the architecture and the inference settings
apart, every consumer generated from InferenceConfig, each constant defined once and
importable without torch. Fast: no Ray, no training."""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import torch
import yaml

from step_model.config import InferenceConfig, InferenceOverrides, StepConfig

from helpers import printed_settings

REPO = Path(__file__).resolve().parents[1]

# The commands that run a model, each with what it needs besides the inference flags.
RUNNERS = {
    ("eval",): ["--checkpoint", "c", "--data", "d"],
    ("predict",): ["--model", "m", "--images", "i", "--out", "o"],
    ("analyze",): ["--checkpoint", "c", "--data", "d"],
    ("tune",): ["--checkpoint", "c", "--data", "d"],
    ("bench", "model"): [],
}


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped configs are given relative to the repository


def _sample(name: str) -> tuple[list[str], str]:
    """A valid value other than the default for InferenceConfig's field ``name``, from its
    type alone: (the flag arguments, the ``--set`` text)."""
    info = InferenceConfig.model_fields[name]
    default = InferenceConfig().model_dump()[name]
    flag = "--" + name.replace("_", "-")
    if info.metadata and any("Validator" in type(m).__name__ for m in info.metadata):
        return [flag, "0.25"], "0.25"  # the one threshold syntax: one value for all
    tp = info.annotation
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[X]: X
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if tp is bool:
        return [flag if not default else "--no-" + name.replace("_", "-")], str(not default).lower()
    if typing.get_origin(tp) is typing.Literal:
        value = next(v for v in typing.get_args(tp) if v != default)
        return [flag, str(value)], str(value)
    if tp is int:
        return [flag, str(default + 1)], str(default + 1)
    return [flag, "0.5"], "0.5"  # a float setting: 0.5 fits a probability and a fraction


def _every_field() -> tuple[list[str], list[str], dict]:
    """Flags and ``--set`` items setting every InferenceConfig field, and the settings
    they give (validated by InferenceOverrides, dumped as --print-config shows them)."""
    argv, items, given = [], [], {}
    for name in InferenceConfig.model_fields:
        flag, text = _sample(name)
        argv += flag
        items.append(f"{name}={text}")
        given[name] = yaml.safe_load(text)
    return argv, items, InferenceOverrides.model_validate(given).model_dump(mode="json")


@pytest.mark.parametrize("path", sorted(RUNNERS), ids=" ".join)
def test_every_command_has_a_flag_per_inference_setting(path):
    """Adding a field to InferenceConfig gives every command that runs a model its flag."""
    import importlib

    from pipelines.cli.app import COMMANDS

    command = importlib.import_module(COMMANDS[path][0]).COMMAND
    flags: dict[str, set[str]] = {}
    for f in command.setting_flags():
        flags.setdefault(f.field, set()).update(f.flags)
    for name in InferenceConfig.model_fields:
        assert "--" + name.replace("_", "-") in flags.get(f"inference.{name}", ()), (path, name)


def test_every_command_and_finetuning_read_the_same_settings(capsys):
    """The same inference flags give the same settings on every command, and the same keys
    the same fine-tuning phase: one vocabulary, generated from one config."""
    argv, items, expected = _every_field()
    assert set(expected) == set(InferenceConfig.model_fields)
    for path, required in RUNNERS.items():
        got = printed_settings(capsys, [*path, *required, *argv])["inference"]
        assert got == expected, path
    got = printed_settings(capsys, ["train", "step", "--config", "configs/tiny/step.yaml",
                            "--set", "finetune.steps=2",
                            *(x for item in items for x in ("--set", f"finetune.inference.{item}"))])
    assert got["finetune"]["inference"] == expected
    # the older spellings stay
    assert printed_settings(capsys, ["bench", "model", "--policy", "oracle", "--thresholds", "0.3"]
                    )["inference"] == {"policy_mode": "oracle", "exit_thresholds": [0.3]}


def test_the_search_space_and_the_registry_take_every_setting():
    from pipelines.tracking.registry import inference_from_tags, inference_tags
    from pipelines.tune.space import SearchSpace

    space_fields = set(SearchSpace.model_fields) - {"name", "description"}
    assert space_fields == set(InferenceConfig.model_fields)
    chosen = InferenceConfig(policy_mode="budget", budget=0.4, exit_thresholds=[0.7, 0.6],
                             top_k=2, halting=False, upsample="logits")
    tags = inference_tags(chosen)
    assert set(InferenceConfig.model_fields) < set(tags)  # a flat tag per setting
    assert all(isinstance(v, str) for v in tags.values())
    assert InferenceConfig().apply(inference_from_tags(tags)) == chosen
    # a version registered before step.inference existed: its changes still apply
    old = {"inference": '{"exit_thresholds": [0.5, 0.5], "merge_thresholds": {"2": 0.7}}'}
    assert InferenceConfig().apply(inference_from_tags(old)).merge_thresholds[2] == 0.7


def test_a_new_setting_reaches_every_consumer_with_no_other_change(tmp_path):
    """What the next inference settings (an exit score rule, a calibration temperature ...)
    rely on: a copy of the code with one field added to InferenceConfig, and nothing else,
    has its flag on every command, its key in fine-tuning and YAML, its dimension in the
    search space (validated by the field's own rule), its registry tag, and a checkpoint
    keeps it."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "demo_data", "docs", "tests", "__pycache__", "*.egg-info"))
    config = copy / "step_model" / "config.py"
    anchor = '''    varlen: VarlenStrategy = Field('''
    text = config.read_text()
    assert text.count(anchor) == 1
    config.write_text(text.replace(anchor, '''    temperature: float = Field(1.0, gt=0.0, description="softmax temperature")
''' + anchor))
    (tmp_path / "space.yaml").write_text(
        "name: t\ntemperature: {type: uniform, low: 0.5, high: 2.0, step: 0.5}\n")
    (tmp_path / "bad.yaml").write_text("name: t\ntemperature: {type: choice, values: [0, 1]}\n")
    script = f'''
import sys, yaml
from pipelines.cli import main
for argv in (["eval", "--checkpoint", "c", "--data", "d"], ["predict", "--model", "m",
             "--images", "i", "--out", "o"], ["analyze", "--checkpoint", "c", "--data", "d"],
             ["tune", "--checkpoint", "c", "--data", "d"], ["bench", "model"]):
    assert main([*argv, "--temperature", "2", "--print-config"]) == 0, argv
assert main(["train", "step", "--config", "configs/tiny/step.yaml", "--set", "finetune.steps=2",
             "--set", "finetune.inference.temperature=2", "--print-config"]) == 0
assert main(["train", "step", "--config", "configs/tiny/step.yaml",
             "--set", "finetune.inference.temperature=0", "--print-config"]) == 2
from pipelines.tune.space import load_space
from pipelines.common.settings import ConfigError
space = load_space({str(tmp_path / "space.yaml")!r})
assert space.to_inference({{"temperature": 1.5}}).temperature == 1.5
try:
    load_space({str(tmp_path / "bad.yaml")!r})
    raise SystemExit("a temperature of 0 was accepted")
except ConfigError as err:
    assert "temperature" in str(err)
from pipelines.tracking.registry import inference_from_tags, inference_tags
from step_model.config import InferenceConfig, split_model_config
tags = inference_tags(InferenceConfig(temperature=3.0))
assert tags["temperature"] == "3.0"
assert inference_from_tags(tags).temperature == 3.0
assert split_model_config({{}}, InferenceConfig.model_validate(
    yaml.safe_load(yaml.safe_dump(InferenceConfig(temperature=3.0).to_dict()))))[1].temperature == 3.0
print("reached", "torch" in sys.modules)
'''
    out = subprocess.run([sys.executable, "-c", script], cwd=copy, capture_output=True,
                         text=True, env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"},
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout
    assert printed.count("temperature: 2") == 6  # the five commands and fine-tuning
    assert "reached False" in printed  # and none of it needed torch


def test_config_modules_import_without_torch():
    """Configs and command definitions are torch-free: the constants and types they need
    live in step_model.config (step_model/__init__ loads names lazily)."""
    modules = ["step_model.config", "step_model.bench", "step_model", "pipelines.common.settings",
               "pipelines.tune.space", "pipelines.evaluate.settings", "pipelines.train.config",
               "pipelines.predict.settings", "pipelines.analyze.settings",
               "pipelines.workflow.config", "pipelines.tracking.registry",
               "pipelines.cli.eval", "pipelines.cli.tune", "pipelines.cli.bench_model"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "    assert 'torch' not in sys.modules, m\n"
            "from step_model import LEVELS, InferenceConfig\n"
            "assert 'torch' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]


def test_each_constant_is_defined_once():
    import data_prep.conventions
    import pipelines.common.settings as settings
    import pipelines.evaluate.compute as compute
    import step_model.config as config

    # two packages that may not import each other: the data contract and the model agree
    assert data_prep.conventions.IGNORE_INDEX == config.IGNORE_INDEX
    assert (1, *config.LEVELS) == compute.ALL_LEVELS
    for name in ("StrictModel", "parse_thresholds", "ExitThresholds", "MergeThresholds",
                 "EXIT_THRESHOLDS_SYNTAX", "MERGE_THRESHOLDS_SYNTAX"):
        assert getattr(settings, name) is getattr(config, name), name
    sources = {p: p.read_text() for p in (REPO / "pipelines").rglob("*.py")}
    for needle in ("(2, 4, 8, 16)", '"segmenter:"', "class StrictModel", "def _autocast",
                   "def flops_by_part", "IGNORE_INDEX = "):
        assert not [str(p) for p, text in sources.items() if needle in text], needle


# ---- checkpoints: the architecture and the inference settings apart -----------------------

TINY = StepConfig(num_classes=3, policy={"pretrained": False, "levels": [2, 4]},
                  exits={"blocks": [2, 4]})


def test_an_older_checkpoint_loads_with_its_inference_settings(tmp_path):
    """A checkpoint written before inference.yaml existed: model_config.yaml in the older
    layout (inference keys inside, as every training wrote them so far)."""
    from pipelines.common.checkpoint import INFERENCE_FILE, load_model, save_checkpoint
    from pipelines.common.model import build_model

    model = build_model(TINY)
    ckpt = save_checkpoint(tmp_path / "old", model)
    (ckpt / INFERENCE_FILE).unlink()
    older = TINY.to_dict()
    older["policy"].update(mode="oracle", thresholds={2: 0.7, 4: 0.6, 8: 0.5, 16: 0.5},
                           budget=None)
    older["exits"].update(thresholds=[0.8, 0.9], top_k=1, policy="confidence", halting=True,
                          halt_in_training=True, seed=4)
    older.update(varlen="per_image", upsample="logits")
    (ckpt / "model_config.yaml").write_text(yaml.safe_dump(older))

    loaded, arch = load_model(ckpt)
    assert StepConfig.model_validate(arch) == TINY
    assert loaded.inference == InferenceConfig(
        policy_mode="oracle", merge_thresholds={2: 0.7, 4: 0.6, 8: 0.5, 16: 0.5},
        exit_thresholds=[0.8, 0.9], exit_score="confidence",  # the score of its time
        top_k=1, exit_seed=4, varlen="per_image", upsample="logits")
    assert not loaded.halts_in_training  # a training phase, dropped from the settings
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
