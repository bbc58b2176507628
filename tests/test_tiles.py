"""The pipeline's tile staging (``data.tile``): from any layout the dataset's reader knows,
to the pipeline's storage, S3 included (Ray Data tasks on other nodes read the tiles)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from data_prep import storage as files
from pipelines.workflow.tiles import tile_dataset

from helpers import LOVEDA


def upload_official_loveda(bucket: str, prefix: str = "raw") -> str:
    """The three LoveDA scenes in LoveDA's official layout on S3: two urban, one rural."""
    names = sorted(p.name for p in (LOVEDA / "img_dir").glob("*.png"))
    for i, name in enumerate(names):
        scene = "Rural" if i == len(names) - 1 else "Urban"
        for sub, folder in (("img_dir", "images_png"), ("ann_dir", "masks_png")):
            files.write_bytes(f"s3://{bucket}/{prefix}/Train/{scene}/{folder}/{name}",
                              (LOVEDA / sub / name).read_bytes())
    return f"s3://{bucket}/{prefix}"


def test_tiles_from_official_layout_are_staged_on_s3(s3_bucket, ray_local, tmp_path) -> None:
    from data_prep.prep import prepare

    src = upload_official_loveda(s3_bucket)
    out = f"s3://{s3_bucket}/pipeline/data/abc/tiles"
    counts = tile_dataset(src, out, 256, val="checkerboard", dataset="loveda")
    listed = files.list_files(out)
    # 3 scenes of 1024 x 1024 -> 16 tiles each, half of each scene to val (checkerboard)
    assert counts == {"train": 24, "val": 24}
    assert len(listed) == 2 * 48
    assert sum(k.startswith("img_dir/val/") for k in listed) == 24

    # a tile holds the source pixels (labels untouched, no resampling)
    name = sorted(p.name for p in (LOVEDA / "img_dir").glob("*.png"))[0]
    tile_name = next(k for k in listed if k.startswith("ann_dir/val/Urban")
                     and k.endswith(f"{name[:-4]}_00000_00256.png"))
    tile = np.array(Image.open(io.BytesIO(files.read_bytes(f"{out}/{tile_name}"))))
    source = np.array(Image.open(LOVEDA / "ann_dir" / name))
    np.testing.assert_array_equal(tile, source[0:256, 256:512])

    # idempotent: a rerun writes nothing
    writes: list[str] = []
    real_write = files.write_bytes
    files.write_bytes = lambda uri, data: writes.append(uri) or real_write(uri, data)
    try:
        assert tile_dataset(src, out, 256, val="checkerboard", dataset="loveda") == counts
    finally:
        files.write_bytes = real_write
    assert writes == []

    # prep's Ray Data tasks read them from S3, as a worker node of a cluster does
    report = prepare("loveda", out, str(tmp_path / "val"), split="val", progress=False)
    assert report.written == 24


def test_flat_folder_tiles_locally(tmp_path) -> None:
    counts = tile_dataset(str(LOVEDA), str(tmp_path / "tiles"), 512, val="images",
                          val_images=1, dataset="loveda")
    assert counts == {"train": 8, "val": 4}
    assert len(list((tmp_path / "tiles" / "img_dir" / "val").glob("*.png"))) == 4
