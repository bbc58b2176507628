"""Bad input: each bad pair is skipped and counted with its reason; --strict fails naming it."""

from __future__ import annotations

import io
import json
import tarfile
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
    # an image without a label
    fixtures.save_png(img / "t_unlabelled.png", image)
    return root


@pytest.fixture(scope="module")
def bad_src(tmp_path_factory) -> Path:
    return _bad_tree(tmp_path_factory.mktemp("bad_src"))


@pytest.mark.usefixtures("ray_local")
def test_bad_pairs_are_skipped_and_counted_by_reason(bad_src: Path, tmp_path: Path) -> None:
    report = prepare("folder", str(bad_src), str(tmp_path / "out"), "train", samples_per_shard=2,
                     layout=str(bad_src / "layout.yaml"), progress=False)
    assert report.read == GOOD + 5 and report.written == GOOD
    assert report.skipped == {
        "label_out_of_range": 1, "missing_label": 1, "size_mismatch": 1,
        "undecodable_image": 2,  # the truncated PNG and the text file
    }
    assert "t_range.png" in report.examples["label_out_of_range"]
    assert "values [5]" in report.examples["label_out_of_range"]
    assert "t_mismatch.png" in report.examples["size_mismatch"]
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
