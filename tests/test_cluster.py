"""The cluster path as a user's first cluster job meets it, on 127.0.0.1.

Two Ray nodes (``ray start --head`` and ``ray start --address``, each with its own
``--temp-dir``), token auth on; a real ``mlflow server`` whose artifacts live on S3; moto S3
holding the raw data in LoveDA's official layout, the tiles, the shards, the checkpoints
and the MLflow artifacts; AWS keys in the nodes' environment only. The tiny pipeline, tile
step included, goes in with ``step submit --follow``.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets

import pytest
from test_tiles import upload_official_loveda

from data_prep import storage as files

from helpers import (
    REPO,
    start_mlflow_server,
    start_ray_node,
    stop_process,
    wait_ray_api,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

EXPERIMENT = "cluster"
MODEL = "step-tiny"


@pytest.fixture(scope="module")
def cluster_run(s3_endpoint, tmp_path_factory):
    import boto3

    from pipelines.cli import main

    bucket = f"cluster-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    raw = upload_official_loveda(bucket)
    secret = f"cluster-secret-{secrets.token_hex(12)}"
    keys = {"AWS_ACCESS_KEY_ID": f"cluster-key-{secrets.token_hex(4)}",
            "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": s3_endpoint,
            "AWS_DEFAULT_REGION": "us-east-1"}
    root = tmp_path_factory.mktemp("cluster")
    mlflow_proc, tracking_uri = start_mlflow_server(
        root / "mlflow", artifact_root=f"s3://{bucket}/mlflow", env=dict(os.environ, **keys))
    # The head keeps 1 CPU, the worker node 2: the 2 training workers cannot all fit on
    # the head, so work really crosses nodes.
    head = start_ray_node(num_cpus=1, env_extra=keys)
    worker = None
    try:
        worker = start_ray_node(head_gcs=head.gcs, token=head.token, num_cpus=2,
                                env_extra=keys)
        wait_ray_api(head, "/nodes?view=summary",
                     check=lambda body: body.count(b'"state": "ALIVE"')
                     + body.count(b'"state":"ALIVE"') >= 2)
        token_file = root / "token"
        token_file.write_text(head.token)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(["submit", "configs/tiny/pipeline.yaml", "--address", head.dashboard,
                       "--token-file", str(token_file), "--follow", "--timeout", "780",
                       "--working-dir", str(REPO),
                       "--set", f"data.src={raw}", "--set", f"storage=s3://{bucket}/pipelines",
                       "--set", f"mlflow.tracking_uri={tracking_uri}",
                       "--set", f"mlflow.experiment={EXPERIMENT}"])
        out = buf.getvalue()
        (root / "submit.log").write_text(out)
        yield {"rc": rc, "out": out, "bucket": bucket, "secret": secret,
               "tracking_uri": tracking_uri, "nodes": [head, worker]}
    finally:
        for node in (worker, head):
            if node is not None:
                node.stop()
        stop_process(mlflow_proc)


def test_job_succeeded_and_progress_was_shown(cluster_run) -> None:
    out = cluster_run["out"]
    assert cluster_run["rc"] == 0, out[-4000:]
    assert "SUCCEEDED" in out
    # rank 0 of each training printed its progress, forwarded to the job's logs
    assert "[train policy] step 4/4" in out and "[train step] step 8/8" in out


def test_every_mlflow_run_finished_and_the_model_is_registered(cluster_run) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster_run["tracking_uri"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert len(runs) >= 7  # the parent, its six steps, the trials
    assert {r.info.status for r in runs} == {"FINISHED"}
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert versions, "no registered model version"
    # MLflow's artifacts went to S3, through the server's artifact root
    assert any(k.startswith("mlflow/") for k in files.list_files(f"s3://{cluster_run['bucket']}"))


def test_tiles_shards_and_checkpoints_are_in_s3(cluster_run) -> None:
    keys = list(files.list_files(f"s3://{cluster_run['bucket']}/pipelines"))
    assert any("/tiles/img_dir/train/" in k for k in keys)
    shards = [k for k in keys if k.endswith(".tar")]
    assert any("/train/" in k for k in shards) and any("/val/" in k for k in shards)
    assert any("checkpoint_" in k and k.endswith("model.pt") for k in keys)


def test_the_secret_reaches_no_log_and_no_mlflow_field(cluster_run) -> None:
    from mlflow.tracking import MlflowClient

    secret = cluster_run["secret"].encode()
    assert secret not in cluster_run["out"].encode()
    scanned = 0
    for node in cluster_run["nodes"]:
        assert node.session_logs(), f"no Ray session logs under {node.temp_dir}"
        # logs, and everything else Ray keeps (Tune and Train state, runtime envs)
        for path in node.temp_dir.rglob("*"):
            if path.is_file() and not path.is_socket():
                scanned += 1
                assert secret not in path.read_bytes(), f"secret in {path}"
    assert scanned > 10
    # the worker node really ran work (its own workers' logs)
    assert list(cluster_run["nodes"][1].session_logs()[0].glob("worker-*"))
    # nor in what the pipeline stored on S3 (state files, pickled Tune/Train configs)
    bucket = cluster_run["bucket"]
    for key, size in files.list_files(f"s3://{bucket}/pipelines").items():
        if size < 1 << 20:
            assert secret not in files.read_bytes(f"s3://{bucket}/pipelines/{key}"), key

    client = MlflowClient(cluster_run["tracking_uri"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    fields = [str(exp.tags)]
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        fields += [str(run.data.params), str(run.data.tags), str(run.data.metrics)]
    for version in client.search_model_versions(f"name='{MODEL}'"):
        fields += [str(version.tags), str(version.description)]
    assert fields and not any(cluster_run["secret"] in f for f in fields)


def test_step_predict_runs_the_registered_model_on_the_cluster(cluster_run, tmp_path) -> None:
    """``step predict`` with RAY_ADDRESS: Ray Data actors on the cluster's nodes apply the
    registered model (checkpoint and thresholds from the registry) to 3 val tiles on S3."""
    import json
    import subprocess
    import sys

    from helpers import node_env

    assert cluster_run["rc"] == 0
    bucket = cluster_run["bucket"]
    tiles = sorted(k for k in files.list_files(f"s3://{bucket}/pipelines")
                   if "/tiles/img_dir/val/" in k and k.endswith(".png"))[:3]
    assert len(tiles) == 3
    for i, key in enumerate(tiles):
        files.write_bytes(f"s3://{bucket}/predict-in/t{i}.png",
                          files.read_bytes(f"s3://{bucket}/pipelines/{key}"))
    head = cluster_run["nodes"][0]
    env = dict(node_env(head.token), RAY_ADDRESS=head.gcs)
    doc_path = tmp_path / "predict.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "predict", "--model", f"models:/{MODEL}/latest",
         "--tracking-uri", cluster_run["tracking_uri"], "--images", f"s3://{bucket}/predict-in",
         "--out", f"s3://{bucket}/predict-out", "--batch-size", "3", "--json", str(doc_path)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    doc = json.loads(doc_path.read_text())
    assert doc["executor"] == "ray" and doc["nodes"] and doc["images"] == 3
    assert doc["inference"] and doc["thresholds_from_registry"]
    written = files.list_files(f"s3://{bucket}/predict-out")
    assert {f"masks/t{i}.png" for i in range(3)} <= set(written) and "summary.json" in written
    assert cluster_run["secret"] not in proc.stdout + proc.stderr
