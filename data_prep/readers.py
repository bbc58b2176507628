"""Dataset readers: find (image, label) pairs in each dataset's official layout.

A reader returns a :class:`DatasetSpec` (class names and the lookup table that turns raw
label values into contiguous train ids, 255 = ignore) and the sorted list of
:class:`Pair` s of one split. Readers only list files; decoding and validation happen in
the sharding job (:mod:`data_prep.samples`), in parallel.

Layouts (``src`` may be a local path or ``s3://bucket/prefix``):

- ``ade20k``: ``[ADEChallengeData2016/]images/{training,validation}/*.jpg`` +
  ``annotations/<same>/*.png``; 0 = ignore, 1..150 -> 0..149.
- ``cityscapes``: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` +
  ``gtFine/<split>/<city>/*_gtFine_labelIds.png``; labelIds -> 19 train ids with the table
  of ``cityscapesscripts.helpers.labels``.
- ``coco_stuff``: images in ``images/<split>2017`` or ``<split>2017``, labels
  (``stuffthingmaps``: COCO id - 1, 255 = unlabeled) in
  ``stuffthingmaps_trainval2017/<split>2017``, ``stuffthingmaps/<split>2017`` or
  ``annotations/<split>2017``; the 182 ids -> 171 contiguous classes.
- ``loveda``: official ``Train|Val/{Urban,Rural}/{images_png,masks_png}``, the
  MMSegmentation layout ``img_dir/<split>`` + ``ann_dir/<split>``, or a flat ``img_dir`` +
  ``ann_dir`` holding one split; 0 = no-data (ignore), 1..7 -> 0..6.
- ``folder``: any dataset, described by a YAML file (``--layout``), see :class:`FolderLayout`.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from data_prep import classes, storage
from data_prep.conventions import IGNORE_INDEX, IMAGE_SUFFIXES, JPEG_OR_PNG_SUFFIXES
from data_prep.errors import DatasetError


@dataclass(frozen=True)
class Pair:
    """One sample's source files; ``key`` is stable across runs and unique in the split."""

    key: str
    image: str
    label: str
    nbytes: int = 0  # image + label source bytes, to plan ``--shard-size``


@dataclass(frozen=True)
class DatasetSpec:
    """Class names and the raw-label -> train-id table (-1 marks values that are invalid)."""

    name: str
    class_names: tuple[str, ...]
    lut: np.ndarray = field(repr=False, compare=False)  # int16, 65536 entries

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def make_lut(mapping: dict[int, int]) -> np.ndarray:
    lut = np.full(65536, -1, dtype=np.int16)
    for raw, train in mapping.items():
        lut[raw] = train
    return lut


# --------------------------------------------------------------------------- helpers


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _stem(name: str) -> str:
    base = posixpath.basename(name)
    return base[: base.rfind(".")] if "." in base else base


def _sample_key(rel_stem: str) -> str:
    # webdataset splits a member name at the first dot of its basename: keys carry none.
    return rel_stem.replace(".", "_")


class _Tree:
    """The recursive listing of ``src``, fetched once (one S3 LIST walk, not one per folder)."""

    def __init__(self, src: str):
        self.src = str(src).rstrip("/") if storage.is_s3(src) else str(src)
        self.files = storage.list_files(self.src)

    def uri(self, rel: str) -> str:
        return storage.join(self.src, *rel.split("/"))

    def under(self, folder: str) -> dict[str, int]:
        """Files below ``folder`` (relative to ``src``) as {path relative to folder: size}."""
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        return {k[len(prefix):]: v for k, v in self.files.items() if k.startswith(prefix)}

    def is_dir(self, folder: str) -> bool:
        if not storage.is_s3(self.src) and Path(self.src, folder).is_dir():
            return True  # an empty local folder exists (S3 has no empty "folders")
        return bool(self.under(folder))


def _pair_folders(
    tree: _Tree,
    img_dir: str,
    ann_dir: str,
    *,
    img_suffix: str | tuple[str, ...] = IMAGE_SUFFIXES,
    ann_suffix: str = ".png",
    img_tail: str = "",
    ann_tail: str = "",
    key_prefix: str = "",
    recursive: bool = True,
) -> list[Pair]:
    """Pair ``img_dir/<rel>/<stem><img_tail><img_suffix>`` with ``ann_dir/<rel>/<stem><ann_tail><ann_suffix>``.

    An image without a label still becomes a pair (label ``""``) so the job counts it as
    ``missing_label`` instead of dropping it silently; a label without an image, likewise,
    becomes a pair with image ``""``, counted as ``missing_image``.
    """
    suffixes = (img_suffix,) if isinstance(img_suffix, str) else img_suffix
    images = tree.under(img_dir)
    labels = tree.under(ann_dir)
    pairs = []
    paired: set[str] = set()
    for rel, size in images.items():
        if not recursive and "/" in rel:
            continue
        low = rel.lower()
        suffix = next((s for s in suffixes if low.endswith(s.lower())), None)
        if suffix is None:
            continue
        stem = rel[: len(rel) - len(suffix)]
        if img_tail:
            if not stem.endswith(img_tail):
                continue
            stem = stem[: len(stem) - len(img_tail)]
        label_rel = stem + ann_tail + ann_suffix
        label_size = labels.get(label_rel)
        paired.add(label_rel)
        pairs.append(
            Pair(
                key=_sample_key(key_prefix + stem),
                image=tree.uri(posixpath.join(img_dir, rel)),
                label="" if label_size is None else tree.uri(posixpath.join(ann_dir, label_rel)),
                nbytes=size + (label_size or 0),
            )
        )
    label_end = ann_tail + ann_suffix
    for rel, size in labels.items():
        if rel in paired or not rel.endswith(label_end) or (not recursive and "/" in rel):
            continue
        if img_dir == ann_dir and rel in images:
            continue  # one folder for both: this file was read as an image above
        stem = rel[: len(rel) - len(label_end)]
        pairs.append(Pair(key=_sample_key(key_prefix + stem), image="",
                          label=tree.uri(posixpath.join(ann_dir, rel)), nbytes=size))
    return pairs


def _check_split(pairs: list[Pair], where: str, split: str) -> list[Pair]:
    if not any(p.image for p in pairs):  # labels alone are no split either
        raise DatasetError(f"split {split!r}: no images found in {where} (empty split folder)")
    keys = [p.key for p in pairs]
    if len(set(keys)) != len(keys):
        raise DatasetError(f"split {split!r}: duplicate sample keys in {where}")
    return sorted(pairs, key=lambda p: p.key)


def _missing(src: str, split: str, looked: list[str]) -> DatasetError:
    return DatasetError(
        f"split {split!r} not found under {src}: looked for "
        + ", ".join(repr(x) for x in looked)
        + " (missing split folder)"
    )


def _split_folder(tree: _Tree, root: str, split: str) -> str | None:
    """``root/<split>`` when it exists, else ``root`` itself when it holds images directly."""
    nested = posixpath.join(root, split) if root else split
    if tree.is_dir(nested):
        return nested
    if any("/" not in rel and _is_image(rel) for rel in tree.under(root)):
        return root
    return None


# --------------------------------------------------------------------------- readers


def read_ade20k(src: str, split: str, layout: str | None = None) -> tuple[DatasetSpec, list[Pair]]:
    tree = _Tree(src)
    folder = {"train": "training", "val": "validation"}.get(split, split)
    base = "ADEChallengeData2016/" if tree.is_dir("ADEChallengeData2016") else ""
    img_dir, ann_dir = f"{base}images/{folder}", f"{base}annotations/{folder}"
    if not tree.is_dir(img_dir):
        raise _missing(tree.src, split, [img_dir])
    pairs = _pair_folders(tree, img_dir, ann_dir, img_suffix=JPEG_OR_PNG_SUFFIXES)
    lut = make_lut({0: IGNORE_INDEX, **{i: i - 1 for i in range(1, 151)}})
    return DatasetSpec("ade20k", classes.ADE20K, lut), _check_split(pairs, img_dir, split)


def cityscapes_lut() -> tuple[tuple[str, ...], np.ndarray]:
    """Names of the 19 train ids and the labelId -> trainId table, from cityscapesscripts."""
    from cityscapesscripts.helpers.labels import labels

    names = [""] * 19
    mapping = {}
    for label in labels:
        if label.id < 0:  # 'license plate' (-1) never appears in labelIds images
            continue
        train = label.trainId if 0 <= label.trainId < 19 else IGNORE_INDEX
        mapping[label.id] = train
        if train != IGNORE_INDEX:
            names[train] = label.name
    assert all(names), "cityscapesscripts label table changed: a train id has no name"
    return tuple(names), make_lut(mapping)


def read_cityscapes(src: str, split: str, layout: str | None = None) -> tuple[DatasetSpec, list[Pair]]:
    tree = _Tree(src)
    img_dir, ann_dir = f"leftImg8bit/{split}", f"gtFine/{split}"
    if not tree.is_dir(img_dir):
        raise _missing(tree.src, split, [img_dir])
    pairs = _pair_folders(
        tree, img_dir, ann_dir,
        img_suffix=".png", img_tail="_leftImg8bit", ann_tail="_gtFine_labelIds",
    )
    names, lut = cityscapes_lut()
    return DatasetSpec("cityscapes", names, lut), _check_split(pairs, img_dir, split)


def read_coco_stuff(src: str, split: str, layout: str | None = None) -> tuple[DatasetSpec, list[Pair]]:
    tree = _Tree(src)
    folder = split if split.endswith("2017") else f"{split}2017"
    img_dirs = [f"images/{folder}", folder]
    ann_dirs = [f"stuffthingmaps_trainval2017/{folder}", f"stuffthingmaps/{folder}",
                f"annotations/{folder}"]
    img_dir = next((d for d in img_dirs if tree.is_dir(d)), None)
    ann_dir = next((d for d in ann_dirs if tree.is_dir(d)), None)
    if img_dir is None:
        raise _missing(tree.src, split, img_dirs)
    if ann_dir is None:
        raise _missing(tree.src, split, ann_dirs)
    pairs = _pair_folders(tree, img_dir, ann_dir, img_suffix=JPEG_OR_PNG_SUFFIXES)
    used = [i for i in range(182) if i not in classes.COCO_UNUSED_IDS]
    # The eleven never-annotated ids should not occur; if a map holds one anyway, it is
    # ignored (as the benchmark's own conversion does) rather than rejected.
    mapping = {i: IGNORE_INDEX for i in classes.COCO_UNUSED_IDS}
    mapping.update({raw: train for train, raw in enumerate(used)})
    mapping[255] = IGNORE_INDEX
    spec = DatasetSpec("coco_stuff", classes.COCO_STUFF, make_lut(mapping))
    return spec, _check_split(pairs, img_dir, split)


def read_loveda(src: str, split: str, layout: str | None = None) -> tuple[DatasetSpec, list[Pair]]:
    tree = _Tree(src)
    lut = make_lut({0: IGNORE_INDEX, **{i: i - 1 for i in range(1, 8)}})
    spec = DatasetSpec("loveda", classes.LOVEDA, lut)
    official = split.capitalize()  # Train / Val / Test
    if tree.is_dir(official):
        pairs = []
        for scene in ("Rural", "Urban"):
            pairs += _pair_folders(
                tree, f"{official}/{scene}/images_png", f"{official}/{scene}/masks_png",
                img_suffix=".png", key_prefix=f"{scene}/",
            )
        return spec, _check_split(pairs, official, split)
    img_dir = _split_folder(tree, "img_dir", split)
    if img_dir is None:
        raise _missing(tree.src, split, [official, f"img_dir/{split}", "img_dir/*.png"])
    ann_dir = "ann_dir" + img_dir[len("img_dir"):]
    pairs = _pair_folders(tree, img_dir, ann_dir, img_suffix=".png",
                          recursive=img_dir != "img_dir")
    return spec, _check_split(pairs, img_dir, split)


class FolderLayout(BaseModel):
    """The generic layout's YAML file (``step prep --dataset folder --layout FILE.yaml``).

    Example::

        name: potsdam
        img_dir: img_dir          # relative to --src; "{split}" is replaced by --split;
        ann_dir: ann_dir          # without it, <dir>/<split> is used when it exists, else <dir>
        img_suffix: .png
        ann_suffix: .png
        class_names: [impervious_surface, building, low_vegetation, tree, car, clutter]
        ignore_index: 255         # raw label value meaning "ignore" (null: none)
        reduce_zero_label: false  # true: raw 0 = ignore and raw v = class v - 1
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "folder"
    img_dir: str = "img_dir"
    ann_dir: str = "ann_dir"
    img_suffix: str = ".png"
    ann_suffix: str = ".png"
    class_names: list[str]
    ignore_index: int | None = 255
    reduce_zero_label: bool = False

    @model_validator(mode="after")
    def _check(self) -> FolderLayout:
        n = len(self.class_names)
        if not 1 <= n <= 255:
            raise ValueError(f"class_names: {n} classes; 1..255 fit the uint8 label maps")
        if self.ignore_index is not None and not 0 <= self.ignore_index < 65536:
            raise ValueError(f"ignore_index: {self.ignore_index} is not a 16-bit label value")
        if self.ignore_index is not None and not self.reduce_zero_label and self.ignore_index < n:
            raise ValueError(f"ignore_index: {self.ignore_index} is also a class id (0..{n - 1})")
        return self

    def lut(self) -> np.ndarray:
        n = len(self.class_names)
        if self.reduce_zero_label:
            mapping = {0: IGNORE_INDEX, **{v: v - 1 for v in range(1, n + 1)}}
        else:
            mapping = {v: v for v in range(n)}
        if self.ignore_index is not None:
            mapping[self.ignore_index] = IGNORE_INDEX
        return make_lut(mapping)


def load_layout(path: str) -> FolderLayout:
    try:
        data = yaml.safe_load(storage.read_bytes(path)) or {}
    except FileNotFoundError:
        raise DatasetError(f"--layout {path}: file not found") from None
    except yaml.YAMLError as err:
        raise DatasetError(f"--layout {path}: not valid YAML ({err})") from None
    try:
        return FolderLayout.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: "
            + ("unknown key" if e["type"] == "extra_forbidden" else e["msg"])
            for e in err.errors()
        )
        raise DatasetError(f"--layout {path}: {problems}") from None


def read_folder(src: str, split: str, layout: str | None = None) -> tuple[DatasetSpec, list[Pair]]:
    if not layout:
        raise DatasetError("--dataset folder needs --layout FILE.yaml (see data_prep.readers.FolderLayout)")
    cfg = load_layout(layout)
    tree = _Tree(src)
    if "{split}" in cfg.img_dir:
        img_dir = cfg.img_dir.format(split=split)
        ann_dir = cfg.ann_dir.format(split=split)
        if not tree.is_dir(img_dir):
            raise _missing(tree.src, split, [img_dir])
    else:
        img_dir = _split_folder(tree, cfg.img_dir, split)
        if img_dir is None:
            raise _missing(tree.src, split, [f"{cfg.img_dir}/{split}", f"{cfg.img_dir}/*{cfg.img_suffix}"])
        ann_dir = cfg.ann_dir + img_dir[len(cfg.img_dir):]
    pairs = _pair_folders(tree, img_dir, ann_dir, img_suffix=cfg.img_suffix,
                          ann_suffix=cfg.ann_suffix, recursive=img_dir != cfg.img_dir)
    spec = DatasetSpec(cfg.name, tuple(cfg.class_names), cfg.lut())
    return spec, _check_split(pairs, img_dir, split)


Reader = Callable[[str, str, "str | None"], tuple[DatasetSpec, list[Pair]]]

READERS: dict[str, Reader] = {
    "ade20k": read_ade20k,
    "cityscapes": read_cityscapes,
    "coco_stuff": read_coco_stuff,
    "loveda": read_loveda,
    "folder": read_folder,
}


def read_pairs(dataset: str, src: str, split: str, layout: str | None = None) -> tuple[DatasetSpec, list[Pair]]:
    """The spec and sorted pairs of ``split`` of ``dataset`` under ``src``."""
    try:
        reader = READERS[dataset]
    except KeyError:
        raise DatasetError(f"--dataset {dataset!r}: unknown; choose from {sorted(READERS)}") from None
    return reader(str(src), split, layout)
