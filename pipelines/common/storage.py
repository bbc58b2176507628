"""Storage helpers on top of ``data_prep.storage`` (local or ``s3://``).

``data_prep.storage`` moves single files; the pipeline also needs whole directories
(checkpoints), small JSON documents (state, results), and a pyarrow filesystem for Ray
Train's ``storage_path``. Ray resolves ``s3://`` itself with pyarrow, but pyarrow only
honours a custom endpoint (moto, MinIO) when it is given explicitly, so
:func:`ray_storage` builds the filesystem from ``AWS_ENDPOINT_URL`` /
``STEP_S3_ENDPOINT_URL`` when one is set.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from data_prep import storage as files

is_s3 = files.is_s3
join = files.join
exists = files.exists
list_files = files.list_files


def json_safe(x: Any) -> Any:
    """NaN and inf -> None, keys -> str, tuples -> lists, recursively: strict JSON."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def read_json(uri: str) -> dict[str, Any] | None:
    """The JSON document at ``uri``, or None when there is none."""
    try:
        return json.loads(files.read_bytes(uri))
    except FileNotFoundError:
        return None


def write_json(uri: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``uri`` (local, folders created, or ``s3://``), atomically."""
    files.write_bytes(str(uri), json.dumps(data, indent=1, default=str).encode())


def absolute(uri: str) -> str:
    """Local paths become absolute (Ray workers run in other directories); URIs stay."""
    return uri if is_s3(uri) or "://" in uri else str(Path(uri).expanduser().resolve())


def upload_dir(local: str | Path, uri: str) -> str:
    """Copy every file below ``local`` to ``uri`` (a directory); returns ``uri``."""
    local = Path(local)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        files.write_bytes(files.join(uri, path.relative_to(local).as_posix()), path.read_bytes())
    return uri


def ray_storage(storage_path: str):
    """(storage_path, storage_filesystem) for ``ray.train.RunConfig``, with the driver's S3
    keys inside when an explicit filesystem is needed.

    For a custom S3 endpoint (``AWS_ENDPOINT_URL``: MinIO, moto) Ray needs an explicit
    pyarrow filesystem. Ray pickles it to the Train controller and to the workers,
    processes that keep the environment Ray was started with, which may predate the
    driver's ``AWS_*`` variables. Without keys the controller's deletions of old
    checkpoints fail with ACCESS_DENIED, which Ray logs and ignores: ``keep_last``
    silently stops working. So the keys travel inside the filesystem object (its ``repr``
    shows none; the two-node test checks that no Ray file holds them). On AWS itself (no
    custom endpoint) every node resolves its own credentials, e.g. an instance role, and
    nothing is forwarded. Ray Tune is the exception: it pickles its filesystem into state
    files, so the search stages its files locally instead (``pipelines.tune.search``).
    """
    if not is_s3(storage_path):
        return absolute(storage_path), None
    endpoint = os.environ.get(files.S3_ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return storage_path, None
    import pyarrow.fs

    scheme, _, host = endpoint.partition("://")
    keys = {}
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        keys = {"access_key": key, "secret_key": secret,
                "session_token": os.environ.get("AWS_SESSION_TOKEN", "")}
    fs = pyarrow.fs.S3FileSystem(
        endpoint_override=host or scheme, scheme=scheme if host else "https",
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"), **keys,
    )
    return storage_path[len("s3://"):], fs


def checkpoint_uri(path: str, storage_path: str) -> str:
    """A Ray checkpoint path as a URI: Ray strips ``s3://`` when a filesystem is given."""
    if is_s3(storage_path) and not is_s3(path):
        return "s3://" + path.lstrip("/")
    return path
