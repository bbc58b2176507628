"""The whole data path against a real S3 endpoint (moto server on 127.0.0.1)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import boto3
import pytest

from data_prep import build_loader, fixtures, prepare, read_dataset_info
from pipelines.cli import main as step


@pytest.mark.usefixtures("ray_local")
def test_prep_from_s3_to_s3_and_load_batches_from_s3(
    s3_bucket: str, s3_endpoint: str, tmp_path: Path, capsys, caplog
) -> None:
    caplog.set_level(logging.DEBUG, logger="data_prep")
    keys = fixtures.make_tree("folder", tmp_path / "src", n=6)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for path in sorted((tmp_path / "src").rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), s3_bucket, f"raw/{path.relative_to(tmp_path / 'src').as_posix()}")
    src, out = f"s3://{s3_bucket}/raw", f"s3://{s3_bucket}/shards/tiny"

    rc = step(["prep", "--dataset", "folder", "--src", src, "--out", out, "--samples-per-shard", "2",
               "--layout", f"{src}/layout.yaml", "--no-progress", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["written"] == 6 and report["skipped"] == {}
    assert report["shards"] == [f"{out}/train-{i:06d}.tar" for i in range(3)]
    assert report["manifest"] == f"{out}/manifest.parquet"
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="shards/tiny/")["Contents"]}
    assert {f"shards/tiny/{n}" for n in ("manifest.parquet", "sizes.json", "dataset.json",
                                         "train-000000.tar", "train-000002.tar")} <= listed

    # rerun: every shard verified against its manifest part on S3 and kept
    again = prepare("folder", src, out, "train", samples_per_shard=2,
                    layout=f"{src}/layout.yaml", progress=False)
    assert (again.shards_reused, again.shards_written) == (3, 0)

    info = read_dataset_info(out)
    assert info.num_samples == {"train": 6} and info.num_classes == 3
    loader = build_loader(out, batch_size=2, crop_size=32, train=True, num_workers=2, with_keys=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 3  # 2 workers: 2 + 1 shards of 2 -> 2 + 1 batches
    images, labels, _ = batches[0]
    assert images.shape == (2, 3, 32, 32) and labels.shape == (2, 32, 32)
    evaluated = [k for *_, ks in build_loader(out, batch_size=1, crop_size=None, train=False,
                                              num_workers=0, with_keys=True) for k in ks]
    assert sorted(evaluated) == sorted(keys)

    # credentials never reach the output or the logs
    secret = "testing-secret-never-logged"
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err + caplog.text
    assert secret not in (tmp_path / "r.json").read_text()
