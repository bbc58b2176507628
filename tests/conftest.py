"""Shared, real test services: a local Ray, an ``mlflow server`` and a moto S3 endpoint.

Each is started once per test session, bound to 127.0.0.1, and only when a test asks for it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import LOVEDA, REPO, free_port, start_mlflow_server, stop_process

# Tests that use these start real services (Ray, an MLflow server, S3) or shard data with
# Ray Data: they make the `integration` tier; `pytest -m "not integration"` runs the rest.
SERVICE_FIXTURES = {"ray_local", "mlflow_server", "s3_endpoint", "s3_bucket", "tiny_shards"}


# The suite runs on two pytest-xdist workers (`-n 2` in pyproject.toml): about a third of
# a serial run leaves one of the two cores idle (single-threaded tests, services starting,
# subprocesses waiting). A worker takes whole groups: a test module (its module fixtures
# run once), or the modules that read the session's tiny pipeline (a 2-minute fixture:
# once). The longest groups (`pytest --durations=0`) start first, the short ones fill in.
SHARED_PIPELINE = "tiny_pipeline"  # the fixture, and the group of the modules reading it
SHARED_PIPELINE_MODULES = {"test_console", "test_review_ui", "test_workflow_baseline",
                           "test_workflow_e2e"}
LONGEST_FIRST = (SHARED_PIPELINE, "test_cluster", "test_tune_resume", "test_tune_cli",
                 "test_train_ray", "test_train_resilience", "test_workflow_ui",
                 "test_data_bench")


def _group(nodeid: str) -> str:
    module = Path(nodeid.split("::", 1)[0]).stem
    return SHARED_PIPELINE if module in SHARED_PIPELINE_MODULES else module


def pytest_collection_modifyitems(config, items) -> None:
    groups = {item.nodeid: _group(item.nodeid) for item in items}
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if SERVICE_FIXTURES & fixtures:
            item.add_marker(pytest.mark.integration)
        if SHARED_PIPELINE in fixtures and groups[item.nodeid] != SHARED_PIPELINE:
            raise pytest.UsageError(f"{item.nodeid} reads {SHARED_PIPELINE}: add its module "
                                    "to SHARED_PIPELINE_MODULES in tests/conftest.py")
    order = {group: i for i, group in enumerate(LONGEST_FIRST)}
    uses_services = {groups[i.nodeid] for i in items if i.get_closest_marker("integration")}
    # whole groups move (a module split in two would set its module fixtures up twice)
    items.sort(key=lambda i: (order.get(groups[i.nodeid], len(order)),
                              groups[i.nodeid] not in uses_services))


def pytest_xdist_make_scheduler(config, log):
    # xdist's own `loadgroup` cannot group here: it renames node ids, which pytest 9.2
    # no longer reads from `_nodeid`
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return ByGroup(config, log)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A real ``mlflow server`` (SQLite backend, local artifacts) on 127.0.0.1; yields its URI."""
    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    try:
        yield uri
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 endpoint (moto server mode) on 127.0.0.1 with test credentials in the env."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="testing-key-id",
        AWS_SECRET_ACCESS_KEY="testing-secret-never-logged",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        yield url
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on the moto endpoint; yields its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the whole session (never attaches to a stale cluster)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
        )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, mlflow_server) -> dict:
    """``step run configs/tiny/pipeline.yaml`` killed in train_step, resumed, rerun (see
    tests/test_workflow_e2e.py), once per session: the e2e and review tests read it."""
    from test_workflow_e2e import killed_resumed_rerun

    return killed_resumed_rerun(tmp_path_factory, mlflow_server)


# ---- training data: real LoveDA fixtures, sharded once per session ---------------------


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, ray_local) -> dict[str, str]:
    """``step prep`` output made from the LoveDA fixtures, downscaled to 256 px.

    train: the 3 scenes plus 3 flipped/rotated copies of each (12 samples, 2 per shard, so
    that 2 ranks x 1 loader worker each get shards); val: the 3 scenes (1 per shard).
    Yields {"train": dir, "val": dir}.
    """
    from PIL import Image

    from data_prep.prep import prepare

    root = tmp_path_factory.mktemp("tiny_shards")
    ops = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_90,
           Image.Transpose.ROTATE_270]
    for split, variants in (("train", ops), ("val", ops[:1])):
        for name in sorted(p.name for p in (LOVEDA / "img_dir").glob("*.png")):
            for j, op in enumerate(variants):
                for sub in ("img_dir", "ann_dir"):
                    dest = root / "src" / sub / split / f"{Path(name).stem}_{j}.png"
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    im = Image.open(LOVEDA / sub / name)
                    (im if op is None else im.transpose(op)).save(dest)
    out = {}
    for split, per_shard in (("train", 2), ("val", 1)):
        prepare("loveda", str(root / "src"), str(root / split), split=split,
                samples_per_shard=per_shard, max_side=256, progress=False)
        out[split] = str(root / split)
    return out
