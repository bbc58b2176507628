"""`step bench data` on a plain install: moto (a test extra) is never needed unless asked for."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data_prep import fixtures

REPO = Path(__file__).resolve().parents[1]

# run before the code under test: `import moto` (and `moto.server`) raises ImportError
NO_MOTO = "import sys; sys.modules['moto'] = None; sys.modules['moto.server'] = None\n"


def _python(code: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_MOTO + textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_bench_data_helps_and_refuses_s3_moto_without_moto() -> None:
    proc = _python("""
        from pipelines.cli.app import main

        # asked for moto without moto: a clear one-line error, exit 2, before any work
        assert main(["bench", "data", "--images", "x", "--s3-moto"]) == 2
        main(["bench", "data", "--help"])
    """, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--s3 URI" in proc.stdout and "--s3-moto" in proc.stdout
    assert proc.stderr.strip() == textwrap.dedent("""
        step bench data: error: --s3-moto needs moto, which is a test extra (pip install \
'moto[server]' or the project's [test] extra); or measure a real endpoint with --s3 \
s3://bucket/prefix
    """).strip()


def _images(root: Path) -> Path:
    """Three 64 x 64 LoveDA-like pairs in a flat img_dir/ + ann_dir/."""
    for i in range(3):
        image, label = fixtures.synthetic_pair(fixtures.RAW_VALUES["loveda"], (64, 64), seed=i)
        fixtures.save_png(root / "img_dir" / f"{i}.png", image)
        fixtures.save_png(root / "ann_dir" / f"{i}.png", label)
    return root


def _bench(tmp_path: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``step bench data`` (small and quick) in a process where moto cannot be imported."""
    images = _images(tmp_path / "images")
    argv = ["--images", str(images), "--json", str(tmp_path / "bench.json"), "--repeats", "1",
            "--crop", "32", "--train-workers", "1", "--workdir", str(tmp_path / "work"), *extra]
    return _python(f"""
        from pipelines.cli.app import main

        sys.exit(main(["bench", "data", *{argv!r}]))
    """, timeout=timeout)


@pytest.mark.integration  # starts a local Ray for the shard-writing job
def test_bench_data_without_s3_skips_it_with_a_note(tmp_path: Path) -> None:
    proc = _bench(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["samples"] == 64 and result["shards"] == 8 and result["image_size"] == [64, 64]
    assert result["load_local_images_per_s"] > 0 and result["decode_images_per_s"] > 0
    assert result["load_s3_images_per_s"] is None and result["s3_vs_local"] is None
    assert result["targets_met"]["s3_ge_0.8_local"] is None
    assert result["s3"].startswith("not measured: pass --s3 s3://bucket/prefix")
    assert f"step bench data: S3 {result['s3']}" in proc.stderr


@pytest.mark.integration  # starts a local Ray and an S3 endpoint
def test_bench_data_s3_reads_the_given_endpoint_and_cleans_up(
    tmp_path: Path, s3_bucket: str, s3_endpoint: str
) -> None:
    import boto3

    # the endpoint comes from AWS_ENDPOINT_URL (set by the fixture, inherited by the bench)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.put_object(Bucket=s3_bucket, Key="other/keep.txt", Body=b"not the bench's")
    uri = f"s3://{s3_bucket}/bench"
    proc = _bench(tmp_path, "--s3", uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["s3"] == uri and result["load_s3_images_per_s"] > 0
    assert isinstance(result["targets_met"]["s3_ge_0.8_local"], bool)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert keys == ["other/keep.txt"], "the bench deletes what it uploaded, and only that"

    # a prefix that holds files is refused before any work
    refused = _bench(tmp_path / "again", "--s3", f"s3://{s3_bucket}/other", timeout=120)
    assert refused.returncode == 2
    assert f"--s3 s3://{s3_bucket}/other is not empty" in refused.stderr
    assert not (tmp_path / "again" / "work").exists()
