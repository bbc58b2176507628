"""The input images: listing a folder (local or ``s3://``) and decoding one image.

A file that cannot be read or decoded raises :class:`BadImage` with one of
:data:`REASONS`; the runner reports it and skips it (``--strict``: stops), as ``step prep``
does with bad pairs. Files whose suffix is not an image suffix are not inputs at all: they
are listed in the summary as ignored, not skipped.
"""

from __future__ import annotations

import io
import posixpath
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from data_prep import storage
from data_prep.conventions import IMAGE_SUFFIXES
from pipelines.common.errors import InputNotFound, InvalidInput

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half an image
Image.MAX_IMAGE_PIXELS = 1 << 30  # remote-sensing tiles are legitimately huge (as step prep)

REASONS = ("unreadable_file", "undecodable_image", "empty_image")


class BadImage(Exception):
    """An input that is not a usable image; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, uri: str, detail: str = ""):
        assert reason in REASONS, reason
        self.reason, self.uri, self.detail = reason, uri, detail
        super().__init__(f"{uri}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # keep the fields when Ray ships the error between processes
        return BadImage, (self.reason, self.uri, self.detail)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _strip_suffix(rel: str) -> str:
    base = posixpath.basename(rel)
    return rel[: len(rel) - len(base) + base.rfind(".")] if "." in base else rel


def _inside(out: str, src: str) -> str | None:
    """``out`` relative to ``src`` when the output folder lies inside the input folder (its
    masks must not become inputs of the next run), else None."""
    if storage.is_s3(out) != storage.is_s3(src):
        return None
    if storage.is_s3(src):
        a, b = src.rstrip("/") + "/", out.rstrip("/") + "/"
        return b[len(a):] if b.startswith(a) else None
    try:
        rel = Path(out).resolve().relative_to(Path(src).resolve())
    except ValueError:
        return None
    return rel.as_posix() + "/"


def list_images(src: str, out: str | None = None) -> tuple[list[dict[str, str]], list[str]]:
    """([{"uri", "name"}] in sorted order, [ignored relative paths]) for a folder, searched
    recursively, or for one image file.

    ``name`` is the path relative to ``src`` without its suffix: outputs keep the input's
    folder structure. Two inputs that differ only by suffix (``a.jpg``, ``a.png``) keep it
    in their names (``a_jpg``, ``a_png``) so that neither overwrites the other.
    """
    src = str(src)
    if (Path(src).is_file() if not storage.is_s3(src)
            else _is_image(src) and storage.exists(src)):
        if not _is_image(src):
            raise InvalidInput(f"--images {src}: not an image file (suffixes {IMAGE_SUFFIXES})")
        return [{"uri": src, "name": _strip_suffix(posixpath.basename(src))}], []
    files = storage.list_files(src)
    if not files:
        raise InputNotFound(f"--images {src}: no such folder, or it holds no files")
    skip_prefix = _inside(out, src) if out else None
    rels = sorted(r for r in files if not (skip_prefix and r.startswith(skip_prefix))
                  and not r.endswith("/"))
    images = [r for r in rels if _is_image(r)]
    ignored = [r for r in rels if not _is_image(r)]
    if not images:
        raise InputNotFound(f"--images {src}: no image files (suffixes "
                                f"{', '.join(IMAGE_SUFFIXES)}) among {len(rels)} files")
    stems = [_strip_suffix(r) for r in images]
    clash = {s for s in stems if stems.count(s) > 1}
    items = []
    for rel, stem in zip(images, stems, strict=True):
        name = rel.replace(".", "_") if stem in clash else stem
        items.append({"uri": storage.join(src, *rel.split("/")), "name": name})
    return items, ignored


_BUFFER_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def decode_image(data: bytes, uri: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB; grey, palette, 16-bit and alpha images are converted."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()  # decode fully now: truncation shows up here
        rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        # PIL names the in-memory buffer with its address: drop it (stable details)
        detail = _BUFFER_REPR.sub("", str(err)).strip()
        raise BadImage("undecodable_image", uri, detail or type(err).__name__) from None
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise BadImage("empty_image", uri, f"{rgb.shape[1]}x{rgb.shape[0]}")
    return rgb


def read_image(uri: str) -> np.ndarray:
    try:
        data = storage.read_bytes(uri)
    except OSError as err:
        raise BadImage("unreadable_file", uri, type(err).__name__) from None
    return decode_image(data, uri)
