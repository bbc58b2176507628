"""Decode, validate and convert one (image, label) pair into the bytes a shard stores.

A pair is good when both files decode completely, have the same size, and every label value
maps to a train id or the ignore index. A bad pair raises :class:`BadSample` carrying one
of :data:`REASONS` and the offending file, so the job can count it (or, with ``--strict``,
stop with that message).

What is stored: the image's original bytes when it is already an RGB PNG/JPEG and no
resize is asked (no re-encoding: faster, and no generation loss), else a re-encoded image
(PNG stays PNG, anything else becomes JPEG q95); the label always as a single-channel
uint8 PNG of train ids (255 = ignore). PIL's encoders are deterministic for fixed
settings, which keeps shards byte-identical across runs.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from data_prep import storage
from data_prep.conventions import IGNORE_INDEX, SHARD_LABEL_EXT
from data_prep.readers import DatasetSpec, Pair

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half an image
Image.MAX_IMAGE_PIXELS = 1 << 30  # remote-sensing tiles are legitimately huge

REASONS = (
    "missing_label",
    "missing_image",
    "unreadable_file",
    "undecodable_image",
    "undecodable_label",
    "label_not_single_channel",
    "size_mismatch",
    "label_out_of_range",
)


class BadSample(Exception):
    """A pair that fails validation; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, file: str, detail: str = ""):
        assert reason in REASONS, reason
        self.reason, self.file, self.detail = reason, file, detail
        super().__init__(f"{file}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # keep the fields when Ray ships the error between processes
        return BadSample, (self.reason, self.file, self.detail)


@dataclass
class Sample:
    key: str
    image: bytes
    image_ext: str  # one of SHARD_IMAGE_EXTS: "png" | "jpg"
    label: bytes  # PNG, mode L, train ids
    height: int
    width: int
    class_pixels: list[int]  # pixels per train id
    ignore_pixels: int

    def members(self) -> dict[str, bytes]:
        """The files of this sample inside a shard: ``<key>.<ext>`` and ``<key>.label.png``."""
        return {self.image_ext: self.image, SHARD_LABEL_EXT: self.label}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except OSError as err:
        raise BadSample("unreadable_file", uri, type(err).__name__) from None


_BUFFER_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _decode(data: bytes, uri: str, reason: str) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
        im.load()  # decode fully now: truncation shows up here, not in the loader
        return im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        # PIL names the in-memory buffer with its address: drop it, so that the detail (kept
        # in skipped.parquet) is the same on every run
        detail = _BUFFER_REPR.sub("", str(err)).strip()
        raise BadSample(reason, uri, detail or type(err).__name__) from None


def label_to_train_ids(label: np.ndarray, spec: DatasetSpec, uri: str = "<label>") -> np.ndarray:
    """Raw label values -> uint8 train ids (255 = ignore); out-of-table values raise."""
    if label.ndim != 2:
        raise BadSample("label_not_single_channel", uri, f"shape {label.shape}")
    if label.dtype.kind not in "ui" or (label.size and (label.min() < 0 or label.max() > 65535)):
        raise BadSample("label_out_of_range", uri, f"values outside 0..65535 ({label.dtype})")
    train = spec.lut[label.astype(np.int64, copy=False) if label.dtype.kind == "i" else label]
    if (train < 0).any():
        bad = np.unique(label[train < 0])[:8].tolist()
        raise BadSample(
            "label_out_of_range", uri,
            f"values {bad} are neither classes of {spec.name} ({spec.num_classes}) nor ignore",
        )
    return train.astype(np.uint8)


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=6)
    else:
        im.save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def convert_pair(pair: Pair, spec: DatasetSpec, max_side: int | None = None) -> Sample:
    """Validate ``pair`` and return what its shard stores; raises :class:`BadSample`."""
    if not pair.label:
        raise BadSample("missing_label", pair.image, "no label file with the same name")
    if not pair.image:
        raise BadSample("missing_image", pair.label, "no image file with the same name")
    image_bytes = _read(pair.image)
    label_bytes = _read(pair.label)
    image = _decode(image_bytes, pair.image, "undecodable_image")
    label = _decode(label_bytes, pair.label, "undecodable_label")
    if image.size != label.size:
        raise BadSample(
            "size_mismatch", pair.label,
            f"label {label.size[0]}x{label.size[1]} vs image {image.size[0]}x{image.size[1]}",
        )
    if label.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
        raise BadSample("label_not_single_channel", pair.label, f"mode {label.mode}")
    train = label_to_train_ids(np.asarray(label), spec, pair.label)

    fmt = "png" if image.format == "PNG" else "jpg"
    keep_bytes = image.mode == "RGB" and image.format in ("PNG", "JPEG")
    width, height = image.size
    if max_side and max(width, height) > max_side:
        scale = max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        train = np.asarray(Image.fromarray(train).resize(size, Image.Resampling.NEAREST))
        width, height = size
        keep_bytes = False
    if not keep_bytes:
        image_bytes = _encode(image.convert("RGB"), fmt)

    counts = np.bincount(train.ravel(), minlength=256)
    return Sample(
        key=pair.key,
        image=image_bytes,
        image_ext=fmt,
        label=_encode(Image.fromarray(train), "png"),
        height=height,
        width=width,
        class_pixels=counts[: spec.num_classes].tolist(),
        ignore_pixels=int(counts[IGNORE_INDEX]),
    )
