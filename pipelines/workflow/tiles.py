"""Cut a dataset's images into square tiles, split into train / val.

Used by the pipeline's ``prepare`` step when ``data.tile`` is set, to turn the three real
1024 x 1024 LoveDA fixtures into a demo-sized dataset (48 tiles of 256 x 256) in the
MMSegmentation layout (``img_dir/<split>/``, ``ann_dir/<split>/``) that every
``data_prep`` reader of that layout accepts. Label values are copied untouched (no
resampling), so the dataset's own label conversion still applies in ``step prep``.
Tiles do not overlap, so no validation pixel is ever seen in training; see
:func:`tile_dataset` for the two ways of assigning tiles to splits.

Tiles are written under the pipeline's storage (local or ``s3://``), never in a folder of
the driver: on a multi-node cluster the Ray Data tasks of ``step prep`` run on other nodes
and must be able to read them.
"""

from __future__ import annotations

from data_prep import storage as files
from pipelines.common.errors import InvalidInput


def _pairs(dataset: str, src: str, split: str, layout: str | None) -> list[tuple[str, str, str]]:
    """(tile name stem, image URI, label URI) of ``split`` as the dataset's reader finds it:
    official layouts, the MMSegmentation one, or a flat ``img_dir`` + ``ann_dir``."""
    from data_prep.readers import read_pairs

    _, pairs = read_pairs(dataset, src, split, layout)
    incomplete = [p.image or p.label for p in pairs if not (p.image and p.label)]
    if incomplete:  # a tile needs both; `step prep` without tiling skips and counts them
        raise InvalidInput(f"tiling {src}: {len(incomplete)} image(s) or label(s) without "
                         f"their other half, e.g. {incomplete[0]}")
    return [(p.key.replace("/", "_"), p.image, p.label) for p in pairs]


def _png(array) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def tile_dataset(src: str, out: str, size: int, val_images: int = 1,
                 train_split: str = "train", val_split: str = "val",
                 val: str = "checkerboard", *, dataset: str = "loveda",
                 layout: str | None = None) -> dict[str, int]:
    """Write tiles under ``out`` (local or ``s3://``); returns tiles per split. Idempotent:
    tiles already there (one listing, not a request per tile) are not written again.

    ``val="checkerboard"``: tile (row, col) goes to val when row + col is odd, so every
    image gives half its tiles to each split; ``val="images"``: the last ``val_images``
    source images (name order) go to val whole. The source images are those of
    ``train_split`` of ``dataset`` under ``src`` (a flat folder counts as that split).
    """
    import io

    import numpy as np
    from PIL import Image

    pairs = _pairs(dataset, src, train_split, layout)
    if val == "images" and val_images >= len(pairs):
        raise InvalidInput(f"tile.val_images={val_images} leaves no training image "
                         f"({len(pairs)} source images in {src})")
    out = str(out)
    present = set(files.list_files(out))
    counts = {train_split: 0, val_split: 0}
    for i, (stem, img_uri, ann_uri) in enumerate(pairs):
        held_out = val == "images" and i >= len(pairs) - val_images
        image = Image.open(io.BytesIO(files.read_bytes(img_uri)))
        label = Image.open(io.BytesIO(files.read_bytes(ann_uri)))
        if image.size != label.size:
            raise InvalidInput(f"{img_uri}: image {image.size} and label {label.size} differ")
        lab = np.array(label)  # palette / L / I;16 keep their raw values
        rgb = np.asarray(image.convert("RGB"))
        w, h = image.size
        for y in range(0, h - size + 1, size):
            for x in range(0, w - size + 1, size):
                if val == "checkerboard":
                    split = val_split if (y // size + x // size) % 2 else train_split
                else:
                    split = val_split if held_out else train_split
                name = f"{stem}_{y:05d}_{x:05d}.png"
                img_rel, ann_rel = f"img_dir/{split}/{name}", f"ann_dir/{split}/{name}"
                counts[split] += 1
                if img_rel in present and ann_rel in present:
                    continue
                # label first: a crash between the two leaves an image-less label, which
                # the check above does not take for a finished tile
                files.write_bytes(files.join(out, ann_rel), _png(lab[y:y + size, x:x + size]))
                files.write_bytes(files.join(out, img_rel), _png(rgb[y:y + size, x:x + size]))
    return counts
