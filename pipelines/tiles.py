"""Cut a flat ``img_dir`` + ``ann_dir`` dataset into square tiles, split into train / val.

Used by the pipeline's ``prepare`` step when ``data.tile`` is set, to turn the three real
1024 x 1024 LoveDA fixtures into a demo-sized dataset (48 tiles of 256 x 256) in the
MMSegmentation layout (``img_dir/<split>/``, ``ann_dir/<split>/``) that every
``data_prep`` reader of that layout accepts. Label values are copied untouched (no
resampling), so the dataset's own label conversion still applies in ``step prep``.
Tiles do not overlap, so no validation pixel is ever seen in training; see
:func:`tile_dataset` for the two ways of assigning tiles to splits.
"""

from __future__ import annotations

from pathlib import Path

from data_prep import storage as files

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _pairs(src: str) -> list[tuple[str, str, str]]:
    images = sorted(n for n in files.list_files(files.join(src, "img_dir"))
                    if n.lower().endswith(IMAGE_SUFFIXES) and "/" not in n)
    labels = set(files.list_files(files.join(src, "ann_dir")))
    out = []
    for name in images:
        stem = name.rsplit(".", 1)[0]
        label = next((c for c in (f"{stem}.png", name) if c in labels), None)
        if label is None:
            raise FileNotFoundError(f"{src}/ann_dir: no label for img_dir/{name}")
        out.append((stem, files.join(src, "img_dir", name), files.join(src, "ann_dir", label)))
    if not out:
        raise FileNotFoundError(f"{src}/img_dir: no images to tile")
    return out


def tile_dataset(src: str, out: str | Path, size: int, val_images: int = 1,
                 train_split: str = "train", val_split: str = "val",
                 val: str = "checkerboard") -> dict[str, int]:
    """Write tiles under ``out`` (local); returns tiles per split. Idempotent.

    ``val="checkerboard"``: tile (row, col) goes to val when row + col is odd, so every
    image gives half its tiles to each split; ``val="images"``: the last ``val_images``
    source images (name order) go to val whole.
    """
    import io

    import numpy as np
    from PIL import Image

    pairs = _pairs(src)
    if val == "images" and val_images >= len(pairs):
        raise ValueError(f"tile.val_images={val_images} leaves no training image "
                         f"({len(pairs)} source images in {src})")
    out = Path(out)
    counts = {train_split: 0, val_split: 0}
    for i, (stem, img_uri, ann_uri) in enumerate(pairs):
        held_out = val == "images" and i >= len(pairs) - val_images
        image = Image.open(io.BytesIO(files.read_bytes(img_uri)))
        label = Image.open(io.BytesIO(files.read_bytes(ann_uri)))
        if image.size != label.size:
            raise ValueError(f"{img_uri}: image {image.size} and label {label.size} differ")
        lab = np.array(label)  # palette / L / I;16 keep their raw values
        w, h = image.size
        for y in range(0, h - size + 1, size):
            for x in range(0, w - size + 1, size):
                if val == "checkerboard":
                    split = val_split if (y // size + x // size) % 2 else train_split
                else:
                    split = val_split if held_out else train_split
                name = f"{stem}_{y:05d}_{x:05d}.png"
                img_path = out / "img_dir" / split / name
                ann_path = out / "ann_dir" / split / name
                counts[split] += 1
                if img_path.is_file() and ann_path.is_file():
                    continue
                img_path.parent.mkdir(parents=True, exist_ok=True)
                ann_path.parent.mkdir(parents=True, exist_ok=True)
                image.convert("RGB").crop((x, y, x + size, y + size)).save(img_path)
                Image.fromarray(lab[y:y + size, x:x + size]).save(ann_path)
    return counts
