"""Bad input: each bad pair is skipped and counted with its reason; --strict fails naming it."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_prep import DatasetError, PrepError, build_loader, fixtures, prepare
from data_prep.shards import write_tar
from pipelines.cli import main as step

GOOD = 2


def _bad_tree(root: Path) -> Path:
    fixtures.make_tree("folder", root, n=GOOD)
    img, ann = root / "img_dir" / "train", root / "ann_dir" / "train"
    image, label = fixtures.synthetic_pair(fixtures.RAW_VALUES["folder"], seed=7)
    # truncated PNG image
    fixtures.save_png(img / "t_truncated.png", image)
    data = (img / "t_truncated.png").read_bytes()
    (img / "t_truncated.png").write_bytes(data[: len(data) // 2])
    fixtures.save_png(ann / "t_truncated.png", label)
    # image/label size mismatch
    fixtures.save_png(img / "t_mismatch.png", image)
    fixtures.save_png(ann / "t_mismatch.png", label[:-8])
    # label value 5: neither one of the 3 classes nor the ignore value 9
    fixtures.save_png(img / "t_range.png", image)
    fixtures.save_png(ann / "t_range.png", np.where(label == 1, 5, label).astype(np.uint8))
    # a text file with an image suffix
    (img / "t_text.png").write_text("not an image at all\n")
    fixtures.save_png(ann / "t_text.png", label)
    # an image without a label, and a label without an image
    fixtures.save_png(img / "t_unlabelled.png", image)
    fixtures.save_png(ann / "t_orphan.png", label)
    return root


@pytest.fixture(scope="module")
def bad_src(tmp_path_factory) -> Path:
    return _bad_tree(tmp_path_factory.mktemp("bad_src"))


@pytest.mark.usefixtures("ray_local")
def test_bad_pairs_are_skipped_and_counted_by_reason(bad_src: Path, tmp_path: Path) -> None:
    report = prepare("folder", str(bad_src), str(tmp_path / "out"), "train", samples_per_shard=2,
                     layout=str(bad_src / "layout.yaml"), progress=False)
    assert report.read == GOOD + 6 and report.written == GOOD
    assert report.skipped == {
        "label_out_of_range": 1, "missing_image": 1, "missing_label": 1, "size_mismatch": 1,
        "undecodable_image": 2,  # the truncated PNG and the text file
    }
    assert "t_range.png" in report.examples["label_out_of_range"]
    assert "values [5]" in report.examples["label_out_of_range"]
    assert "t_mismatch.png" in report.examples["size_mismatch"]
    assert "ann_dir/train/t_orphan.png: missing_image" in report.examples["missing_image"]
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sum(sizes.values()) == GOOD


@pytest.mark.usefixtures("ray_local")
def test_strict_fails_on_first_bad_pair_naming_file_and_reason(bad_src: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(PrepError, match=r"t_mismatch\.png: size_mismatch"):
        prepare("folder", str(bad_src), str(tmp_path / "o1"), "train", samples_per_shard=100,
                layout=str(bad_src / "layout.yaml"), strict=True, progress=False)
    rc = step(["prep", "--dataset", "folder", "--src", str(bad_src), "--out", str(tmp_path / "o2"),
               "--layout", str(bad_src / "layout.yaml"), "--strict", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--strict: bad pair" in err and "t_mismatch.png: size_mismatch" in err


@pytest.mark.usefixtures("ray_local")
def test_missing_or_empty_split_folder_is_a_clear_error(bad_src: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(DatasetError, match=r"split 'val' not found .*missing split folder"):
        prepare("folder", str(bad_src), str(tmp_path / "o"), "val",
                layout=str(bad_src / "layout.yaml"), progress=False)
    (bad_src / "img_dir" / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"split 'empty': no images found .*empty split folder"):
        prepare("folder", str(bad_src), str(tmp_path / "o"), "empty",
                layout=str(bad_src / "layout.yaml"), progress=False)
    rc = step(["prep", "--dataset", "cityscapes", "--src", str(tmp_path / "nowhere"),
               "--out", str(tmp_path / "o"), "--split", "val"])
    assert rc == 2 and "leftImg8bit/val" in capsys.readouterr().err


def _sample_bytes(seed: int) -> dict[str, bytes]:
    from PIL import Image

    image, label = fixtures.synthetic_pair(fixtures.RAW_VALUES["folder"], seed=seed)
    out = {}
    for name, arr in (("png", image), ("label.png", np.minimum(label, 2).astype(np.uint8))):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out[name] = buf.getvalue()
    return out


def test_loader_counts_and_skips_truncated_tars_and_corrupt_samples(tmp_path: Path) -> None:
    """Shards written by hand: one whole, one truncated mid-member, one cut at a member
    boundary (tar itself cannot tell; sizes.json can), one with an undecodable image."""
    out = tmp_path / "shards"
    out.mkdir()
    names = [f"train-{i:06d}.tar" for i in range(4)]
    for i, name in enumerate(names):
        buf = io.BytesIO()
        samples = []
        for j in range(3):
            s = {"__key__": f"k{i}{j}", **_sample_bytes(j)}
            if i == 3 and j == 1:
                s["png"] = b"\x89PNG\r\n\x1a\n garbage"
            samples.append(s)
        write_tar(buf, samples)
        data = buf.getvalue()
        if i == 1:
            data = data[: len(data) // 2 + 100]
        if i == 2:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                first = tar.getmembers()[2]  # the 2nd sample's first member
            data = data[: first.offset]
        (out / name).write_bytes(data)
    (out / "sizes.json").write_text(json.dumps({n: 3 for n in names}))
    (out / "dataset.json").write_text(json.dumps(
        {"name": "t", "num_classes": 3, "class_names": ["a", "b", "c"], "ignore_index": 255}))

    loader = build_loader(str(out), batch_size=1, crop_size=None, train=False, num_workers=0,
                          with_keys=True)
    keys = [k for _, _, batch_keys in loader for k in batch_keys]
    assert {"k00", "k01", "k02", "k20", "k30", "k32"} <= set(keys)
    assert "k31" not in keys and "k21" not in keys and "k22" not in keys
    skipped = loader.skipped
    assert skipped["truncated_tar"] == 2  # the mid-member cut and the boundary cut
    assert skipped["corrupt_sample"] == 1


# --------------------------------------------------------------------------- skipped.parquet


def _many_bad_tree(root: Path) -> dict[str, str]:
    """``_bad_tree`` plus more corrupt images and mismatched labels, spread over several
    shards; returns {offending file name: reason} for every bad pair."""
    _bad_tree(root)
    img, ann = root / "img_dir" / "train", root / "ann_dir" / "train"
    image, label = fixtures.synthetic_pair(fixtures.RAW_VALUES["folder"], seed=11)
    for i in range(3):  # more truncated images
        fixtures.save_png(img / f"u_trunc{i}.png", image)
        data = (img / f"u_trunc{i}.png").read_bytes()
        (img / f"u_trunc{i}.png").write_bytes(data[: len(data) // (3 + i)])
        fixtures.save_png(ann / f"u_trunc{i}.png", label)
    for i in range(2):  # more labels of the wrong size
        fixtures.save_png(img / f"u_mismatch{i}.png", image)
        fixtures.save_png(ann / f"u_mismatch{i}.png", label[:, : -8 * (i + 1)])
    fixtures.save_png(img / "u_badlabel.png", image)  # a label that is not a PNG
    (ann / "u_badlabel.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    fixtures.save_png(img / "u_rgblabel.png", image)  # an RGB label
    fixtures.save_png(ann / "u_rgblabel.png", image)
    return {
        "t_truncated.png": "undecodable_image", "t_text.png": "undecodable_image",
        "t_mismatch.png": "size_mismatch", "t_range.png": "label_out_of_range",
        "t_unlabelled.png": "missing_label", "t_orphan.png": "missing_image",
        **{f"u_trunc{i}.png": "undecodable_image" for i in range(3)},
        **{f"u_mismatch{i}.png": "size_mismatch" for i in range(2)},
        "u_badlabel.png": "undecodable_label", "u_rgblabel.png": "label_not_single_channel",
    }


@pytest.fixture(scope="module")
def many_bad(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("many_bad")
    return root, _many_bad_tree(root)


def _skipped_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    assert table.column_names == ["split", "shard", "key", "path", "reason", "detail"]
    return table.to_pylist()


@pytest.mark.usefixtures("ray_local")
def test_every_skipped_pair_is_listed_in_skipped_parquet(many_bad, tmp_path: Path, capsys) -> None:
    src, expected = many_bad
    out = tmp_path / "out"
    rc = step(["prep", "--dataset", "folder", "--src", str(src), "--out", str(out),
               "--layout", str(src / "layout.yaml"), "--samples-per-shard", "3", "--no-progress",
               "--json", str(tmp_path / "report.json")])
    assert rc == 0
    rows = _skipped_rows(out / "skipped.parquet")
    # every bad file, once, with its reason, the pair's key and its shard
    assert {Path(r["path"]).name: r["reason"] for r in rows} == expected
    assert len(rows) == len(expected) == 13
    assert all(r["split"] == "train" and r["key"] == Path(r["path"]).stem for r in rows)
    assert len({r["shard"] for r in rows}) >= 3  # spread over several shards
    sizes = json.loads((out / "sizes.json").read_text())
    assert {r["shard"] for r in rows} <= set(sizes)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert "ann_dir" in by_name["t_mismatch.png"]["path"]  # the label is the offending file
    assert "img_dir" in by_name["t_unlabelled.png"]["path"]  # no label: the image is named
    assert "ann_dir" in by_name["t_orphan.png"]["path"]  # no image: the label is named
    assert "values [5]" in by_name["t_range.png"]["detail"]
    assert "vs image" in by_name["u_mismatch1.png"]["detail"]

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["skipped_total"] == len(rows) == sum(report["skipped"].values())
    assert report["skipped"] == dict(sorted(Counter(expected.values()).items()))
    assert report["skipped_file"] == str(out / "skipped.parquet")
    assert report["written"] == GOOD and report["read"] == GOOD + len(expected)
    stdout = capsys.readouterr().out
    assert "skipped 13 (" in stdout and f"see {out / 'skipped.parquet'}" in stdout


@pytest.mark.usefixtures("ray_local")
def test_resumed_run_neither_loses_nor_duplicates_skipped_entries(many_bad, tmp_path: Path) -> None:
    src, expected = many_bad
    out = tmp_path / "out"

    def run():
        return prepare("folder", str(src), str(out), "train", samples_per_shard=3,
                       layout=str(src / "layout.yaml"), progress=False)

    first = run()
    listed = (out / "skipped.parquet").read_bytes()
    rows = _skipped_rows(out / "skipped.parquet")
    assert first.skipped_total == len(rows) == len(expected)

    # a crash mid-job: two shards holding bad pairs gone (one before its tar's rename, one
    # before its part), the manifest and the skipped list never written
    shards = sorted({r["shard"] for r in rows})
    (out / shards[0]).unlink()
    (out / "_parts" / f"{shards[1]}.parquet").unlink()
    (out / "skipped.parquet").unlink()
    (out / "manifest.parquet").unlink()
    again = run()
    assert again.shards_written == 2 and again.shards_reused == len(first.shards) - 2
    assert (out / "skipped.parquet").read_bytes() == listed
    assert (again.skipped, again.skipped_total, again.examples) == \
        (first.skipped, first.skipped_total, first.examples)

    # a rerun that keeps every shard still lists the skipped pairs of all of them
    kept = run()
    assert kept.shards_written == 0 and kept.skipped_total == len(expected)
    assert (out / "skipped.parquet").read_bytes() == listed


@pytest.mark.usefixtures("ray_local")
def test_skipped_parquet_is_written_next_to_an_s3_manifest(
    s3_bucket: str, s3_endpoint: str, tmp_path: Path
) -> None:
    import boto3
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    _bad_tree(src)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    out = f"s3://{s3_bucket}/shards"
    report = prepare("folder", str(src), out, "train", samples_per_shard=4,
                     layout=str(src / "layout.yaml"), progress=False)
    assert report.skipped_file == f"{out}/skipped.parquet"
    body = s3.get_object(Bucket=s3_bucket, Key="shards/skipped.parquet")["Body"].read()
    rows = pq.read_table(io.BytesIO(body)).to_pylist()
    assert report.skipped_total == len(rows) == 6
    assert {Path(r["path"]).name for r in rows} == {
        "t_truncated.png", "t_text.png", "t_mismatch.png", "t_range.png", "t_unlabelled.png",
        "t_orphan.png"}
