"""Ray Train end to end: 2 CPU workers (gloo), real shards, a real MLflow server.

Four trainings in all (each costs ~15 s of Ray start-up on top of the steps):

* stage 2 with a worker crash injected after the step-6 checkpoint (``max_failures=1``):
  Ray restarts the worker group, which resumes from that checkpoint; the run must end at
  the same step count, and the restored state must be exactly the saved one. The same
  run checks the MLflow side: metrics, params, config, tags and a loadable model;
* stage 1 stopped by a crash with no retries left, then started again with the same
  name and storage path: it resumes from its last checkpoint, and the trained policy is
  more accurate against its ground truth than the untrained one;
* stage 2 with a fine-tuning phase (halting in training, its own exit thresholds): its
  checkpoints keep the architecture and the training's inference settings apart.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pipelines.cli import main
from pipelines.common.checkpoint import load_model, load_state_dict, state_digest
from pipelines.train.config import load_train_config
from pipelines.train.loop import FAIL_AT_STEP_ENV
from pipelines.train.trainer import fit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _overrides(shards: dict[str, str], tmp_path, *overrides: str) -> list[str]:
    return [f"data.train={shards['train']}", f"data.val={shards['val']}",
            f"storage.storage_path={tmp_path / 'ray'}", *overrides]


def _cfg(stage: str, shards: dict[str, str], tmp_path, *overrides: str):
    return load_train_config(f"configs/tiny/{stage}.yaml",
                             _overrides(shards, tmp_path, *overrides), stage=stage)


@pytest.fixture(scope="module")
def crashed_step_run(tiny_shards, mlflow_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("step_run")
    cfg = _cfg("step", tiny_shards, tmp, f"mlflow.tracking_uri={mlflow_server}",
               "mlflow.experiment=test-train-ray",
               "train.max_failures=1", "train.keep_last=3")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAIL_AT_STEP_ENV, "8")
        return cfg, fit(cfg)


def test_step_training_resumes_after_a_worker_crash(crashed_step_run) -> None:
    cfg, result = crashed_step_run
    assert cfg.train.steps == 12 and cfg.train.checkpoint_every == 6
    assert result.metrics["step"] == 12  # same final step count as an uninterrupted run
    assert result.metrics["restored_step"] == 6
    saved = load_state_dict(result.checkpoint.replace("checkpoint_00000012",
                                                      "checkpoint_00000006"))
    assert result.metrics["restored_digest"] == state_digest(saved)
    assert result.checkpoint.endswith("checkpoint_00000012")


def test_step_training_is_tracked_in_mlflow_server(crashed_step_run, tiny_shards) -> None:
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    cfg, result = crashed_step_run
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert result.tracking_uri.startswith("http://127.0.0.1:")
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray.run_name"] == cfg.name
    assert Path(run.data.tags["ray.storage_path"]) == Path(cfg.storage.storage_path).resolve()
    assert run.data.params["optim.lr"] == str(cfg.optim.lr)
    assert run.data.params["model.backbone"] == "vit_tiny_patch16_384"

    # Only rank 0 logs, once per logging step (the crash at step 8 came after the step-6
    # log, and the restarted group logged 9 and 12), and no rank opened a run of its own.
    history = client.get_metric_history(result.run_id, "train/loss_avg")
    steps = [m.step for m in history]
    assert sorted(steps) == [3, 6, 9, 12], steps
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [result.run_id]

    # The loss goes down (mean over each 3-step window).
    by_step = {m.step: m.value for m in history}
    assert by_step[12] < by_step[3]
    for key in ("train/lr", "train/samples_per_s", "val/miou", "val/gflops",
                "val/tokens_mean", "val/halted_fraction"):
        assert key in run.data.metrics, key
    assert 0.0 < run.data.metrics["val/tokens_mean"] < 256  # oracle sharing at 256 px

    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert "config.yaml" in artifacts

    # The final model loads back from MLflow and predicts like the checkpoint.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(result.tracking_uri)  # models:/ URIs resolve through it
    try:
        model = mlflow.pytorch.load_model(result.model_uri).eval()
    finally:
        mlflow.set_tracking_uri(previous)
    reference, _ = load_model(result.checkpoint)
    images = torch.rand(1, 3, 64, 96)
    labels = torch.randint(0, 7, (1, 64, 96))  # the oracle policy needs labels
    with torch.no_grad():
        got = model(images, labels).logits
        want = reference(images, labels).logits
    assert got.shape == (1, 7, 64, 96)
    torch.testing.assert_close(got, want)


def test_policy_run_stopped_then_resumed_and_learns(tiny_shards, tmp_path, monkeypatch) -> None:
    from pipelines.common import storage
    from pipelines.common.data import eval_loader
    from pipelines.common.model import build_model
    from pipelines.train.stages import evaluate_policy

    monkeypatch.setenv(FAIL_AT_STEP_ENV, "8")
    overrides = _overrides(tiny_shards, tmp_path, "train.max_failures=0", "mlflow.log_model=false",
                           f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = load_train_config("configs/tiny/policy.yaml", overrides, stage="policy")
    with pytest.raises(Exception, match="injected failure"):
        fit(cfg)
    run_dir = tmp_path / "ray" / cfg.name
    assert (run_dir / "checkpoint_00000006" / "model.pt").is_file()
    assert not (run_dir / "checkpoint_00000012").exists()

    # The same command again (here through the CLI): resumes from step 6.
    out = tmp_path / "policy.json"
    argv = ["train", "policy", "--config", "configs/tiny/policy.yaml", "--json", str(out)]
    assert main(argv + [a for o in overrides for a in ("--set", o)]) == 0
    summary = json.loads(out.read_text())
    assert {"run_id", "tracking_uri", "checkpoint", "metrics"} <= set(summary)
    assert {"miou", "gflops", "tokens_mean", "halted_fraction"} <= set(summary["metrics"])
    assert summary["metrics"]["restored_step"] == 6
    assert summary["metrics"]["step"] == 12
    assert summary["checkpoint"].endswith("checkpoint_00000012")
    assert storage.exists(storage.join(summary["checkpoint"], "policy.pt"))
    assert 0 < summary["metrics"]["tokens_mean"] < summary["metrics"]["tokens_in"]

    torch.manual_seed(cfg.train.seed)
    untrained = build_model(cfg.model).eval()
    trained, _ = load_model(summary["checkpoint"])
    before = evaluate_policy(untrained, eval_loader(tiny_shards["val"]), device="cpu")
    after = evaluate_policy(trained, eval_loader(tiny_shards["val"]), device="cpu")
    assert after["policy_bce"] < before["policy_bce"]
    assert after["policy_bacc"] > before["policy_bacc"]


def test_step_eval_cli_on_the_trained_run(crashed_step_run, tiny_shards, tmp_path) -> None:
    cfg, result = crashed_step_run
    out = tmp_path / "eval.json"
    run_dir = str(Path(cfg.storage.storage_path) / cfg.name)  # resolves to its latest checkpoint
    # configs/tiny/step.yaml shares with the label oracle: allowed, and labelled so
    assert main(["eval", "--checkpoint", run_dir, "--data", tiny_shards["val"],
                 "--thresholds", "0.5", "--tracking-uri", result.tracking_uri,
                 "--latency-samples", "1", "--allow-oracle", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["uses_labels"] is True and got["upper_bound"] is True
    assert got["checkpoint"] == result.checkpoint
    assert got["inference"] == {"exit_thresholds": [0.5]}
    assert got["result"]["num_images"] == 3
    m = got["metrics"]
    assert 0 <= m["miou"] <= 1 and m["gflops"] > 0 and 0 < m["tokens_mean"] < 256
    assert 0 <= m["halted_fraction"] <= 1 and m["latency_ms"] > 0
    assert set(got["result"]["per_class_iou"]) >= {"building", "road", "water"}
    from mlflow.tracking import MlflowClient

    run = MlflowClient(got["tracking_uri"]).get_run(got["run_id"])
    assert run.data.metrics["miou"] == pytest.approx(m["miou"])


def test_a_finetuned_checkpoint_keeps_its_architecture(tiny_shards, tmp_path) -> None:
    """Two base steps, then two fine-tuning steps with halting at the phase's own exit
    thresholds: the fine-tuned checkpoint's model_config.yaml is the base checkpoint's,
    byte for byte (the architecture as built: no halt_in_training, no thresholds of the
    phase), and both store the training's inference settings in inference.yaml, which the
    final checkpoint loads with."""
    from step_model.config import StepConfig

    cfg = _cfg("step", tiny_shards, tmp_path, "train.steps=2", "finetune.steps=2",
               "finetune.inference.exit_thresholds=0.0", "finetune.inference.top_k=1",
               "train.checkpoint_every=2", "train.keep_last=2", "train.max_failures=0",
               "scaling.num_workers=1", "mlflow.log_model=false",
               f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    result = fit(cfg)
    final = Path(result.checkpoint)
    base = final.parent / "checkpoint_00000002"
    assert final.name == "checkpoint_00000004" and base.is_dir()
    architecture = (final / "model_config.yaml").read_text()
    assert architecture == (base / "model_config.yaml").read_text()
    assert "halt_in_training" not in architecture and "thresholds" not in architecture
    assert StepConfig.model_validate(yaml.safe_load(architecture)).exits == cfg.model.exits
    for ckpt in (base, final):
        assert yaml.safe_load((ckpt / "inference.yaml").read_text()) == cfg.inference.to_dict()
    model, _ = load_model(final)
    assert model.inference == cfg.inference and not model.halts_in_training
    # the phase did halt: the last evaluation ran at its thresholds (0: all but the top-k)
    assert result.metrics["halted_fraction"] > 0.5
