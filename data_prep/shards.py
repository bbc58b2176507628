"""Deterministic WebDataset shards: writing, naming, planning and verification.

Ray Data's ``write_webdataset`` (Ray 2.60) is not used: it names files randomly unless
given a ``FilenameProvider``, its bytes differ between runs (mtime, uuid keys), and a
failed write leaves an empty ``.tar`` that breaks later reads (docs/data.md, "Notes").
``webdataset.TarWriter`` with ``mtime=0``, fixed owner and mode, explicit keys and a fixed
member order gives byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator

from data_prep.conventions import SHARD_IMAGE_EXTS, SHARD_LABEL_EXT
from data_prep.readers import Pair

SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<index>\d{6})\.tar$")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def parse_size(text: str | int | None) -> int | None:
    """``"512MB"`` -> 512_000_000 (decimal units, as S3 and disks count), ``"1GiB"`` -> 2**30."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise ValueError(f"--shard-size {text!r}: expected a size like 512MB or 1GiB")
    power = " KMGT".index(m.group(2).upper() or " ")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base**power)


def plan_shards(
    pairs: list[Pair], samples_per_shard: int | None = None, shard_size: int | None = None
) -> list[list[Pair]]:
    """Group the (key-sorted) pairs into shards, before any decoding.

    Membership depends only on the sorted listing, not on which pairs later fail
    validation: a bad pair makes its own shard one sample shorter instead of shifting every
    later shard, so a rerun can trust each finished shard on its own. ``shard_size`` counts
    source bytes (image + label files), which is close to what the tar will hold.
    """
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    shards: list[list[Pair]] = []
    current: list[Pair] = []
    current_bytes = 0
    for pair in pairs:
        full = (samples_per_shard is not None and len(current) >= samples_per_shard) or (
            shard_size is not None and current and current_bytes + pair.nbytes > shard_size
        )
        if full:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(pair)
        current_bytes += pair.nbytes
    if current:
        shards.append(current)
    return shards


def plan_digest(pairs: Iterable[Pair], settings: dict) -> str:
    """Identifies what a shard must contain: its sources and the conversion settings."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for p in pairs:
        h.update(f"{p.key}\0{p.image}\0{p.label}\0{p.nbytes}\n".encode())
    return h.hexdigest()


def write_tar(fileobj, samples: Iterable[dict[str, bytes]]) -> None:
    """Write samples (``{"__key__": k, ext: bytes, ...}``) as one uncompressed, reproducible tar."""
    import webdataset as wds

    with wds.TarWriter(fileobj, encoder=False, mtime=0, user="step", group="step", mode=0o444) as w:
        for sample in samples:
            w.write(sample)


def iter_tar(fileobj) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a shard stream; raises tarfile.TarError if damaged."""
    key, files = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name
            base = name.rsplit("/", 1)[-1]
            dot = base.find(".")
            k = name[: len(name) - len(base) + dot] if dot >= 0 else name
            ext = base[dot + 1 :] if dot >= 0 else ""
            f = tar.extractfile(member)
            data = f.read() if f is not None else b""
            if len(data) != member.size:
                raise tarfile.ReadError(f"{name}: truncated member")
            if k != key:
                if key is not None:
                    yield key, files
                key, files = k, {}
            files[ext] = data
    if key is not None:
        yield key, files


def tar_digests(data: bytes) -> list[tuple[str, str, str]]:
    """(key, sha256 of image, sha256 of label) per sample of an in-memory shard."""
    out = []
    for key, files in iter_tar(io.BytesIO(data)):
        image = next((files[e] for e in SHARD_IMAGE_EXTS if e in files), b"")
        out.append((key, hashlib.sha256(image).hexdigest(),
                    hashlib.sha256(files.get(SHARD_LABEL_EXT, b"")).hexdigest()))
    return out
