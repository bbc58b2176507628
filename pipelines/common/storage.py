"""Directory-level storage helpers on top of ``data_prep.storage`` (local or ``s3://``).

``data_prep.storage`` moves single files; training needs whole directories (checkpoints)
and a pyarrow filesystem for Ray Train's ``storage_path``. Ray resolves ``s3://`` itself
with pyarrow, but pyarrow only honours a custom endpoint (moto, MinIO) when it is given
explicitly, so :func:`ray_storage` builds the filesystem from ``AWS_ENDPOINT_URL`` /
``STEP_S3_ENDPOINT_URL`` when one is set.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from data_prep import storage as files

is_s3 = files.is_s3
join = files.join


def absolute(uri: str) -> str:
    """Local paths become absolute (Ray workers run in other directories); URIs stay."""
    return uri if is_s3(uri) or "://" in uri else str(Path(uri).expanduser().resolve())


def upload_dir(local: str | Path, uri: str) -> str:
    """Copy every file below ``local`` to ``uri`` (a directory); returns ``uri``."""
    local = Path(local)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        files.write_bytes(files.join(uri, path.relative_to(local).as_posix()), path.read_bytes())
    return uri


def download_dir(uri: str, local: str | Path | None = None) -> Path:
    """A local copy of directory ``uri`` (the directory itself when it is local)."""
    if not is_s3(uri):
        path = Path(uri)
        if not path.is_dir():
            raise FileNotFoundError(f"{uri}: no such directory")
        return path
    out = Path(local or tempfile.mkdtemp(prefix="step-ckpt-"))
    listing = files.list_files(uri)
    if not listing:
        raise FileNotFoundError(f"{uri}: no such directory (or empty)")
    for rel in listing:
        if not rel or rel.endswith("/"):
            continue  # directory markers that pyarrow's S3 filesystem writes
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(files.read_bytes(files.join(uri, rel)))
    return out


def ray_storage(storage_path: str):
    """(storage_path, storage_filesystem) for ``ray.train.RunConfig``."""
    if not is_s3(storage_path):
        return absolute(storage_path), None
    endpoint = os.environ.get(files.S3_ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return storage_path, None
    import pyarrow.fs

    scheme, _, host = endpoint.partition("://")
    fs = pyarrow.fs.S3FileSystem(
        endpoint_override=host or scheme, scheme=scheme if host else "https",
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    return storage_path[len("s3://"):], fs


def checkpoint_uri(path: str, storage_path: str) -> str:
    """A Ray checkpoint path as a URI: Ray strips ``s3://`` when a filesystem is given."""
    if is_s3(storage_path) and not is_s3(path):
        return "s3://" + path.lstrip("/")
    return path
