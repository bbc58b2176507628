"""Every shipped pipeline config and ray_cluster.yaml validates; fingerprints pick exactly
the steps a change affects (no Ray, no training: a dry-run plan over a SQLite store)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.common.settings import ConfigError
from pipelines.workflow.config import load_pipeline_config
from pipelines.workflow.runner import Workflow, fingerprint

from helpers import LOVEDA, REPO

PIPELINES = ["configs/demo.yaml", "configs/tiny/pipeline.yaml",
             "configs/pipeline_loveda_cluster.yaml", "configs/camvid.yaml"]


@pytest.fixture(autouse=True)
def _at_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # configs name their training configs relative to the repo


@pytest.mark.parametrize("path", PIPELINES)
def test_shipped_pipeline_config_validates(path):
    cfg = load_pipeline_config(path)
    assert cfg.step.config and Path(cfg.step.config).is_file()
    assert cfg.tune.max_drop >= 0


def test_a_step_config_whose_policy_network_differs_from_stage_1s_is_refused_before_training():
    # stage 2 loads stage 1's weights: found at load time, not after the policy has trained
    with pytest.raises(ConfigError, match=r"model\.policy\.fine_features: False here, True in stage 1"):
        load_pipeline_config("configs/camvid.yaml", ["step.set=[model.policy.fine_features=false]"])


def test_demo_uses_bundled_real_data():
    cfg = load_pipeline_config("configs/demo.yaml")
    assert Path(cfg.data.src).resolve() == (REPO / "demo_data" / "loveda").resolve()
    assert cfg.runs_policy and "inference.policy_mode=threshold" in cfg.step.set


def test_ray_cluster_yaml_is_a_valid_launcher_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(cfg))
    assert cfg["head_node_type"] == "head"
    workers = [n for n in cfg["available_node_types"] if n != "head"]
    assert workers and all("g5" in cfg["available_node_types"][w]["node_config"]["InstanceType"]
                           for w in workers)
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "-e ." in setup
    assert "MLFLOW_TRACKING_URI" in " ".join(cfg["head_setup_commands"])


BAD = {
    "unknown key": ("tune: {max_dorp: 1}", "tune.max_dorp: unknown key"),
    "negative limit": ("tune: {max_drop: -1}", "tune.max_drop"),
    "bad drop mode": ("tune: {drop_mode: percent}", "tune.drop_mode"),
    "missing step config": ("step: {config: nope.yaml}", "step.config: file not found"),
    "bad space": ("tune: {space: nope}", "tune.space"),
    "bad train override": ("step: {config: configs/tiny/step.yaml, set: [optim.lr=-1]}",
                           "optim.lr"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_pipeline_config_names_the_field(tmp_path, case):
    body, expected = BAD[case]
    base = yaml.safe_load(Path("configs/tiny/pipeline.yaml").read_text())
    base.update(yaml.safe_load(body))
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError) as err:
        load_pipeline_config(f)
    assert expected in str(err.value)


def test_fingerprint_is_stable_and_order_free():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def _plan(tmp_path, *overrides):
    cfg = load_pipeline_config("configs/tiny/pipeline.yaml", [
        f"data.src={LOVEDA}", f"storage={tmp_path / 'store'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}", *overrides])
    return {p["step"]: p for p in Workflow(cfg, echo=lambda _: None).plan()}


def test_the_layout_of_the_inference_settings_leaves_fingerprints_alone(tmp_path):
    """Inference settings given in the older layout (inside ``model``) or in their own
    section are the same settings: the same plan, so pipelines run before the section
    existed keep their fingerprints (their payloads keep the older layout)."""
    older = _plan(tmp_path, "step.set=[model.policy.mode=threshold, "
                            "'model.policy.thresholds={2: 0.8, 4: 0.8, 8: 0.8}', "
                            "'model.exits.thresholds=[0.5]', model.exits.top_k=2]")
    newer = _plan(tmp_path, "step.set=[inference.policy_mode=threshold, "
                            "'inference.merge_thresholds=2=0.8,4=0.8,8=0.8', "
                            "inference.exit_thresholds=0.5, inference.top_k=2]")
    assert {k: v["fingerprint"] for k, v in older.items()} == \
        {k: v["fingerprint"] for k, v in newer.items()}
    assert older != _plan(tmp_path, "step.set=[inference.policy_mode=threshold, "
                                    "inference.exit_thresholds=0.5, inference.top_k=3]")


def test_a_change_reruns_only_the_steps_downstream_of_it(tmp_path):
    base = _plan(tmp_path)
    assert [p["action"] for p in base.values()] == ["run"] * 7
    fps = {k: v["fingerprint"] for k, v in base.items()}
    assert _plan(tmp_path) == base  # deterministic

    def changed(*overrides):
        new = _plan(tmp_path, *overrides)
        return sorted(k for k in fps if new[k]["fingerprint"] != fps[k])

    downstream_of_tune = ["analyze", "evaluate", "report", "tune"]
    assert changed("tune.max_drop=1.0") == downstream_of_tune
    assert changed("tune.space=exits_only") == downstream_of_tune
    # a held-out fraction is chosen when val is read: no re-sharding, no retraining
    assert changed("data.holdout.fraction=0.3") == downstream_of_tune
    assert changed("step.set=[inference.policy_mode=threshold, train.steps=9]") == \
        sorted(["train_step", *downstream_of_tune])
    assert changed("report.num_images=2") == ["report"]
    assert changed("analyze.seeds=[5]") == ["analyze"]
    assert "analyze" not in _plan(tmp_path, "analyze.enabled=false")
    assert changed("data.tile.size=256") == sorted(fps)  # new data: everything reruns
    # where results go (storage, tracking) is not part of what a step computes
    assert changed("mlflow.experiment=other") == []


def test_state_and_outputs_on_s3(s3_bucket):
    """Pipeline state and step outputs live on S3 as well as on disk (real moto server)."""
    from pipelines.common.storage import exists, read_json, write_json

    uri = f"s3://{s3_bucket}/pipelines/demo/pipeline_state.json"
    assert read_json(uri) is None and not exists(uri)
    write_json(uri, {"steps": {"prepare": {"status": "finished"}}})
    assert exists(uri)
    assert read_json(uri) == {"steps": {"prepare": {"status": "finished"}}}
    assert not exists(f"s3://{s3_bucket}/pipelines/demo/pipeline_state.jso")
    assert not exists(f"s3://{s3_bucket}-missing/x.json")


# The trainings' payloads of the shipped benchmark and demo, pinned: a change to the code
# that alters them makes every finished pipeline retrain its policy and segmenter (35+
# minutes for CamVid here, days on a cluster). When a change must retrain, update the pins
# on purpose and say so in the change.
TRAINING_PINS = {
    "configs/camvid.yaml": {"policy": "a0117c968bfd", "step": "416b9529fa4a"},
    "configs/demo.yaml": {"policy": "c237ed721853", "step": "a53296730792"},
}


@pytest.mark.parametrize("path", sorted(TRAINING_PINS))
def test_code_changes_leave_the_trainings_fingerprints_alone(path):
    from pipelines.workflow import steps

    cfg = load_pipeline_config(path, ["data.src=/nonexistent", "data.manifest=null"])
    got = {s: fingerprint(steps.train_payload(cfg, s, [None]))[:12] for s in ("policy", "step")}
    assert got == TRAINING_PINS[path]
