"""``step predict``: resolve the model, list the images, run the predictor locally or as
Ray Data ``map_batches`` over a cluster, and write the summary.

Where it runs: on Ray when ``--ray`` is given or ``RAY_ADDRESS`` names a cluster (the
cluster's nodes each read images, run a model held by an actor and write their outputs),
else in this process. Both paths use the same :class:`Predictor` on batches of
``batch_size`` inputs, so they write the same files and records. With Ray every node
reads ``--images`` and writes ``--out`` itself: on a cluster of several machines both
must be ``s3://`` (or a shared file system).

Throughput is images per second of wall time from the first batch to the last record:
decoding and writing included; model loading excluded locally, the actors' start-up
included on Ray. ``forward_ms_mean`` is the mean forward time per image alone; FLOP
counting (``--flops``) slows the forward down: ``flops_counted`` says so.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from typing import Any

from data_prep import storage
from pipelines.common.errors import InvalidInput
from pipelines.predict.palette import palette_for
from pipelines.predict.predictor import Predictor
from pipelines.predict.settings import PredictSettings
from pipelines.predict.writer import write_summary

MAX_LISTED_IGNORED = 50


class PredictError(InvalidInput):
    """An expected failure: ``step predict: error: <message>``, exit 1."""


def predict(s: PredictSettings) -> dict[str, Any]:
    """Run ``step predict``; returns the summary (also written to ``<out>/summary.json``)."""
    from pipelines.predict.images import list_images
    from pipelines.predict.source import resolve_source

    source = resolve_source(s)
    items, ignored = list_images(s.images, s.out)
    colours_of = {"auto": source.dataset, "fixed": None}.get(s.palette, s.palette)
    palette, palette_name = palette_for(colours_of, source.num_classes)
    if s.palette not in ("auto", "fixed") and palette_name != s.palette:
        source.notes.append(f"--palette {s.palette}: no colours of it for the model's "
                            f"{source.num_classes} classes here; the fixed palette is used")
    use_ray = s.ray if s.ray is not None else bool(os.environ.get("RAY_ADDRESS"))
    plan = {"checkpoint": source.checkpoint, "inference": source.inference,
            "device": s.device, "out": s.out, "palette": palette.tolist(),
            "token_maps": s.token_maps, "flops": s.flops,
            "precision": s.precision, "rewrites": s.rewrites(),
            "io_threads": 0 if use_ray else s.io_threads}
    if use_ray:
        records, seconds, workers = _run_ray(plan, items, s)
    else:
        records, seconds, workers = _run_local(plan, items, s)
    summary = _summary(s, source, items, ignored, records, seconds, use_ray, workers,
                       palette_name)
    write_summary(s.out, summary)
    return summary


def _check_strict(records: list[dict[str, Any]], strict: bool) -> None:
    if not strict:
        return
    for r in records:
        if r["status"] != "ok":
            detail = f" ({r['detail']})" if r.get("detail") else ""
            raise PredictError(f"--strict: bad image {r['image']}: {r['reason']}{detail}")


def _run_local(plan: dict[str, Any], items: list[dict[str, str]], s: PredictSettings
               ) -> tuple[list[dict[str, Any]], float, int]:
    predictor = Predictor(plan)
    records: list[dict[str, Any]] = []
    t0 = last = time.perf_counter()

    def progress(batch: list[dict[str, Any]]) -> None:
        nonlocal last
        _check_strict(batch, s.strict)
        records.extend(batch)
        now = time.perf_counter()
        if now - last > 30:  # a line now and then on long runs, none on short ones
            last = now
            print(f"step predict: {len(records)}/{len(items)} images", file=sys.stderr)

    try:
        run_batches(predictor, items, s.batch_size, progress)
    finally:
        predictor.close()
    return records, time.perf_counter() - t0, 1


def run_batches(predictor: Predictor, items: list[dict[str, str]], batch_size: int,
                on_batch) -> None:
    """The local loop: batches of ``batch_size``; with the predictor's I/O threads the
    next batch is decoded while this one runs, and files are written in the background
    (all written when this returns). ``on_batch(records)`` after each batch."""
    starts = list(range(0, len(items), batch_size))
    if not starts:
        return
    pool = predictor.io_pool
    nxt = None if pool is None else pool.submit(predictor.decode, items[:batch_size], False)
    for k, start in enumerate(starts):
        batch = items[start:start + batch_size]
        decoded = predictor.decode(batch) if nxt is None else nxt.result()
        if pool is not None and k + 1 < len(starts):
            following = items[starts[k + 1]:starts[k + 1] + batch_size]
            nxt = pool.submit(predictor.decode, following, False)
        on_batch(predictor.run(batch, decoded))
    predictor.flush()


class RayPredictor:
    """The Ray Data actor: one model per actor, batches of ``{"uri", "name"}`` rows in,
    one JSON record per input out (tagged with the node that ran it)."""

    def __init__(self, plan: dict[str, Any], s3_env: dict[str, str]) -> None:
        import ray

        storage.apply_s3_env(s3_env)
        self.node = ray.get_runtime_context().get_node_id()
        self.predictor = Predictor(plan)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        items = [{"uri": str(u), "name": str(n)}
                 for u, n in zip(batch["uri"], batch["name"], strict=True)]
        return {"record": [json.dumps({**r, "node": self.node})
                           for r in self.predictor(items)]}


def _ray_workers(s: PredictSettings, batches: int) -> tuple[int, float]:
    """(actors, GPUs per actor)."""
    import ray

    resources = ray.cluster_resources()
    if s.device.startswith("cuda"):
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise PredictError(f"--device {s.device}: the Ray cluster has no GPU")
        return min(s.workers or gpus, batches), 1.0
    # one actor per 2 CPUs: each forward uses the actor's own CPU threads
    return min(s.workers or max(1, int(resources.get("CPU", 1)) // 2), batches), 0.0


def _run_ray(plan: dict[str, Any], items: list[dict[str, str]], s: PredictSettings
             ) -> tuple[list[dict[str, Any]], float, int]:
    import ray

    from pipelines.common.cluster import init_ray

    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    batches = math.ceil(len(items) / s.batch_size)
    workers, gpus = _ray_workers(s, batches)
    ds = ray.data.from_items(items, override_num_blocks=batches).map_batches(
        RayPredictor, batch_size=s.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"plan": plan, "s3_env": storage.capture_s3_env()},
        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1, num_gpus=gpus)
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for row in ds.iter_rows():
        record = json.loads(row["record"])
        _check_strict([record], s.strict)
        records.append(record)
    return records, time.perf_counter() - t0, workers


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _summary(s: PredictSettings, source, items, ignored, records, seconds, use_ray, workers,
             palette_name) -> dict[str, Any]:
    done = sorted((r for r in records if r["status"] == "ok"), key=lambda r: r["name"])
    bad = sorted((r for r in records if r["status"] != "ok"), key=lambda r: r["name"])
    tokens = sum(r["tokens"] for r in done)
    flops = [r["gflops"] for r in done if r["gflops"] is not None]
    split_keys = sorted({k for r in done for k in (r["gflops_split"] or {})})
    return {
        "model": s.model,
        "checkpoint": source.checkpoint,
        "registered_model": source.registered,
        "inference": source.inference,
        "thresholds_from_registry": bool(source.registered) and s.thresholds_from_registry,
        "images_dir": s.images,
        "out": s.out,
        "executor": "ray" if use_ray else "local",
        "workers": workers,
        "nodes": sorted({r["node"] for r in records if r.get("node")}),
        "device": s.device,
        "batch_size": s.batch_size,
        "dataset": source.dataset,
        "class_names": source.class_names,
        "palette": palette_name,
        "notes": source.notes,
        "inputs": len(items),
        "images": len(done),
        "skipped": len(bad),
        "skipped_by_reason": dict(sorted(Counter(r["reason"] for r in bad).items())),
        "skipped_images": [{"image": r["image"], "reason": r["reason"], "detail": r["detail"]}
                           for r in bad],
        "ignored_files": len(ignored),
        "ignored_examples": ignored[:MAX_LISTED_IGNORED],
        "gflops_mean": _mean(flops),
        "gflops_split_mean": {k: _mean([r["gflops_split"][k] for r in done
                                        if r["gflops_split"]]) for k in split_keys},
        "tokens_mean": _mean([r["tokens"] for r in done]),
        "tokens_in_mean": _mean([r["tokens_in"] for r in done]),
        "halted_fraction": sum(r["halted"] for r in done) / tokens if tokens else None,
        "seconds": seconds,
        "throughput_images_per_s": len(done) / seconds if seconds > 0 else None,
        "forward_ms_mean": _mean([r["forward_ms"] for r in done]),
        "flops_counted": s.flops,
        "per_image": [{k: v for k, v in r.items() if k != "status"} for r in done],
    }
