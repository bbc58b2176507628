"""Expected failures are one line with their exit code; a bug keeps its traceback."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap

import pytest
from pydantic import Field

from data_prep.errors import DatasetError, DatasetNotFound
from pipelines.cli.command import Command, Result
from pipelines.common.errors import ExpectedFailure, InputNotFound, InvalidInput
from pipelines.common.settings import StrictModel
from step_model.config import SettingsMismatch

from helpers import REPO


class _Toy(StrictModel):
    size: int = Field(1, ge=1)


def _run(raise_: BaseException) -> int:
    def handler(inv) -> Result:
        raise raise_

    command = Command(_Toy, handler)
    parser = argparse.ArgumentParser(prog="step toy")
    command.configure(parser)
    args = parser.parse_args([])
    args.command_path = ("toy",)
    return command.run(args)


@pytest.mark.parametrize(("error", "code"), [
    (ExpectedFailure("the shards are gone"), 1),
    (ExpectedFailure("the input is wrong", 2), 2),
    (InputNotFound("runs/x: no such directory"), 1),
    (InvalidInput("4 classes, the checkpoint predicts 7"), 1),
    (DatasetError("split 'val': no images"), 1),  # data_prep's own (it cannot import ours)
    (DatasetNotFound("d: not a step prep output"), 1),
    (SettingsMismatch("exit_thresholds has 3 values for 2 exits"), 1),  # step_model's
])
def test_an_expected_failure_is_one_line_with_its_code(error, code, capsys):
    assert _run(error) == code
    out = capsys.readouterr()
    assert out.err == f"step toy: error: {error}\n" and out.out == ""


@pytest.mark.parametrize("bug", [ValueError("a bug"), KeyError("inference"),
                                 FileNotFoundError("/nowhere")])
def test_any_other_exception_is_a_bug_and_propagates(bug, capsys):
    with pytest.raises(type(bug)):
        _run(bug)
    assert capsys.readouterr().err == ""  # nothing swallowed into an error line


def test_expected_failures_stay_what_callers_catch():
    assert issubclass(InputNotFound, FileNotFoundError)
    assert issubclass(InvalidInput, ValueError)
    assert issubclass(DatasetNotFound, FileNotFoundError)
    from pipelines.tune.search import TrialsFailed

    assert issubclass(TrialsFailed, ExpectedFailure)


def _step(code: str, *argv: str) -> subprocess.CompletedProcess:
    """``step ARGV`` in a fresh interpreter, after ``code`` (which may patch a module)."""
    script = textwrap.dedent(code) + "\nimport sys\nfrom pipelines.cli.app import main\n" \
        "sys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", script, *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_a_bugs_traceback_reaches_stderr(tmp_path):
    # step ui: a light command (no torch); its store check replaced by a buggy one
    proc = _step("""
        import pipelines.cli.ui as ui

        def broken(settings):
            raise ValueError("a bug in the store check")

        ui.command = broken
    """, "ui", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().endswith("ValueError: a bug in the store check")
    assert "step ui: error:" not in proc.stderr


def test_a_missing_store_is_one_line_on_stderr(tmp_path):
    proc = _step("", "ui", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"step ui: error: no MLflow store at {tmp_path / 'mlflow.db'} yet: run `step run "
        "configs/demo.yaml` first (or pass --backend-store-uri)"]
