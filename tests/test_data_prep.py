"""`step prep`: deterministic shards, manifest checksums, resume after damage and after a kill."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep import fixtures, prepare, read_dataset_info
from data_prep.prep import _shard_is_done

from helpers import LOVEDA

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_src")
    fixtures.make_tree("folder", root, n=8)
    return root


def _prep(src: Path, out: Path, **kw):
    return prepare("folder", str(src), str(out), "train", samples_per_shard=3,
                   layout=str(src / "layout.yaml"), progress=False, **kw)


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.usefixtures("ray_local")
def test_two_runs_are_byte_identical_and_manifest_checks_out(tiny_src: Path, tmp_path: Path) -> None:
    a = _prep(tiny_src, tmp_path / "a")
    b = _prep(tiny_src, tmp_path / "b")
    assert b.shards_written == 3
    assert (a.read, a.written, a.skipped, a.shards_written) == (8, 8, {}, 3)
    assert [Path(s).name for s in a.shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert files_a.keys() == files_b.keys()
    assert {k for k in files_a if files_a[k] != files_b[k]} == set()

    out = tmp_path / "a"
    assert json.loads((out / "sizes.json").read_text()) == {
        "train-000000.tar": 3, "train-000001.tar": 3, "train-000002.tar": 2}
    info = read_dataset_info(str(out))
    assert (info.name, info.num_classes, info.ignore_index, info.num_samples) == ("tiny", 3, 255, {"train": 8})

    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["key"] for r in manifest] == [f"s{i:03d}" for i in range(8)]
    # nothing skipped: the list is still written, empty, with its schema
    assert a.skipped_total == 0 and a.skipped_file == str(out / "skipped.parquet")
    skipped = pq.read_table(out / "skipped.parquet")
    assert skipped.num_rows == 0
    assert skipped.column_names == ["split", "shard", "key", "path", "reason", "detail"]
    by_key = {r["key"]: r for r in manifest}
    for shard in a.shards:
        members = []
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                assert m.mtime == 0 and m.uname == "step"
                data = tar.extractfile(m).read()
                key, ext = m.name.split(".", 1)
                members.append(key)
                row = by_key[key]
                assert row["shard"] == Path(shard).name
                col = "label_sha256" if ext == "label.png" else "image_sha256"
                assert hashlib.sha256(data).hexdigest() == row[col]
                if ext == "label.png":
                    label = np.asarray(Image.open(io.BytesIO(data)))
                    hist = np.bincount(label.ravel(), minlength=256)
                    assert row["class_pixels"] == hist[:3].tolist()
                    assert row["ignore_pixels"] == hist[255]
                    assert (row["height"], row["width"]) == label.shape == (48, 64)
        # the files of one sample are contiguous in the tar
        assert members == sorted(members) and len(members) == 2 * len(set(members))


@pytest.mark.usefixtures("ray_local")
def test_rerun_rewrites_only_missing_or_corrupt_shards(tiny_src: Path, tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    _prep(tiny_src, clean)
    out = tmp_path / "damaged"
    shutil.copytree(clean, out)
    (out / "train-000001.tar").unlink()  # killed before the rename
    shard2 = out / "train-000002.tar"
    shard2.write_bytes(shard2.read_bytes()[:3000])  # truncated by someone else
    (out / "manifest.parquet").unlink()  # killed before the manifest
    (out / "sizes.json").unlink()
    (out / ".train-000001.tar.abc.tmp").write_bytes(b"partial")  # a killed writer's temp file
    (out / "train-000007.tar").write_bytes(b"")  # a stale shard of an older, larger plan
    report = _prep(tiny_src, out)
    assert (report.shards_reused, report.shards_written, report.written) == (1, 2, 8)
    assert _files(out) == _files(clean)


@pytest.mark.usefixtures("ray_local")
def test_killed_job_resumes_and_never_leaves_partial_shards(tmp_path: Path) -> None:
    """SIGKILL a real `step prep` (attached to the test Ray) mid-job, then rerun it."""
    import ray

    src = fixtures.replicate_flat(LOVEDA, tmp_path / "src", 10)
    out = tmp_path / "out"
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address,
               PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "pipelines.cli", "prep", "--dataset", "loveda", "--src", str(src),
           "--out", str(out), "--samples-per-shard", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(out.glob("train-*.tar"))) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(out.glob("train-*.tar"))
    assert finished, "the job wrote no shard before the kill"
    digests = {}
    for shard in finished:  # every tar under a final name is whole and matches its part
        part = pq.read_table(out / "_parts" / f"{shard.name}.parquet")
        digest = part.schema.metadata[b"plan"].decode()
        digests[shard.name] = digest
        assert _shard_is_done(str(out), shard.name, digest) is not None, shard

    report = prepare("loveda", str(src), str(out), "train", samples_per_shard=1, progress=False)
    # killed after 2 of 10 shards (each takes >= 0.1 s here): the rerun keeps the finished
    # ones and writes the rest
    assert report.written == 10 and report.shards_reused >= len(finished)
    assert report.shards_written >= 1 and report.shards_reused + report.shards_written == 10
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {f"train-{i:06d}.tar": 1 for i in range(10)}
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.num_rows == 10 and len(set(manifest.column("key").to_pylist())) == 10
