"""The one command layer: every ``step`` subcommand is generated from one typed
settings model; ``--config``/``--set``/flags, ``--json`` (local or S3), error lines and the
one threshold syntax are shared. Fast: no Ray, no training."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml
from pydantic import Field

from pipelines.cli import main
from pipelines.cli.app import COMMANDS
from pipelines.cli.command import Alias, Command, Result
from pipelines.common.settings import (
    ExitThresholds,
    MergeThresholds,
    StrictModel,
    load_config,
    parse_thresholds,
)
from step_model.config import LEVELS

from helpers import printed_settings

REPO = Path(__file__).resolve().parents[1]
GENERATED = sorted(COMMANDS)


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped configs are given relative to the repository


# ---- every command is generated, and its --help works ------------------------------------


@pytest.mark.parametrize("path", GENERATED, ids=" ".join)
def test_every_command_is_generated_from_its_settings_model(path, capsys):
    module = importlib.import_module(COMMANDS[path][0])
    command = module.COMMAND
    assert isinstance(command, Command)
    assert module.configure == command.configure and module.run == command.run
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: step {' '.join(path)}" in text
    for flag in ("--config", "--set", "--print-config"):
        assert flag in text
    # one flag per top-level scalar field of the model, and per option
    for flag in command.setting_flags() + command.option_flags():
        assert flag.flags[0] in text
    described = [f for f in command.setting_flags() if f.help]
    assert described, "the help of the generated flags comes from the field descriptions"


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("path", GENERATED, ids=" ".join)
def test_every_command_refuses_an_unknown_flag_or_key_by_name(path, capsys):
    """A typo on any command: exit 2, and the error line names what was wrong."""
    config = {("run",): ["configs/demo.yaml"], ("submit",): ["configs/demo.yaml"],
              ("bench", "train"): ["--config", "configs/tiny/step.yaml"]}.get(path, [])
    assert _exit_code([*path, *config, "--no-such-flag"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage
    assert last == f"step {' '.join(path)}: error: unrecognized arguments: --no-such-flag"
    assert _exit_code([*path, *config, "--set", "no_such_key=1", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"step {' '.join(path)}: error:")
    assert "no_such_key: unknown key (given: 1)" in err


def test_prep_offers_every_reader_of_data_prep(capsys):
    from data_prep.readers import READERS

    assert _exit_code(["prep", "--dataset", "bogus", "--src", "x", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "dataset: Input should be" in err and "(given: 'bogus')" in err
    assert all(f"'{name}'" in err for name in READERS)


# ---- --config < --set < flags; aliases; positional config ---------------------------------


def test_precedence_config_then_set_then_flags(tmp_path, capsys):
    cfg = tmp_path / "tune.yaml"
    cfg.write_text("seed: 1\nmax_drop: 3\nnum_samples: 5\nspace: tiny\n"
                   "resources_per_trial: {cpu: 2}\n")
    got = printed_settings(capsys, [
        "tune", "--config", str(cfg), "--set", "seed=2", "--seed", "3",
        "--set", "max_drop=4", "--set", "max_drop=4.5", "--gpus-per-trial", "1"])
    assert got["seed"] == 3                    # flag beats --set beats the file
    assert got["max_drop"] == 4.5              # --set in order, beats the file
    assert got["num_samples"] == 5 and got["space"] == "tiny"   # the file beats defaults
    assert got["resources_per_trial"] == {"cpu": 2.0, "gpu": 1.0}  # alias of a nested field
    assert got["drop_mode"] == "points"        # TuneSettings' own default


def test_a_flag_is_the_same_as_its_set_item(capsys):
    by_flag = printed_settings(capsys, ["eval", "--checkpoint", "s3://b/ckpt", "--data",
                                         "d", "--max-samples", "4", "--mode", "slide"])
    by_set = printed_settings(capsys, ["eval", "--set", "checkpoint=s3://b/ckpt", "--set",
                                        "data=d", "--set", "max_samples=4", "--set",
                                        "mode=slide"])
    assert by_flag == by_set
    # text fields stay text whatever they look like; '' unsets an optional field
    got = printed_settings(capsys, ["tune", "--name", "0123", "--register-name", ""])
    assert got["name"] == "0123" and got["register_name"] is None


def test_eval_old_spellings_are_aliases(tmp_path, capsys):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("checkpoint: c\ndata: d\ninference: {exit_thresholds: [0.9, 0.8], "
                   "merge_thresholds: {2: 0.1}}\n")
    got = printed_settings(capsys, ["eval", "--config", str(cfg)])
    assert got["inference"]["exit_thresholds"] == [0.9, 0.8]
    assert got["inference"]["merge_thresholds"] == {"2": 0.1}  # YAML dump of {2: 0.1}
    got = printed_settings(capsys, [
        "eval", "--config", str(cfg), "--set", "inference.exit_thresholds=0.7",
        "--thresholds", "0.5,0.6", "--merge-thresholds", "2=0.5,4=0.6", "--budget", "0.5",
        "--top-k", "3", "--exit-policy", "random", "--policy-mode", "budget",
        "--no-halting", "--set", "inference.upsample=logits", "--set", "inference.exit_seed=3",
        "--tracking-uri", "sqlite:///x.db", "--experiment", "e",
        "--parent-run-id", "p", "--no-mlflow"])
    assert got["inference"] == {"exit_thresholds": [0.5, 0.6],
                                "merge_thresholds": {"2": 0.5, "4": 0.6}, "budget": 0.5,
                                "top_k": 3, "exit_policy": "random", "policy_mode": "budget",
                                "halting": False, "upsample": "logits", "exit_seed": 3}
    assert got["mlflow"] == {"tracking_uri": "sqlite:///x.db", "experiment": "e",
                             "parent_run_id": "p", "enabled": False}
    assert printed_settings(capsys, ["eval", "--config", str(cfg), "--exit-thresholds",
                                      "0.3"])["inference"]["exit_thresholds"] == [0.3]


def test_run_and_submit_take_the_config_positionally_or_as_config(capsys):
    pos = printed_settings(capsys, ["run", "configs/tiny/pipeline.yaml", "--name", "n1"])
    opt = printed_settings(capsys, ["run", "--config", "configs/tiny/pipeline.yaml",
                                     "--set", "name=n1"])
    assert pos == opt and pos["name"] == "n1" and pos["tune"]["space"] == "tiny"
    assert main(["run", "configs/tiny/pipeline.yaml", "--config", "configs/demo.yaml"]) == 2
    assert "two configs given" in capsys.readouterr().err
    assert main(["submit", "--address", "http://h:1"]) == 2
    assert "step submit: error: --config: required" in capsys.readouterr().err


def test_train_stage_comes_from_the_command(capsys):
    got = printed_settings(capsys, ["train", "policy", "--config", "configs/tiny/policy.yaml",
                                     "--name", "p1"])
    assert got["stage"] == "policy" and got["name"] == "p1"
    assert main(["train", "policy", "--config", "configs/tiny/step.yaml"]) == 2
    assert "the command is 'train policy'" in capsys.readouterr().err


def test_prep_old_spellings(capsys):
    got = printed_settings(capsys, ["prep", "--dataset", "loveda", "--src", "a", "--out",
                                     "s3://b/o", "--shard-size", "64MB", "--strict",
                                     "--no-progress", "--max-side", "256"])
    assert got == {"dataset": "loveda", "src": "a", "out": "s3://b/o", "split": "train",
                   "samples_per_shard": None, "shard_size": "64MB", "max_side": 256,
                   "strict": True, "layout": None, "progress": False, "verify": None,
                   "write_manifest": None}


# ---- errors: a bad value names the field, exit 2 on stderr; runtime failures exit 1 -------

BAD = {
    ("prep",): (["--dataset", "mnist", "--src", "a", "--out", "b"],
                ["dataset", "'loveda'", "mnist"]),
    ("train", "policy"): (["--config", "configs/tiny/policy.yaml", "--set",
                           "train.precision=fp16"], ["train.precision", "'bf16'", "fp16"]),
    ("train", "step"): (["--config", "configs/tiny/step.yaml", "--set", "optim.lr=-1"],
                        ["optim.lr", "greater than 0"]),
    ("eval",): (["--checkpoint", "c", "--data", "d", "--mode", "tiled"],
                ["mode", "'whole' or 'slide'", "tiled"]),
    ("analyze",): (["--checkpoint", "c", "--data", "d", "--budgets", "0.5", "1.5"],
                   ["budgets", "(0, 1]", "1.5"]),
    ("predict",): (["--model", "m", "--images", "i", "--out", "o", "--palette", "rainbow"],
                   ["palette", "'loveda'", "rainbow"]),
    ("tune",): (["--checkpoint", "c", "--data", "d", "--drop-mode", "percent"],
                ["drop_mode", "'points' or 'relative'", "percent"]),
    ("run",): (["configs/tiny/pipeline.yaml", "--set", "data.dataset=mnist"],
               ["data.dataset", "'loveda'", "mnist"]),
    ("submit",): (["configs/tiny/pipeline.yaml", "--address", "http://127.0.0.1:1",
                   "--set", "tune.search=bayes"], ["tune.search", "'optuna'", "bayes"]),
    ("ui",): (["--port", "http"], ["port", "valid integer", "http"]),
    ("bench", "train"): (["--config", "configs/tiny/step.yaml", "--halt-thresholds",
                          "2=0.5"], ["halt_thresholds", "0.9,0.8"]),
    ("bench", "gpu"): (["--device", "tpu"], ["device", "'cuda' or 'cpu'", "tpu"]),
    ("bench", "model"): (["--merge-thresholds", "3=0.5"], ["merge_thresholds", "3"]),
    ("bench", "data"): (["--images", "x", "--samples", "8"],
                        ["samples", "greater than or equal to 64"]),
}


@pytest.mark.parametrize("path", GENERATED, ids=" ".join)
def test_a_bad_value_names_the_field_and_exits_2_on_stderr(path, capsys):
    argv, needles = BAD[path]
    assert main([*path, *argv]) == 2
    out = capsys.readouterr()
    assert out.err.startswith(f"step {' '.join(path)}: error: ")
    for needle in needles:
        assert needle in out.err, out.err
    assert "Traceback" not in out.err


def test_unknown_keys_and_missing_files_are_setting_errors(tmp_path, capsys):
    assert main(["tune", "--set", "max_dorp=1"]) == 2
    assert "max_dorp: unknown key" in capsys.readouterr().err
    assert main(["eval", "--config", str(tmp_path / "none.yaml")]) == 2
    assert f"--config {tmp_path / 'none.yaml'}: file not found" in capsys.readouterr().err
    assert main(["eval", "--data", "d"]) == 2
    assert "checkpoint: Field required" in capsys.readouterr().err
    assert main(["tune", "--data", "d"]) == 2
    assert "checkpoint: required" in capsys.readouterr().err


def test_runtime_failures_exit_1_on_stderr(tmp_path, capsys):
    rc = main(["eval", "--checkpoint", str(tmp_path / "nothing"), "--data", "d",
               "--no-mlflow"])
    out = capsys.readouterr()
    assert rc == 1 and out.err.startswith("step eval: error: ")
    assert "neither a checkpoint" in out.err and out.out == ""
    rc = main(["ui", "--backend-store-uri", f"sqlite:///{tmp_path / 'no.db'}"])
    assert rc == 1 and "step ui: error: no MLflow store" in capsys.readouterr().err


# ---- --json: one writer, local paths and s3:// ----------------------------------------------


class _Toy(StrictModel):
    name: str = Field("toy", description="a name")
    size: int = Field(1, ge=1, description="a size")
    thresholds: ExitThresholds = Field(None, description="exit thresholds")


def _toy_command() -> Command:
    return Command(_Toy, lambda inv: Result({"settings": inv.settings.model_dump(),
                                             "overrides": inv.overrides}, 3),
                   aliases=[Alias(("--taus",), "thresholds")])


def _run_toy(argv: list[str]) -> int:
    import argparse

    command = _toy_command()
    parser = argparse.ArgumentParser(prog="step toy")
    command.configure(parser)
    args = parser.parse_args(argv)
    args.command_path = ("toy",)
    return command.run(args)


def test_json_to_a_local_path_and_the_result_code(tmp_path, capsys):
    out = tmp_path / "deep" / "er" / "toy.json"
    assert _run_toy(["--size", "4", "--taus", "0.5", "--json", str(out)]) == 3
    doc = json.loads(out.read_text())
    assert doc["settings"] == {"name": "toy", "size": 4, "thresholds": [0.5]}
    assert doc["overrides"] == ["size=4", 'thresholds="0.5"']
    assert f"step toy: wrote {out}" in capsys.readouterr().out


def test_json_to_s3(s3_bucket, monkeypatch, capsys):
    import boto3

    uri = f"s3://{s3_bucket}/results/toy.json"
    assert _run_toy(["--name", "on-s3", "--json", uri]) == 3
    body = boto3.client("s3").get_object(Bucket=s3_bucket, Key="results/toy.json")["Body"]
    assert json.loads(body.read())["settings"]["name"] == "on-s3"
    # a real command: step submit (the Ray client faked), --json straight to S3
    import pipelines.cli.submit as submit

    seen = {}

    class FakeClient:
        def submit_job(self, **kwargs):
            seen.update(kwargs)
            return "raysubmit_1"

    monkeypatch.setattr(submit, "client_for", lambda address, token: FakeClient())
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    rc = main(["submit", "configs/tiny/pipeline.yaml", "--address", "http://h:8265",
               "--name", "cli-layer", "--set", "tune.num_samples=2",
               "--json", f"s3://{s3_bucket}/submit.json"])
    assert rc == 0, capsys.readouterr().err
    body = boto3.client("s3").get_object(Bucket=s3_bucket, Key="submit.json")["Body"]
    doc = json.loads(body.read())
    assert doc["job_id"] == "raysubmit_1" and doc["address"] == "http://h:8265"
    # the flags reach the job's `step run` as --set items, after the --set ones
    assert seen["entrypoint"] == ("python -m pipelines.cli run configs/tiny/pipeline.yaml "
                                  "--set tune.num_samples=2 --set name=cli-layer")
    assert doc["entrypoint"] == seen["entrypoint"]


def test_json_write_failure_is_one_line(s3_endpoint, capsys):
    assert _run_toy(["--json", "s3://no-such-bucket-here/x.json"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("step toy: error: --json s3://no-such-bucket-here/x.json: ")


def test_eval_json_carries_what_was_set(tmp_path, monkeypatch, capsys):
    """``step eval`` end to end with the evaluator faked: the inference kwargs are the
    ones given, in the one syntax."""
    import pipelines.common.checkpoint as checkpoint
    import pipelines.evaluate.evaluator as evaluator

    seen = {}

    class FakeResult:
        num_images = 2

        def to_dict(self):
            return {"num_images": 2}

        def headline(self):
            return dict.fromkeys(("miou", "gflops", "tokens_mean", "tokens_in",
                                  "halted_fraction", "latency_ms"), 0.5)

    def fake_eval(ckpt, data, **kw):
        seen.update(kw, checkpoint=ckpt, data=data)
        return FakeResult()

    from step_model.config import StepConfig

    ckpt = tmp_path / "run" / "ckpt_9"  # its configs only: the oracle check reads them
    ckpt.mkdir(parents=True)
    (ckpt / "model_config.yaml").write_text(yaml.safe_dump(StepConfig().to_dict()))
    monkeypatch.setattr(checkpoint, "resolve_checkpoint_dir", lambda uri: uri + "/ckpt_9")
    monkeypatch.setattr(evaluator, "evaluate_checkpoint", fake_eval)
    out = tmp_path / "eval.json"
    rc = main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", "d", "--thresholds",
               "0.5", "--merge-thresholds", "0.7", "--no-mlflow", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["checkpoint"] == str(ckpt) and doc["run_id"] is None
    assert doc["inference"] == {"exit_thresholds": [0.5],
                                "merge_thresholds": {"2": 0.7, "4": 0.7, "8": 0.7, "16": 0.7}}
    assert seen["inference"]["merge_thresholds"] == dict.fromkeys(LEVELS, 0.7)


def test_tune_accepts_a_ray_run_directory(tmp_path, monkeypatch, capsys):
    import pipelines.tune.search as search_module

    run_dir = tmp_path / "runs" / "tiny-step"
    for step in (2, 10):
        (run_dir / f"checkpoint_{step:08d}").mkdir(parents=True)
        (run_dir / f"checkpoint_{step:08d}" / "model.pt").write_bytes(b"")
    seen = {}

    class Outcome:
        def to_json(self):
            return {"baseline": {"miou": 0.5, "gflops": 1.0}, "best": None, "message": "m",
                    "n_trials": 0, "failed_trials": 0, "pareto": [], "parent_run_id": "r",
                    "tracking_uri": seen["settings"].tracking_uri}

    def fake_search(settings):
        seen["settings"] = settings
        return Outcome()

    monkeypatch.setattr(search_module, "search", fake_search)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["tune", "--checkpoint", str(run_dir), "--data", "d",
                 "--tracking-uri", uri]) == 0, capsys.readouterr().err
    assert seen["settings"].checkpoint == str(run_dir / "checkpoint_00000010")
    assert seen["settings"].tracking_uri == uri
    assert main(["tune", "--checkpoint", str(tmp_path), "--data", "d"]) == 2
    assert "checkpoint: " in capsys.readouterr().err


# ---- the one threshold syntax ---------------------------------------------------------------


@pytest.mark.parametrize(("given", "exits"), [
    (0.9, [0.9]), ("0.9", [0.9]), ("0.9,0.8", [0.9, 0.8]), ("0.9, 0.8", [0.9, 0.8]),
    ("0.9 0.8", [0.9, 0.8]), ([0.9, 0.8], [0.9, 0.8]), (1, [1.0]), ("0", [0.0]),
    (None, None),
])
def test_exit_threshold_syntax(given, exits):
    assert parse_thresholds(given) == exits


@pytest.mark.parametrize(("given", "levels"), [
    (0.8, dict.fromkeys(LEVELS, 0.8)), ("0.8", dict.fromkeys(LEVELS, 0.8)),
    ("2=0.8,4=0.7,8=0.6,16=0.5", {2: 0.8, 4: 0.7, 8: 0.6, 16: 0.5}),
    ("16=0.5 2=0.8", {2: 0.8, 16: 0.5}), ({2: 0.8, "4": 0.7}, {2: 0.8, 4: 0.7}),
    (None, None),
])
def test_merge_threshold_syntax(given, levels):
    assert parse_thresholds(given, per_level=True) == levels


@pytest.mark.parametrize(("given", "per_level", "message"), [
    ("x", False, "expected a number in [0, 1], got 'x'"),
    ("1.5", False, "1.5 is not in [0, 1]"),
    ("-0.1", True, "-0.1 is not in [0, 1]"),
    ("2=0.5", False, "exit thresholds have no levels"),
    ({2: 0.5}, False, "not a mapping"),
    ("", False, "empty"),
    ([], False, "empty list"),
    (True, False, "expected a number"),
    ("0.5,0.6", True, "a list does not say which level"),
    ([0.5], True, "a list does not say which level"),
    ("3=0.5", True, "level '3' is not a superpatch side; use 2, 4, 8, 16"),
    ("2=", True, "expected LEVEL=VALUE"),
    ({2: 0.5, "2": 0.6}, True, "level 2 given twice"),
    ({}, True, "empty mapping"),
])
def test_threshold_errors_say_what_is_accepted(given, per_level, message):
    with pytest.raises(ValueError) as err:
        parse_thresholds(given, per_level=per_level)
    text = str(err.value)
    assert message in text
    assert ("2=0.8,4=0.7,8=0.6,16=0.5" if per_level else "0.9,0.8") in text  # the syntax


def test_threshold_fields_take_the_syntax_from_yaml_set_and_flags(tmp_path):
    class Inference(StrictModel):
        exits: ExitThresholds = None
        merge: MergeThresholds = None

    path = tmp_path / "i.yaml"
    path.write_text("exits: [0.9, 0.8]\nmerge: {2: 0.4, 16: 0.1}\n")
    cfg = load_config(Inference, path)
    assert cfg.exits == [0.9, 0.8] and cfg.merge == {2: 0.4, 16: 0.1}
    cfg = load_config(Inference, path, ["exits=0.5", "merge=0.3"])
    assert cfg.exits == [0.5] and cfg.merge == dict.fromkeys(LEVELS, 0.3)
    cfg = load_config(Inference, None, ["exits=0.5,0.4", "merge=2=0.2,4=0.1"])
    assert cfg.exits == [0.5, 0.4] and cfg.merge == {2: 0.2, 4: 0.1}
    from pipelines.common.settings import ConfigError

    with pytest.raises(ConfigError, match=r"merge: Value error, level '3' is not"):
        load_config(Inference, None, ["merge=3=0.5"])

