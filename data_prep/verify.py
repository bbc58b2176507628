"""A dataset's expected files (a manifest: names, sizes, sha256) and the check of a copy.

A benchmark's figures mean something only on the data they were measured on. A manifest
lists every file a config reads from its source folder; :func:`verify_source` compares a
user's copy (local or ``s3://``) with it and raises :class:`SourceMismatch` naming the
missing and the differing files, and where to get the data. Files that the manifest does
not list (another split, a README) are not checked. ``step prep --verify`` runs the check
alone; a pipeline config runs it before any step (``data.manifest``).

Format (JSON; one object)::

    {"name": "CamVid (SegNet)",
     "source": "where to get the data, in words: shown when a copy does not match",
     "files": {"train/0001TP_006690.png": {"size": 381672, "sha256": "..."}, ...}}

Design choices:

* **Sizes from the listing, then hashes.** The listing gives every size in one call (one
  LIST walk on S3): a missing or truncated file is known without reading it. Every other
  listed file is hashed (sizes alone miss a file replaced by another of the same size), so
  one run names every problem.
* **No cache of hashes.** Hashing CamVid's 936 PNGs (125 MB) took 0.2-0.5 s on this
  2-core machine (warm page cache), well under a second of a pipeline whose prepare step
  then decodes every image; a cache keyed by size and mtime would save that fraction of a
  second at the price of a state file beside (or inside) the user's data. Files are
  hashed in a few threads (``hashlib`` releases the GIL; on S3 the reads overlap).
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatch

from data_prep import storage
from data_prep.readers import DatasetError

SHOWN = 10  # names listed per problem in the error message; the rest are counted


class SourceMismatch(DatasetError):
    """A source folder that does not hold the files of its manifest (missing folder,
    missing files, or files whose size or sha256 differ)."""


@dataclass
class Verification:
    """What :func:`verify_source` found (``ok`` when nothing is missing or different)."""

    src: str
    manifest: str
    name: str
    source: str
    files: int = 0
    missing: list[str] = field(default_factory=list)
    differ: list[str] = field(default_factory=list)  # size or sha256 not the manifest's
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.differ

    def message(self) -> str:
        if self.ok:
            return (f"{self.src}: all {self.files} files of {self.name} match {self.manifest} "
                    f"({self.seconds:.1f} s)")
        parts = []
        for what, names in (("missing", self.missing), ("different", self.differ)):
            if names:
                shown = ", ".join(names[:SHOWN])
                more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
                parts.append(f"{len(names)} {what} ({shown}{more})")
        return (f"{self.src} is not the {self.name} data of {self.manifest}: "
                f"{'; '.join(parts)} of {self.files} files. Get the data: {self.source}")


def load_manifest(path: str) -> dict:
    """The manifest at ``path`` (local or ``s3://``); :class:`DatasetError` if unreadable."""
    try:
        doc = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise DatasetError(f"manifest {path}: file not found") from None
    except ValueError as err:
        raise DatasetError(f"manifest {path}: not valid JSON ({err})") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and {"size", "sha256"} <= v.keys() for v in files.values()):
        raise DatasetError(f"manifest {path}: expected {{\"files\": {{path: {{\"size\": N, "
                           "\"sha256\": HEX}}}}}}")
    return doc


def file_sha256(uri: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with storage.open_read(uri) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _hashes(src: str, names: list[str], threads: int = 4) -> dict[str, str]:
    with ThreadPoolExecutor(max_workers=threads) as pool:
        digests = pool.map(lambda n: file_sha256(storage.join(src, *n.split("/"))), names)
        return dict(zip(names, digests, strict=True))


def verify_source(src: str, manifest: str) -> Verification:
    """Compare the files under ``src`` with ``manifest``; see the module docstring."""
    t0 = time.perf_counter()
    doc = load_manifest(manifest)
    expected: dict[str, dict] = doc["files"]
    name = doc.get("name") or "dataset"
    source = doc.get("source") or "see the manifest's dataset documentation"
    result = Verification(src=str(src), manifest=str(manifest), name=name, source=source,
                          files=len(expected))
    try:
        listed = storage.list_files(src)
    except Exception as err:  # noqa: BLE001 - no such bucket, no access: said as it is
        raise SourceMismatch(f"{src}: cannot list it ({type(err).__name__}: {err}). "
                             f"Get the data: {source}") from None
    if not listed:
        raise SourceMismatch(f"{src}: no such folder, or nothing in it; {name} expects "
                             f"{len(expected)} files (listed in {manifest}). Get the data: "
                             f"{source}")
    result.missing = sorted(n for n in expected if n not in listed)
    result.differ = sorted(n for n in expected if n in listed
                           and listed[n] != int(expected[n]["size"]))
    same_size = sorted(n for n in expected if n in listed and n not in result.differ)
    digests = _hashes(src, same_size)  # every problem in one run, not one kind per rerun
    result.differ = sorted(result.differ + [n for n in same_size
                                            if digests[n] != expected[n]["sha256"]])
    result.seconds = time.perf_counter() - t0
    return result


def check_source(src: str, manifest: str) -> Verification:
    """:func:`verify_source`, raising :class:`SourceMismatch` unless the copy matches."""
    result = verify_source(src, manifest)
    if not result.ok:
        raise SourceMismatch(result.message())
    return result


def build_manifest(src: str, *, name: str, source: str,
                   include: tuple[str, ...] = ("*",)) -> dict:
    """The manifest of the files under ``src`` whose relative path matches one of the
    ``include`` patterns (``fnmatch``: ``*`` also matches ``/``)."""
    listed = storage.list_files(src)
    names = sorted(n for n in listed if any(fnmatch(n, p) for p in include))
    if not names:
        raise DatasetError(f"{src}: no files to list (include {list(include)})")
    digests = _hashes(src, names)
    return {"name": name, "source": source,
            "files": {n: {"size": listed[n], "sha256": digests[n]} for n in names}}


def write_manifest(path: str, doc: dict) -> None:
    storage.write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode())
