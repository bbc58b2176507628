"""Every scalar field gets a flag, nested sections included (``--section.field``)."""

from __future__ import annotations

import pytest

from helpers import printed_settings


def test_a_nested_flag_is_its_set_item(capsys):
    argv = ["train", "step", "--config", "configs/tiny/step.yaml"]
    by_flag = printed_settings(capsys, [*argv, "--optim.lr", "3e-4", "--model.exits.blocks",
                                        "2", "4", "--no-mlflow.log-model",
                                        "--inference.merge-thresholds", "0.7"])
    by_set = printed_settings(capsys, [*argv, "--set", "optim.lr=3e-4", "--set",
                                       "model.exits.blocks=[2,4]", "--set",
                                       "mlflow.log_model=false", "--set",
                                       "inference.merge_thresholds=0.7"])
    assert by_flag == by_set
    assert by_flag["optim"]["lr"] == pytest.approx(3e-4)
    assert by_flag["model"]["exits"]["blocks"] == [2, 4]
    assert by_flag["mlflow"]["log_model"] is False


def test_a_nested_flag_and_its_alias_set_the_same_field(capsys):
    base = ["eval", "--checkpoint", "c", "--data", "d"]
    assert printed_settings(capsys, [*base, "--inference.exit-thresholds", "0.9,0.8"]) == \
        printed_settings(capsys, [*base, "--thresholds", "0.9,0.8"])


def test_a_bad_nested_value_names_the_dotted_field(capsys):
    from pipelines.cli import main

    assert main(["eval", "--checkpoint", "c", "--data", "d", "--inference.top-k", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("step eval: error: ") and "inference.top_k" in err
