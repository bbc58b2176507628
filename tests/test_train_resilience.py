"""A training that outlives its tracking server, keeps its checkpoints on S3, and is not
run twice.

One real Ray Train run (1 CPU worker, 8 steps, checkpoints every 2, the last 2 kept) with
its storage path on the moto S3 endpoint and its own ``mlflow server``, which a watcher
thread kills as soon as the run's first metrics reach it. Ray is started before the AWS
variables exist when this file runs alone (``tiny_shards`` before ``s3_endpoint``), so the
workers and the Train controller see S3 only through what the driver hands them.

The same finished run is then started again twice, against the same server brought back
on its database: no training, one model in MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipelines.common.checkpoint import load_model, state_digest
from pipelines.train.config import TrainConfig, load_train_config
from pipelines.train.trainer import TrainResult, fit

from helpers import kill_process, start_mlflow_server, stop_process

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

EXPERIMENT = "train-resilience"


@dataclass
class OutageRun:
    cfg: TrainConfig
    result: TrainResult
    bucket: str
    server_root: Path
    logged_before_kill: list[int]  # train/loss_avg steps the server had when it was killed
    warnings: list[str] = field(default_factory=list)
    output: str = ""  # the driver's stdout, stderr and log records during fit()


@contextlib.contextmanager
def _capture_fds(path: Path):
    """fd-level stdout/stderr of this process into ``path`` (what Ray and C code print too)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "wb") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _kill_on_first_metrics(proc, uri: str, seen: list[int]) -> threading.Thread:
    """Polls the server's REST API; kills it once a run of ``EXPERIMENT`` has metrics."""
    from mlflow.tracking import MlflowClient

    def watch() -> None:
        client = MlflowClient(uri)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(Exception):  # experiment / run not created yet
                exp = client.get_experiment_by_name(EXPERIMENT)
                for run in client.search_runs([exp.experiment_id]):
                    steps = [m.step for m in
                             client.get_metric_history(run.info.run_id, "train/loss_avg")]
                    if steps:
                        kill_process(proc)
                        seen.extend(steps)
                        return
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def outage_run(tiny_shards, s3_endpoint, tmp_path_factory) -> OutageRun:
    import boto3

    tmp = tmp_path_factory.mktemp("outage")
    bucket = "resilience"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    root = tmp / "mlflow"
    proc, uri = start_mlflow_server(root)
    cfg = load_train_config("configs/tiny/step.yaml", [
        f"data.train={tiny_shards['train']}", f"data.val={tiny_shards['val']}",
        f"storage.storage_path=s3://{bucket}/ray", "scaling.num_workers=1",
        "train.steps=8", "train.log_every=2", "train.checkpoint_every=2", "train.keep_last=2",
        "train.max_failures=0", f"mlflow.tracking_uri={uri}", f"mlflow.experiment={EXPERIMENT}",
    ], stage="step")

    seen: list[int] = []
    watcher = _kill_on_first_metrics(proc, uri, seen)
    records: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(handler.format(record))
    logging.getLogger().addHandler(handler)
    try:
        with _capture_fds(tmp / "driver.out"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fit(cfg)
    finally:
        logging.getLogger().removeHandler(handler)
        watcher.join(timeout=10)
        if proc.poll() is None:
            stop_process(proc)
    output = (tmp / "driver.out").read_text(errors="replace") + "\n".join(records)
    return OutageRun(cfg, result, bucket, root, seen, [str(w.message) for w in caught], output)


def test_training_finishes_when_the_tracking_server_dies(outage_run) -> None:
    from mlflow.tracking import MlflowClient

    run, result = outage_run, outage_run.result
    assert run.logged_before_kill, "the watcher never saw metrics: the server was not killed"
    # Training went on to its last step and checkpoint, its figures in the result.
    assert result.metrics["step"] == 8
    assert result.checkpoint == f"s3://{run.bucket}/ray/{run.cfg.name}/checkpoint_00000008"
    assert 0.0 <= result.metrics["miou"] <= 1.0
    assert result.metrics["gflops"] > 0 and result.metrics["tokens_mean"] > 0
    # Rank 0 lost later logging calls and said so; the driver warned when it could not
    # close the run, and did not try to upload the model to a dead server.
    assert result.metrics["tracking_failures"] >= 1
    assert any("training continues" in w for w in run.warnings), run.warnings
    assert result.model_uri is None

    # What the server stored before it died (its database is still on disk).
    store = MlflowClient(f"sqlite:///{run.server_root / 'mlflow.db'}")
    history = store.get_metric_history(result.run_id, "train/loss_avg")
    steps = sorted(m.step for m in history)
    assert steps and steps[0] == 2 and 8 not in steps, steps
    assert store.get_run(result.run_id).data.tags["ray.run_name"] == run.cfg.name


def test_checkpoints_on_s3_keep_the_last_k_and_load_back(outage_run) -> None:
    from data_prep.storage import list_files

    run, result = outage_run, outage_run.result
    listing = list_files(f"s3://{run.bucket}/ray/{run.cfg.name}")
    kept = sorted({rel.split("/")[0] for rel in listing if rel.startswith("checkpoint_")
                   and "/" in rel})
    assert kept == ["checkpoint_00000006", "checkpoint_00000008"]  # keep_last=2 of 4

    model, model_config = load_model(result.checkpoint)
    # The weights stored on S3 are those the worker ended with (digest taken in the worker).
    assert state_digest(model.state_dict()) == result.metrics["checkpoint_digest"]
    assert model_config["backbone"] == "vit_tiny_patch16_384"
    earlier, _ = load_model(result.checkpoint.replace("00000008", "00000006"))
    assert state_digest(earlier.state_dict()) != result.metrics["checkpoint_digest"]


def test_credentials_never_reach_logs_or_mlflow(outage_run) -> None:
    import ray._private.worker
    from mlflow.tracking import MlflowClient

    from data_prep.storage import list_files, read_bytes

    run, result = outage_run, outage_run.result
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]  # set by the s3_endpoint fixture
    assert secret and run.output  # something was captured, and it was checked below

    store = MlflowClient(f"sqlite:///{run.server_root / 'mlflow.db'}")
    data = store.get_run(result.run_id).data
    assert data.params["storage.storage_path"] == f"s3://{run.bucket}/ray"  # params did log
    assert not [k for k, v in {**data.params, **data.tags}.items() if secret in v]
    assert secret not in run.output
    assert secret not in "\n".join(run.warnings)
    assert secret not in json.dumps(result.to_dict())
    # The workers' and the Train controller's logs of this Ray session.
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked
    # Nor anything Ray stored with the run (Train V1 pickled its RunConfig there).
    prefix = f"s3://{run.bucket}/ray"
    stored = [rel for rel in list_files(prefix)
              if not rel.endswith("/") and secret.encode() in read_bytes(f"{prefix}/{rel}")]
    assert not stored


def test_rerun_of_a_finished_training_returns_its_result(outage_run, caplog) -> None:
    import boto3
    from mlflow.tracking import MlflowClient

    run, first = outage_run, outage_run.result
    s3 = boto3.client("s3")

    def snapshot() -> dict[str, tuple]:
        objects = s3.list_objects_v2(Bucket=run.bucket, Prefix="ray/").get("Contents", [])
        return {o["Key"]: (o["ETag"], o["LastModified"]) for o in objects}

    before = snapshot()
    proc, uri = start_mlflow_server(run.server_root)  # the server is back, same database
    try:
        cfg = run.cfg.model_copy(update={
            "mlflow": run.cfg.mlflow.model_copy(update={"tracking_uri": uri})})
        with caplog.at_level(logging.WARNING, logger="pipelines.train.trainer"):
            again = fit(cfg)
            once_more = fit(cfg)
        client = MlflowClient(uri)
        status = client.get_run(first.run_id).info.status
        exp = client.get_experiment_by_name(EXPERIMENT)
        models = client.search_logged_models([exp.experiment_id])
    finally:
        stop_process(proc)

    assert sum("already complete" in r.getMessage() for r in caplog.records) == 2
    assert snapshot() == before  # nothing trained, written or deleted
    for res in (again, once_more):
        assert res.run_id == first.run_id and res.checkpoint == first.checkpoint
        assert res.metrics["step"] == 8
        assert res.metrics["checkpoint_digest"] == first.metrics["checkpoint_digest"]
        assert res.metrics["miou"] == pytest.approx(first.metrics["miou"])
    # The outage had kept the model out of MLflow: the first rerun logs it, the second
    # finds it there and logs nothing.
    assert again.model_uri is not None and once_more.model_uri == again.model_uri
    assert [m.source_run_id for m in models] == [first.run_id]
    assert status == "FINISHED"
