"""The sharding job behind ``step prep``: raw dataset -> deterministic WebDataset shards.

Flow:

1. The driver lists the split (:mod:`data_prep.readers`) and plans shards from the sorted
   keys (:func:`data_prep.shards.plan_shards`).
2. A Ray Data job maps over the shard plans, one shard per task: read, validate and convert
   every pair (:func:`data_prep.samples.convert_pair`), write the tar to a temporary name
   and move it under its final name only when complete, and write the shard's manifest
   part (``_parts/<shard>.parquet``) just before that move. Ray Data gives the progress bar,
   the scheduling across the cluster and task retries.
3. The driver concatenates the parts into ``manifest.parquet`` and ``skipped.parquet`` (every
   bad pair: path, reason, detail) and writes ``sizes.json`` and ``dataset.json``.

Design choices:

- *One decode per pair.* Validation and conversion happen in the task that writes the
  shard: validating in a first Ray Data pass and writing in a second decodes every image
  twice. Because shard membership comes from the sorted listing (not from validation), the
  plan is known before anything is decoded.
- *Resume.* A shard counts as done when its final tar exists, its part exists, the part was
  made from the same plan (a digest of source keys, sizes and settings) and the tar's
  members hash to the part's sha256 columns. Anything else is rewritten. The manifest is
  only ever assembled from parts, so killing the job at any moment and rerunning it
  finishes the job with the same bytes as an uninterrupted run.
- *Skipped pairs travel with their shard.* Each part carries the list of its shard's bad
  pairs in its metadata (``skipped``, JSON), written in the same atomic write as the
  part's rows. ``skipped.parquet`` is assembled from the parts exactly like the manifest,
  so a resumed run neither loses the entries of shards it keeps nor repeats those of
  shards it redoes. It is written on every run, empty (schema only) when nothing was
  skipped, so a file from an earlier run never outlives the data it described.
- *Several splits, one directory.* Shard names carry the split; ``manifest.parquet`` (with a
  ``split`` column) and ``sizes.json`` cover every split in the directory. Prepare one split
  at a time per directory.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from data_prep import storage
from data_prep.conventions import IGNORE_INDEX
from data_prep.readers import DatasetSpec, Pair, read_pairs
from data_prep.samples import BadSample, convert_pair, sha256
from data_prep.shards import SHARD_RE, plan_digest, plan_shards, shard_name, tar_digests, write_tar

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
SKIPPED = "skipped.parquet"
SIZES = "sizes.json"
DATASET = "dataset.json"
PARTS = "_parts"


class PrepError(RuntimeError):
    """The job could not finish (a bad pair under ``--strict``, or a task failure)."""


@dataclass
class PrepReport:
    """What ``step prep --json`` writes."""

    dataset: str
    split: str
    out: str
    read: int = 0
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> pairs skipped
    skipped_total: int = 0  # = rows of ``skipped_file`` for this split
    skipped_file: str = ""  # skipped.parquet: split, shard, key, path, reason, detail
    shards: list[str] = field(default_factory=list)
    shards_reused: int = 0
    shards_written: int = 0
    manifest: str = ""
    seconds: float = 0.0
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first offending file

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- the task


def _manifest_schema(num_classes: int):
    import pyarrow as pa

    return pa.schema([
        ("split", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image_ext", pa.string()),
        ("image_sha256", pa.string()),
        ("label_sha256", pa.string()),
        ("class_pixels", pa.list_(pa.int64(), num_classes)),
        ("ignore_pixels", pa.int64()),
    ])


def _skipped_schema():
    import pyarrow as pa

    return pa.schema([
        ("split", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("path", pa.string()),  # the offending file (the image when its label is missing)
        ("reason", pa.string()),  # one of data_prep.samples.REASONS
        ("detail", pa.string()),
    ])


def _parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _part_bytes(rows: list[dict], num_classes: int, meta: dict[str, str]) -> bytes:
    import pyarrow as pa

    schema = _manifest_schema(num_classes).with_metadata(meta)
    return _parquet_bytes(pa.Table.from_pylist(rows, schema=schema))


def _read_part(uri: str) -> tuple[list[dict], dict[str, str]] | None:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    except Exception:  # missing or damaged part: the shard is simply redone
        return None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return table.to_pylist(), meta


def _shard_is_done(out: str, name: str, digest: str) -> dict | None:
    """The part's stats when the finished shard ``name`` matches its part and plan, else None."""
    part = _read_part(storage.join(out, PARTS, name + ".parquet"))
    if part is None:
        return None
    rows, meta = part
    # a part without its skipped list (an older format) cannot say which pairs it dropped
    if meta.get("plan") != digest or "skipped" not in meta:
        return None
    try:
        found = tar_digests(storage.read_bytes(storage.join(out, name)))
    except Exception:  # missing, truncated or not a tar
        return None
    expected = [(r["key"], r["image_sha256"], r["label_sha256"]) for r in rows]
    if found != expected:
        return None
    return json.loads(meta["stats"])


def write_shard(
    plan: dict, *, spec: DatasetSpec, out: str, split: str, max_side: int | None, strict: bool
) -> dict:
    """Convert and write one shard (runs in a Ray task); returns its stats as a dict."""
    name, digest = plan["name"], plan["digest"]
    pairs = [Pair(**p) for p in plan["pairs"]]
    done = _shard_is_done(out, name, digest)
    if done is not None:
        return {**done, "reused": True}

    rows: list[dict] = []
    bad_rows: list[dict] = []  # every skipped pair: the shard's part keeps them all
    examples: dict[str, str] = {}

    def converted() -> Iterator[dict[str, bytes]]:
        # streamed into the tar: one sample in memory at a time, whatever the shard size
        for pair in pairs:
            try:
                s = convert_pair(pair, spec, max_side)
            except BadSample as bad:
                if strict:
                    raise
                log.warning("skipping %s", bad)
                bad_rows.append({"split": split, "shard": name, "key": pair.key,
                                 "path": bad.file, "reason": bad.reason, "detail": bad.detail})
                examples.setdefault(bad.reason, str(bad))
                continue
            rows.append({
                "split": split, "shard": name, "key": s.key, "height": s.height,
                "width": s.width, "image_ext": s.image_ext, "image_sha256": sha256(s.image),
                "label_sha256": sha256(s.label), "class_pixels": s.class_pixels,
                "ignore_pixels": s.ignore_pixels,
            })
            yield {"__key__": s.key, **s.members()}

    final = storage.join(out, name)
    tmp_dir = None if storage.is_s3(out) else out
    if tmp_dir:
        os.makedirs(tmp_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=tmp_dir)
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                write_tar(f, converted())
        except BadSample as bad:  # --strict
            return {"name": name, "error": str(bad)}
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; shards are meant to be shared
        skipped = Counter(r["reason"] for r in bad_rows)
        stats = {"name": name, "read": len(pairs), "written": len(rows),
                 "skipped": dict(sorted(skipped.items())), "examples": examples, "error": None}
        meta = {"plan": digest, "stats": json.dumps(stats, sort_keys=True),
                "skipped": json.dumps(bad_rows, sort_keys=True)}
        # The part goes first: a tar under its final name always has a part beside it, and
        # a part whose tar never arrived just makes the rerun redo the shard.
        storage.write_bytes(storage.join(out, PARTS, name + ".parquet"),
                            _part_bytes(rows, spec.num_classes, meta))
        storage.put_file(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {**stats, "reused": False}


def _map_batch(batch: dict[str, Any], s3_env: dict, **kw: Any) -> dict[str, list[str]]:
    storage.apply_s3_env(s3_env)
    results = [write_shard(json.loads(p), **kw) for p in batch["plan"]]
    return {"result": [json.dumps(r) for r in results]}


# --------------------------------------------------------------------------- the driver


def _ensure_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)  # the cluster named by RAY_ADDRESS
    else:
        # address="local": never attach to a stale cluster recorded in Ray's temp dir.
        ray.init(address="local", include_dashboard=False, log_to_driver=False)


def _cleanup_stale(out: str, split: str, keep: set[str]) -> None:
    """Remove this split's shards/parts that the plan no longer has, and local temp files."""
    for rel in storage.list_files(out):
        base = rel.rsplit("/", 1)[-1]
        if rel.startswith(".") and rel.endswith(".tmp") and "/" not in rel:
            storage.delete(storage.join(out, rel))  # left by a killed local run
            continue
        name = base[: -len(".parquet")] if rel.startswith(PARTS + "/") else base
        m = SHARD_RE.match(name)
        if m and m.group("split") == split and name not in keep and rel.count("/") <= 1:
            storage.delete(storage.join(out, rel))


def _finalize(out: str, split: str, spec: DatasetSpec, names: list[str]) -> tuple[str, str]:
    """Assemble ``manifest.parquet`` and ``skipped.parquet`` from every split's parts; write
    sizes and dataset info. Returns the URIs of the manifest and of the skipped list."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = storage.list_files(out)
    tables = []
    bad_rows: list[dict] = []
    for rel in sorted(files):
        if rel.startswith(PARTS + "/") and rel.endswith(".parquet"):
            name = rel[len(PARTS) + 1 : -len(".parquet")]
            m = SHARD_RE.match(name)
            if m and (m.group("split") != split or name in names) and name in files:
                table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, rel))))
                meta = table.schema.metadata or {}
                bad_rows += json.loads(meta.get(b"skipped", b"[]"))
                tables.append(table.replace_schema_metadata(None))
    manifest = pa.concat_tables(tables) if tables else _manifest_schema(spec.num_classes).empty_table()
    manifest_uri = storage.join(out, MANIFEST)
    storage.write_bytes(manifest_uri, _parquet_bytes(manifest))
    skipped_uri = storage.join(out, SKIPPED)
    storage.write_bytes(skipped_uri, _parquet_bytes(
        pa.Table.from_pylist(bad_rows, schema=_skipped_schema())))

    sizes: dict[str, int] = {}
    for shard, n in Counter(manifest.column("shard").to_pylist()).items():
        sizes[shard] = n
    for name in names:  # a shard whose every pair was bad still exists, empty
        sizes.setdefault(name, 0)
    storage.write_bytes(storage.join(out, SIZES),
                        json.dumps(dict(sorted(sizes.items())), indent=1).encode())
    splits = Counter()
    for shard, n in sizes.items():
        splits[SHARD_RE.match(shard).group("split")] += n
    info = {
        "name": spec.name,
        "num_classes": spec.num_classes,
        "class_names": list(spec.class_names),
        "ignore_index": IGNORE_INDEX,
        "splits": dict(sorted(splits.items())),
    }
    storage.write_bytes(storage.join(out, DATASET), json.dumps(info, indent=1).encode())
    return manifest_uri, skipped_uri


def prepare(
    dataset: str,
    src: str,
    out: str,
    split: str = "train",
    *,
    samples_per_shard: int | None = None,
    shard_size: int | str | None = None,
    max_side: int | None = None,
    strict: bool = False,
    layout: str | None = None,
    progress: bool = True,
) -> PrepReport:
    """Shard ``split`` of ``dataset`` at ``src`` into ``out`` (local or ``s3://``); resumable.

    Without ``samples_per_shard`` or ``shard_size``, shards hold up to 512 MB of source
    bytes. Raises :class:`~data_prep.readers.DatasetError` for a missing or empty split and
    :class:`PrepError` for a bad pair under ``strict``.
    """
    import ray

    from data_prep.shards import parse_size

    t0 = time.perf_counter()
    out = str(out).rstrip("/") if storage.is_s3(out) else str(out)
    spec, pairs = read_pairs(dataset, str(src), split, layout)
    if samples_per_shard is None and shard_size is None:
        shard_size = "512MB"
    groups = plan_shards(pairs, samples_per_shard, parse_size(shard_size))
    settings = {"dataset": spec.name, "max_side": max_side, "format": 1}
    plans = [
        {"name": shard_name(split, i), "digest": plan_digest(g, settings),
         "pairs": [asdict(p) for p in g]}
        for i, g in enumerate(groups)
    ]
    names = [p["name"] for p in plans]
    _cleanup_stale(out, split, set(names))

    _ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    fn = partial(_map_batch, s3_env=storage.capture_s3_env(), spec=spec, out=out, split=split,
                 max_side=max_side, strict=strict)
    ds = ray.data.from_items(
        [{"plan": json.dumps(p)} for p in plans], override_num_blocks=max(1, len(plans))
    ).map_batches(fn, batch_size=1, batch_format="numpy")

    report = PrepReport(dataset=spec.name, split=split, out=out)
    skipped: Counter[str] = Counter()
    results = []
    for row in ds.iter_rows():
        result = json.loads(row["result"])
        if result.get("error"):  # --strict: stop at once, not after every other shard
            raise PrepError(f"--strict: bad pair {result['error']}")
        results.append(result)
    # in shard order, so that the examples are the first bad pair of each reason
    for result in sorted(results, key=lambda r: r["name"]):
        report.read += result["read"]
        report.written += result["written"]
        skipped.update(result["skipped"])
        for reason, example in result.get("examples", {}).items():
            report.examples.setdefault(reason, example)
        if result["reused"]:
            report.shards_reused += 1
        else:
            report.shards_written += 1
    report.skipped = dict(sorted(skipped.items()))
    report.skipped_total = sum(skipped.values())
    report.shards = [storage.join(out, n) for n in names]
    report.manifest, report.skipped_file = _finalize(out, split, spec, names)
    report.seconds = round(time.perf_counter() - t0, 3)
    return report
