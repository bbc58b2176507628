"""``step bench data``: shard-writing and loader throughput, from local disk and from S3.

One run, on a flat ``img_dir``/``ann_dir`` dataset (the LoveDA fixtures) replicated to
``--samples`` pairs:

- ``write_images_per_s``: the ``step prep`` Ray Data job (local Ray, started and warmed up
  by a 2-sample job before timing: the first job of a session spends ~10 s starting workers);
- ``decode_images_per_s``: the limit: decoding the very bytes of the shards (image and
  label), already in memory, in one process, with the loader's decoders;
- ``load_local_images_per_s`` / ``load_s3_images_per_s``: the loader in eval mode (decode,
  no augmentation, uint8 batches as training gets them: ``pipelines`` converts to float on
  the device) with the same resources
  (``--num-workers 0`` by default: the main process, one torch thread, as the decode
  figure), from local shards and from S3. S3 is measured only when asked: ``--s3
  s3://bucket/prefix`` uploads the shards there (a real endpoint: ``AWS_ENDPOINT_URL`` or
  ``STEP_S3_ENDPOINT_URL`` and the usual AWS credentials; the prefix must be empty, and
  the uploaded objects are deleted afterwards), ``--s3-moto`` serves them from a moto
  server started in this process on 127.0.0.1 (moto is a test extra, not a dependency).
  Without either, the S3 figures are ``null`` and ``s3`` in the JSON says why;
- ``load_local_float_images_per_s``: for information, the same loader building float32 /
  int64 batches on the host (``to_float=True``), which costs ~20 MB of fresh memory per
  1024^2 image;
- ``load_local_train_images_per_s``: for information, the training path (augmentation to
  ``--crop``) with ``--train-workers`` dataloader workers.

Each figure is the best of ``--repeats`` passes (the machine is shared; the best pass is the
least disturbed one). Targets: local loader >= 0.9 x decode, S3 loader >= 0.8 x local.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

# where the S3 figure comes from, and why it may be missing (the JSON's "s3" entry)
S3_SKIPPED = ("not measured: pass --s3 s3://bucket/prefix (an endpoint from AWS_ENDPOINT_URL "
              "and AWS credentials) or --s3-moto (needs moto, a test extra)")
MOTO_MISSING = ("--s3-moto needs moto, which is a test extra "
                "(pip install 'moto[server]' or the project's [test] extra); "
                "or measure a real endpoint with --s3 s3://bucket/prefix")


class BenchDataSettings(BaseModel):
    """What :func:`measure` benchmarks (the ``step bench data`` command is generated from it)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    images: str = Field(description="flat dataset with img_dir/ and ann_dir/ (e.g. "
                        "demo_data/loveda)", json_schema_extra={"metavar": "DIR"})
    samples: int = Field(64, ge=64, description="replicate to this many pairs")
    samples_per_shard: int = Field(8, ge=1)
    batch_size: int = Field(4, ge=1)
    num_workers: int = Field(0, ge=0, description="dataloader workers for the loader figures "
                             "(0: main process, as decode)")
    train_workers: int = Field(2, ge=1)
    crop: int = Field(512, ge=16)
    repeats: int = Field(3, ge=1)
    workdir: str | None = Field(None, description="keep the replicated data and shards here")
    s3: str | None = Field(None, description="also load from S3: upload the shards under this "
                           "empty s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL / "
                           "STEP_S3_ENDPOINT_URL, AWS credentials from the environment) and "
                           "delete them afterwards", json_schema_extra={"metavar": "URI"})
    s3_moto: bool = Field(False, description="also load from S3 served by a moto server in "
                          "this process on 127.0.0.1 (needs moto, a test extra)")

    @model_validator(mode="after")
    def _one_s3(self) -> BenchDataSettings:
        if self.s3 and self.s3_moto:
            raise ValueError("s3 and s3_moto: choose one")
        return self


class BenchInputError(ValueError):
    """Options that cannot run (the message says which)."""


def measure(settings: BenchDataSettings) -> dict:
    """The benchmark; returns the result (without S3 figures, ``s3`` says why). Raises
    :class:`BenchInputError` for settings that cannot run here."""
    # Before torch allocates anything: back big CPU tensors with transparent huge pages.
    # A fresh 48 MB float batch otherwise costs ~12k page faults; measured here (loaded
    # 2-core machine, noisy): uint8 -> float batch of 4 x 1024^2, 10-25 ms/image without,
    # 1.6-4 ms/image with it. Training workers can set the same variable.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    import torch

    error = check_s3_options(settings)
    if error:
        raise BenchInputError(error)
    # One process, one thread for both decode and loader figures (dataloader workers run
    # with one thread too). With torch's default pool of 2 threads on this loaded 2-core
    # machine, the uint8 -> float copy of a 1024^2 image took 3-13 ms instead of 0.9 ms.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="step-bench-data-") as tmp:
        work = Path(settings.workdir or tmp)
        shards, report, write_rate = write_shards(Path(settings.images), work, settings.samples,
                                                  settings.samples_per_shard)
        with s3_copy(settings, shards) as s3_uri:
            rate = time_passes(build_passes(settings, shards, report.shards, s3_uri), settings.repeats)
    return summarize(settings, len(report.shards), write_rate, rate)


def _moto_importable() -> bool:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return True


def check_s3_options(settings: BenchDataSettings) -> str | None:
    """Why the S3 options cannot work (a one-line message), checked before the long work;
    None when they can (or when S3 is not asked for)."""
    if settings.s3_moto and not _moto_importable():
        return MOTO_MISSING
    if settings.s3:
        from data_prep import storage

        if not storage.is_s3(settings.s3):
            return f"--s3 {settings.s3}: expected s3://bucket/prefix"
        if storage.list_files(settings.s3):
            return (f"--s3 {settings.s3} is not empty; the bench writes its shards "
                    "there and deletes them afterwards, so it needs a prefix of its own")
    return None


def write_shards(images: Path, work: Path, n: int, samples_per_shard: int):
    """Replicate ``images`` to ``n`` pairs and shard them with the ``step prep`` job (after an
    untimed 2-sample warm-up job). Returns (shard folder, PrepReport, images/s written)."""
    from data_prep import fixtures
    from data_prep.prep import _ensure_ray, prepare

    src = fixtures.replicate_flat(images, work / "src", n)
    shards = work / "shards"
    _ensure_ray()
    # warm-up: the first Ray Data job of a session starts and imports its workers (~10 s
    # here); that is a per-session cost, not shard-writing throughput
    warm = fixtures.replicate_flat(images, work / "warm", 2)
    prepare("loveda", str(warm), str(work / "warm_shards"), "train", samples_per_shard=1,
            progress=False)
    report = prepare("loveda", str(src), str(shards), "train",
                     samples_per_shard=samples_per_shard, progress=False)
    if report.written != n:
        raise RuntimeError(f"prep wrote {report.written} of {n} samples: {report.skipped}")
    return shards, report, n / report.seconds


def build_passes(settings: BenchDataSettings, shards: Path, shard_files: list[str],
                 s3_uri: str | None) -> dict[str, tuple[Callable[[], int], int | None]]:
    """The timed passes, in the order they interleave: {name: (function returning the images
    it read, the count it must return or None)}. ``s3`` only with an ``s3_uri``."""
    from data_prep.conventions import SHARD_IMAGE_EXTS, SHARD_LABEL_EXT
    from data_prep.loader import build_loader, decode_image, decode_label
    from data_prep.shards import iter_tar

    blobs = []
    for shard in shard_files:
        with open(shard, "rb") as f:
            blobs += [files for _, files in iter_tar(f)]

    def decode_all() -> int:
        for files in blobs:
            decode_image(next(files[e] for e in SHARD_IMAGE_EXTS if e in files))
            decode_label(files[SHARD_LABEL_EXT])
        return len(blobs)

    def loader_pass(uri: str, train: bool = False, workers: int = settings.num_workers,
                    to_float: bool = False) -> Callable[[], int]:
        def go() -> int:
            return _count(build_loader(uri, batch_size=settings.batch_size, crop_size=settings.crop,
                                       train=train, num_workers=workers, to_float=to_float))
        return go

    n = settings.samples
    passes = {"decode": (decode_all, n), "local": (loader_pass(str(shards)), n)}
    if s3_uri is not None:
        passes["s3"] = (loader_pass(s3_uri), n)
    passes["local_float"] = (loader_pass(str(shards), to_float=True), n)
    passes["train"] = (loader_pass(str(shards), True, settings.train_workers), None)
    return passes


def time_passes(passes: dict[str, tuple[Callable[[], int], int | None]], repeats: int) -> dict[str, float]:
    """Images/s of each pass: its best of ``repeats`` interleaved rounds. Interleaving gives
    every figure the same mix of load from the other users of this machine; the best pass
    is the least disturbed one."""
    best = {k: float("inf") for k in passes}
    counts: dict[str, int] = {}
    for _ in range(repeats):
        for name, (fn, expected) in passes.items():
            t0 = time.perf_counter()
            got = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
            if expected is not None and got != expected:
                raise RuntimeError(f"{name}: expected {expected} images per pass, got {got}")
            counts[name] = got
    return {k: counts[k] / best[k] for k in passes}


def _ratio(a: float | None, b: float) -> float | None:
    return None if a is None else round(a / b, 3)


def summarize(settings: BenchDataSettings, num_shards: int, write_rate: float,
              rate: dict[str, float]) -> dict:
    """The result JSON (S3 figures None, with the reason under ``s3``, when not measured)."""
    s3 = rate.get("s3")
    return {
        "samples": settings.samples,
        "image_size": list(_image_size(Path(settings.images))),
        "shards": num_shards,
        "batch_size": settings.batch_size,
        "loader_workers": settings.num_workers,
        "torch_threads": 1,
        "repeats": settings.repeats,
        "write_images_per_s": round(write_rate, 2),
        "decode_images_per_s": round(rate["decode"], 2),
        "load_local_images_per_s": round(rate["local"], 2),
        "load_s3_images_per_s": None if s3 is None else round(s3, 2),
        "s3": ("moto on 127.0.0.1" if settings.s3_moto else settings.s3) if s3 is not None else S3_SKIPPED,
        "load_local_float_images_per_s": round(rate["local_float"], 2),
        "load_local_train_images_per_s": round(rate["train"], 2),
        "train_workers": settings.train_workers,
        "crop": settings.crop,
        "local_vs_decode": round(rate["local"] / rate["decode"], 3),
        "local_float_vs_decode": round(rate["local_float"] / rate["decode"], 3),
        "s3_vs_local": _ratio(s3, rate["local"]),
        "targets_met": {
            "local_ge_0.9_decode": rate["local"] >= 0.9 * rate["decode"],
            "s3_ge_0.8_local": None if s3 is None else s3 >= 0.8 * rate["local"],
        },
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def _count(loader) -> int:
    return sum(len(batch[0]) for batch in loader)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_size(images: Path) -> tuple[int, int]:
    from PIL import Image

    first = sorted((images / "img_dir").iterdir())[0]
    with Image.open(first) as im:
        return im.size


@contextlib.contextmanager
def s3_copy(settings: BenchDataSettings, shards: Path) -> Iterator[str | None]:
    """The shards' S3 URI while it is in use: uploaded to ``--s3`` (deleted on exit), or
    served by moto (``--s3-moto``); None when S3 is not measured."""
    if settings.s3:
        with _uploaded(shards, settings.s3) as uri:
            yield uri
    elif settings.s3_moto:
        with _moto_shards(shards) as uri:
            yield uri
    else:
        yield None


def _upload(shards: Path, uri: str) -> list[str]:
    """Upload the files of the shard folder (not ``_parts/``) under ``uri``; their URIs."""
    from data_prep import storage

    done = []
    for path in sorted(shards.iterdir()):
        if path.is_file():
            bucket, key = storage.split_s3(storage.join(uri, path.name))
            storage.s3_client().upload_file(str(path), bucket, key)
            done.append(f"s3://{bucket}/{key}")
    return done


@contextlib.contextmanager
def _uploaded(shards: Path, uri: str) -> Iterator[str]:
    """A copy of ``shards`` under ``uri`` on the configured endpoint, deleted on exit."""
    from data_prep import storage

    done: list[str] = []
    try:
        done = _upload(shards, uri)
        yield uri.rstrip("/")
    finally:
        for obj in done:
            storage.delete(obj)


@contextlib.contextmanager
def _moto_shards(shards: Path) -> Iterator[str]:
    """Serve a copy of ``shards`` from an in-process moto S3 server on 127.0.0.1."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from data_prep import storage

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log lines
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    keys = ("AWS_ENDPOINT_URL", storage.S3_ENDPOINT_ENV, "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.pop(storage.S3_ENDPOINT_ENV, None)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    storage._clients.clear()
    try:
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        s3.create_bucket(Bucket="bench")
        for path in sorted(shards.iterdir()):
            if path.is_file():
                s3.upload_file(str(path), "bench", f"shards/{path.name}")
        yield "s3://bench/shards"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage._clients.clear()
