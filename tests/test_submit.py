"""``step submit`` against a real Ray head started with token authentication (Ray 2.60)."""

from __future__ import annotations

import pytest

from helpers import LOVEDA, start_ray_node

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def ray_head():
    """``ray start --head --block`` in its own process group and temp dir, token auth on."""
    head = start_ray_node(num_cpus=1)
    try:
        yield {"address": head.dashboard, "token": head.token, "temp": str(head.temp_dir)}
    finally:
        head.stop()


def test_submit_follow_with_token(ray_head, tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    token_file = tmp_path / "token"
    token_file.write_text(ray_head["token"])
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # only the explicit token may be used
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    rc = main(["submit", "configs/tiny/pipeline.yaml", "--address", ray_head["address"],
               "--token-file", str(token_file), "--follow", "--timeout", "180",
               "--set", f"data.src={LOVEDA}", "--set", f"storage={tmp_path / 'store'}",
               "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
               "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "submitted job" in out and "SUCCEEDED" in out
    # the job ran `step run --dry-run` on the cluster: its plan came back in the logs
    for step in ("prepare", "train_policy", "train_step", "tune", "evaluate", "report"):
        assert f"{step}" in out
    assert "run  fingerprint" in out
    assert ray_head["token"] not in out


def test_submit_without_token_says_how(ray_head, monkeypatch, capsys, tmp_path):
    from pipelines.cli import main

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    rc = main(["submit", "configs/tiny/pipeline.yaml", "--address", ray_head["address"],
               "--set", f"data.src={LOVEDA}", "--set", f"storage={tmp_path}"])
    err = capsys.readouterr().err  # errors: one line on stderr
    assert rc == 1
    assert "step submit: error: submitting to" in err and "Ray auth token" in err


def test_submit_rejects_bad_config(tmp_path, capsys):
    from pipelines.cli import main

    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\ndata: {src: somewhere}\nstep: {config: nope.yaml}\n")
    assert main(["submit", str(bad), "--address", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "step submit: error:" in err and "step.config: file not found: nope.yaml" in err
