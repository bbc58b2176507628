"""One small file API over local paths and ``s3://bucket/prefix`` URIs.

Every path argument of ``data_prep`` goes through here, so readers, the sharding job and the
loader never branch on the scheme themselves. S3 goes through boto3: credentials come from
the standard AWS chain (env, config files, instance roles) and the endpoint from
``AWS_ENDPOINT_URL`` (read by boto3 itself) or ``STEP_S3_ENDPOINT_URL`` for S3-compatible
stores (MinIO, Ceph, moto). Nothing here prints or logs a credential; error messages name
only bucket and key.

Writes are atomic under their final name: local files are written to ``<name>.tmp-<pid>``
and renamed; S3 objects are uploaded with ``upload_file`` whose multipart upload makes the
object appear under its key only once complete. A killed job therefore never leaves a
partial file under a final name.
"""

from __future__ import annotations

import io
import os
import posixpath
import threading
from pathlib import Path
from typing import Any, BinaryIO

S3_ENDPOINT_ENV = "STEP_S3_ENDPOINT_URL"

_clients: dict[tuple[int, int], Any] = {}
_clients_lock = threading.Lock()


S3_ENV_VARS = (
    "AWS_ENDPOINT_URL", S3_ENDPOINT_ENV, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
)


class S3Env(dict):
    """The driver's S3 settings, forwarded to Ray tasks whose workers started without them.

    Ray workers keep the environment of the moment they were started, which may predate the
    driver's ``AWS_*`` variables. Values travel inside the task arguments (not in a
    runtime_env, which the Ray dashboard displays) and never appear in ``repr``.
    """

    def __repr__(self) -> str:
        return f"S3Env({sorted(self)})"

    __str__ = __repr__


def capture_s3_env() -> S3Env:
    return S3Env({k: os.environ[k] for k in S3_ENV_VARS if os.environ.get(k)})


_forwarded: set[str] = set()


def apply_s3_env(env: S3Env | dict | None) -> None:
    """Set forwarded variables this process did not start with (its own settings win)."""
    changed = False
    for k, v in (env or {}).items():
        if (k in _forwarded or not os.environ.get(k)) and os.environ.get(k) != v:
            os.environ[k] = v
            _forwarded.add(k)
            changed = True
    if changed:
        with _clients_lock:
            _clients.clear()


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b")."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri}")
    return bucket, key


def join(base: str | os.PathLike, *parts: str) -> str:
    base = str(base)
    if is_s3(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return str(Path(base, *parts))


def s3_client() -> Any:
    """A boto3 S3 client, one per process and thread (clients are not fork-safe)."""
    ident = (os.getpid(), threading.get_ident())
    with _clients_lock:
        client = _clients.get(ident)
        if client is None:
            import boto3
            from botocore.config import Config

            endpoint = os.environ.get(S3_ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL")
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint or None,
                config=Config(retries={"max_attempts": 5, "mode": "standard"}),
            )
            _clients[ident] = client
    return client


def list_files(uri: str | os.PathLike) -> dict[str, int]:
    """All files below ``uri`` (recursive) as {relative posix path: size in bytes}."""
    uri = str(uri)
    if is_s3(uri):
        bucket, prefix = split_s3(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        out: dict[str, int] = {}
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(prefix):]] = int(obj["Size"])
        return out
    root = Path(uri)
    if not root.is_dir():
        return {}
    return {
        p.relative_to(root).as_posix(): p.stat().st_size
        for p in root.rglob("*")
        if p.is_file()
    }


def exists(uri: str | os.PathLike) -> bool:
    """Whether a file (or S3 object) exists at ``uri``."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as err:  # botocore ClientError 404, or no such bucket
            if _status(err) in (403, 404):
                return False
            raise
    return Path(uri).is_file()


def read_bytes(uri: str | os.PathLike) -> bytes:
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as err:
            if _status(err) == 404:
                raise FileNotFoundError(uri) from None
            raise
    return Path(uri).read_bytes()


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically under ``uri`` (temporary name + rename, or one PUT)."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def put_file(local: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Move a finished local file to ``uri``; it appears under its final name only when whole."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().upload_file(str(local), bucket, key)
        os.unlink(local)
        return
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    os.replace(local, uri)


def delete(uri: str | os.PathLike) -> None:
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        Path(uri).unlink(missing_ok=True)


def open_read(uri: str | os.PathLike, buffer_size: int = 1 << 20) -> BinaryIO:
    """A buffered, streaming binary reader (S3 objects are not loaded whole)."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as err:
            if _status(err) == 404:
                raise FileNotFoundError(uri) from None
            raise
        return io.BufferedReader(_StreamingRaw(body), buffer_size=buffer_size)
    return open(uri, "rb", buffering=buffer_size)  # noqa: SIM115 - caller closes


class _StreamingRaw(io.RawIOBase):
    """botocore's StreamingBody as a raw stream, so ``io.BufferedReader`` can batch reads.

    tarfile's stream mode reads 10 KiB records; without the buffer every one of them is a
    separate read on the HTTP socket.
    """

    def __init__(self, body: Any):
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._body.read(len(b))
        n = len(data)
        b[:n] = data
        return n

    def close(self) -> None:
        try:
            self._body.close()
        finally:
            super().close()


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
        return 404
    if code in ("403", "AccessDenied"):
        return 403
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status else None


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> BinaryIO:
    """webdataset ``gopen`` handler for ``s3://`` (boto3 streaming; no ``pipe:aws`` subprocess)."""
    if mode != "rb":
        raise ValueError(f"{url}: the s3 gopen handler only reads (mode {mode!r})")
    return open_read(url)


def register_s3_gopen() -> None:
    """Make webdataset open ``s3://`` URLs with :func:`gopen_s3` (idempotent)."""
    import webdataset

    webdataset.gopen_schemes["s3"] = gopen_s3
