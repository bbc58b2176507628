"""The pipeline with a plain ViT baseline and groups, on the tiny pipeline's trainings.

The session's tiny pipeline (conftest ``tiny_pipeline``) has trained the policy and the
STEP network; the same config plus ``baseline: {}`` and ``data.groups`` reuses them (their
fingerprints do not change), trains the plain ViT with the STEP recipe, and re-runs the
search and what follows: the evaluation against both baselines, per group."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import LOVEDA, REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_a_plain_vit_is_trained_with_the_step_recipe_and_reported(tiny_pipeline, tmp_path):
    import os

    import torch

    doc2 = tiny_pipeline["doc2"]
    storage = Path(doc2["steps"]["prepare"]["outputs"]["base"]).parents[2]
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "configs/tiny/pipeline.yaml",
           "--set", f"storage={storage}", "--set", f"mlflow.tracking_uri="
           f"{tiny_pipeline['tracking_uri']}", "--set", f"data.src={LOVEDA}",
           "--set", "mlflow.experiment=e2e", "--set", "baseline={}",
           "--set", "data.groups.pattern=^([^_]+)_", "--set", "analyze.enabled=false",
           "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    doc = json.loads(out.read_text())
    steps = doc["steps"]
    # the trainings before are reused; the plain ViT is trained
    assert [n for n in ("prepare", "train_policy", "train_step") if steps[n]["skipped"]] == [
        "prepare", "train_policy", "train_step"]
    assert not steps["train_baseline"]["skipped"]
    ckpt = doc["checkpoints"]["baseline"]
    assert ckpt == steps["train_baseline"]["outputs"]["checkpoint"]
    from pipelines.common.checkpoint import read_configs

    model_cfg, inference = read_configs(ckpt)
    # the STEP recipe without sharing and exits
    assert inference.policy_mode == "none" and model_cfg.exits.blocks == []
    step_cfg, _ = read_configs(doc["checkpoints"]["step"])
    assert model_cfg.backbone == step_cfg.backbone
    state = torch.load(Path(ckpt) / "model.pt", weights_only=True)
    assert not any(k.startswith("exit_heads.") for k in state)

    ev = doc["evaluation"]
    assert ev["plain_vit"]["miou"] is not None
    if ev["tuned"] is not None:
        vit = ev["plain_vit"]["miou"]
        assert ev["drop_vs_plain_vit"] == pytest.approx(100 * (vit - ev["tuned"]["miou"]),
                                                        abs=1e-6)
        assert set(ev["worst_group"]) == {"worst_group", "worst_group_drop"}
        assert "against the plain ViT trained on its own" in doc["summary_table"]
        assert "per group, validation:" in doc["summary_table"]
    assert "| plain ViT (trained on its own) |" in doc["summary_table"]
