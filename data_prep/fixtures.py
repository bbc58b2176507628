"""Tiny datasets in the official layouts, for tests and ``step bench data``.

Synthetic pairs are blocky label maps whose image colour is a function of the class, so a
test can check that image and label stay aligned through conversion and augmentation.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

# raw label values each layout uses, and what they must become (train ids, 255 = ignore)
RAW_VALUES = {
    "ade20k": {0: 255, 1: 0, 2: 1, 150: 149},
    "cityscapes": {7: 0, 8: 1, 26: 13, 0: 255, 4: 255},  # road, sidewalk, car, unlabeled, static
    "coco_stuff": {0: 0, 12: 11, 181: 170, 255: 255},  # person, stop sign (after unused id 11), wood
    "loveda": {0: 255, 1: 0, 7: 6},
    "folder": {0: 0, 1: 1, 2: 2, 9: 255},  # with FOLDER_LAYOUT below
}
FOLDER_LAYOUT = "name: tiny\nclass_names: [a, b, c]\nignore_index: 9\n"


def class_colour(train_id: int) -> tuple[int, int, int]:
    """A distinct, exactly representable colour per train id (255 = ignore -> black)."""
    if train_id == 255:
        return (0, 0, 0)
    return ((37 * train_id + 40) % 256, (91 * train_id + 80) % 256, (53 * train_id + 120) % 256)


def synthetic_pair(
    raw_to_train: dict[int, int], size: tuple[int, int] = (48, 64), block: int = 8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image (h,w,3), raw label (h,w)) made of ``block``-pixel squares."""
    h, w = size
    rng = np.random.default_rng(seed)
    raws = np.array(sorted(raw_to_train))
    grid = rng.choice(raws, size=(-(-h // block), -(-w // block)))
    label = np.kron(grid, np.ones((block, block), dtype=grid.dtype))[:h, :w]
    image = np.zeros((h, w, 3), dtype=np.uint8)
    for raw, train in raw_to_train.items():
        image[label == raw] = class_colour(train)
    dtype = np.uint16 if label.max() > 255 else np.uint8
    return image, label.astype(dtype)


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def save_jpg(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="JPEG", quality=98)


def make_tree(dataset: str, root: Path, split: str = "train", n: int = 3,
              size: tuple[int, int] = (48, 64)) -> list[str]:
    """Write ``n`` synthetic pairs of ``split`` in ``dataset``'s official layout.

    Returns the sample keys in creation order: pair ``i`` is ``synthetic_pair(..., seed=i)``.
    """
    root = Path(root)
    keys = []
    for i in range(n):
        image, label = synthetic_pair(RAW_VALUES[dataset], size, seed=i)
        stem = f"s{i:03d}"
        if dataset == "ade20k":
            folder = {"train": "training", "val": "validation"}[split]
            base = root / "ADEChallengeData2016"
            save_jpg(base / "images" / folder / f"ADE_{stem}.jpg", image)
            save_png(base / "annotations" / folder / f"ADE_{stem}.png", label)
            keys.append(f"ADE_{stem}")
        elif dataset == "cityscapes":
            city = "aachen" if i % 2 else "bremen"
            name = f"{city}_{i:06d}_000019"
            save_png(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", image)
            save_png(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", label)
            keys.append(f"{city}/{name}")
        elif dataset == "coco_stuff":
            name = f"{i:012d}"
            save_jpg(root / "images" / f"{split}2017" / f"{name}.jpg", image)
            save_png(root / "stuffthingmaps_trainval2017" / f"{split}2017" / f"{name}.png", label)
            keys.append(name)
        elif dataset == "loveda":
            scene = "Urban" if i % 2 else "Rural"
            base = root / split.capitalize() / scene
            save_png(base / "images_png" / f"{i}.png", image)
            save_png(base / "masks_png" / f"{i}.png", label)
            keys.append(f"{scene}/{i}")
        elif dataset == "folder":
            save_png(root / "img_dir" / split / f"{stem}.png", image)
            save_png(root / "ann_dir" / split / f"{stem}.png", label)
            keys.append(stem)
        else:
            raise ValueError(dataset)
    if dataset == "folder":
        (root / "layout.yaml").write_text(FOLDER_LAYOUT)
    return keys


def replicate_flat(src: Path, dst: Path, n: int) -> Path:
    """Copy a flat ``img_dir``/``ann_dir`` dataset (e.g. the LoveDA fixtures) to ``n`` pairs."""
    src, dst = Path(src), Path(dst)
    names = sorted(p.name for p in (src / "img_dir").iterdir())
    for sub in ("img_dir", "ann_dir"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = names[i % len(names)]
        stem = f"{i:04d}_{Path(name).stem}"
        for sub in ("img_dir", "ann_dir"):
            shutil.copyfile(src / sub / name, dst / sub / f"{stem}{Path(name).suffix}")
    return dst
