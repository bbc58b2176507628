"""``step bench model --model models:/NAME/VERSION | --checkpoint CKPT --images DIR``: a
trained model, plain against tuned, in one run.

*plain* is the checkpoint's network with policy ``none`` and halting off (the ViT it
would be without STEP); *tuned* is its inference settings as ``step predict`` resolves
them: the registered version's (``models:/``), else the checkpoint's own, then the given
``--merge-thresholds`` / ``--thresholds`` / ... (:func:`pipelines.predict.source.
resolve_source`, the same code). The same module runs both (``inference_scope``), so
weights, threads and caches are shared, and each timed repeat runs plain then tuned
over the same batches, so that load from other processes hits both alike.

What it measures, per batch size (``--batch-sizes 1,4,8``):

* ``forward``: ms per image of the model forward with the argmax (images already
  decoded, on the device), ``repeats`` passes over all images after ``warmup`` batches;
  median and spread (:func:`step_model.bench_parts.stats`);
* ``parts``: the same forward in pieces, ms per forward by part
  (:mod:`step_model.bench_parts`: policy, embedding, each encoder segment, exit heads,
  decoder, upsampling + argmax) on the first ``parts_images`` images;
* ``predict``: images/s of ``step predict``'s own loop (:class:`pipelines.predict.
  predictor.Predictor`: decode, forward, write the PNGs), FLOP counting off;

and once, per image at batch 1, the GFLOPs of both (the policy network included), and
``counting``: what counting them costs, the tuned forward at batch 1 under torch's
``FlopCounterMode`` and under the part counter every evaluation uses
(:class:`step_model.flops.PartFlopCounter`), interleaved image by image, with whether
their counts agree.
The headline: wall speedup (plain / tuned forward time at the first batch size),
GFLOPs cut, and their ratio (1.0: the time follows the FLOPs).

Precision follows the project's rule (:func:`pipelines.common.precision.autocast`: bf16
autocast on CUDA, fp32 on the CPU). ``threads`` sets ``torch.set_num_threads``.
With ``mlflow_run_id`` or ``mlflow_experiment`` the headline figures are logged as
metrics and the whole document as an artifact (``bench_model.json``).
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from typing import Any

from pydantic import Field, field_validator, model_validator

from pipelines.common.errors import ExpectedFailure, InputNotFound
from pipelines.predict.settings import ForwardSettings
from step_model.bench import BASELINE, BenchModelSettings

MODES = ("plain", "tuned")


class TrainedBenchSettings(BenchModelSettings, ForwardSettings):
    """:class:`BenchModelSettings` plus a trained model; with ``model`` or ``checkpoint``
    the random-weights fields (backbone, image_size, exits, decoder, num_classes,
    reduce_zero_label) are not used and ``images`` is a folder of images (searched
    recursively, as ``step predict`` reads them) at their own size."""

    model: str | None = Field(None, description="models:/NAME/VERSION (@ALIAS, /latest): "
                              "bench this registered model with its registered settings",
                              json_schema_extra={"metavar": "URI"})
    checkpoint: str | None = Field(None, description="a checkpoint or Ray run directory: "
                                   "bench it with its own inference settings",
                                   json_schema_extra={"metavar": "URI"})
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (models:/ and "
                                     "logging; None: $MLFLOW_TRACKING_URI, else "
                                     "./runs/mlflow.db)")
    thresholds_from_registry: bool = Field(
        True, description="apply the settings registered with a models:/ version")
    batch_sizes: list[int] = Field([1], min_length=1, description="images per forward, "
                                   "each measured (e.g. 1,4,8)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's)")
    warmup: int = Field(2, ge=0, description="untimed batches per mode before timing")
    max_images: int | None = Field(None, ge=1, description="use the first N images")
    parts: bool = Field(True, description="also time the forward by part")
    parts_images: int = Field(16, ge=1, description="images the part timings run on")
    predict: bool = Field(True, description="also time step predict's loop (decode, "
                          "forward, write)")
    mlflow_run_id: str | None = Field(None, description="log into this MLflow run")
    mlflow_experiment: str | None = Field(None, description="log into a new run of this "
                                          "MLflow experiment")

    @field_validator("batch_sizes", mode="before")
    @classmethod
    def _commas(cls, v: Any) -> Any:
        """``--batch-sizes 1,4,8`` as well as ``--batch-sizes 1 4 8``."""
        items = v.split(",") if isinstance(v, str) else v
        if isinstance(items, list):
            return [p for i in items for p in (i.split(",") if isinstance(i, str) else [i]) if p != ""]
        return v

    @model_validator(mode="after")
    def _one_model(self) -> TrainedBenchSettings:
        if self.model and self.checkpoint:
            raise ValueError("model, checkpoint: give one of them, not both")
        if self.model and not self.model.startswith("models:/"):
            raise ValueError(f"model: expected models:/NAME/VERSION, got {self.model!r} "
                             "(a checkpoint directory goes to checkpoint)")
        return self

    @property
    def trained(self) -> bool:
        return bool(self.model or self.checkpoint)


def measure_trained(s: TrainedBenchSettings) -> dict[str, Any]:
    """The benchmark of a trained model; returns the result document."""
    import torch

    from pipelines.common.precision import autocast
    from pipelines.predict.settings import PredictSettings
    from pipelines.predict.source import resolve_source

    device = torch.device(s.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExpectedFailure("device cuda: no CUDA device available")
    if s.threads:
        torch.set_num_threads(s.threads)
    with tempfile.TemporaryDirectory(prefix="step-bench-") as tmp:
        source = resolve_source(PredictSettings(
            model=s.model or s.checkpoint, images=s.images, out=tmp,
            thresholds_from_registry=s.thresholds_from_registry, inference=s.inference,
            tracking_uri=s.tracking_uri))
        model = _load(source, s, device)
        names, images = _images(s, device)

        def amp():
            return autocast(device, s.precision)

        doc: dict[str, Any] = {
            "model": s.model, "checkpoint": source.checkpoint,
            "registered_model": source.registered, "device": _device_name(device),
            "threads": torch.get_num_threads(), "precision": s.precision,
            **s.rewrites(), "io_threads": s.io_threads, "images_dir": s.images, "images": len(names), "image_size": list(images.shape[-2:]),
            "inference": {"plain": model.inference.apply(BASELINE).to_dict(),
                          "tuned": model.inference.to_dict()},
            "repeats": s.repeats, "warmup": s.warmup, "batch_sizes": list(s.batch_sizes),
        }
        doc.update(_flops(model, images))
        doc["counting"] = _counting(model, images, s.repeats)
        doc["by_batch"] = {}
        for bs in s.batch_sizes:
            entry = {"forward": _time_forward(model, images, bs, s, amp)}
            if s.parts:
                entry["parts"] = _time_parts(model, images[:s.parts_images], bs, s, amp)
            if s.predict:
                entry["predict"] = _time_predict(source, s, bs, tmp)
            doc["by_batch"][str(bs)] = entry
    doc["headline"] = headline(doc)
    _log_mlflow(s, doc)
    return doc


def _device_name(device) -> str:
    import torch

    return str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)


def _load(source, s: TrainedBenchSettings, device):
    from pipelines.common.checkpoint import load_model
    from step_model.config import InferenceConfig
    from step_model.fuse import prepare_for_inference

    model, _ = load_model(source.checkpoint, device=device)
    model.set_inference(InferenceConfig.model_validate(source.inference))
    prepare_for_inference(model, **s.rewrites())
    return model


def _images(s: TrainedBenchSettings, device):
    """The images of the folder's most common size, as one float tensor (N, 3, H, W)."""
    import numpy as np
    import torch

    from pipelines.predict.images import BadImage, list_images, read_image

    items, _ = list_images(s.images)
    decoded = []
    for item in items[:s.max_images] if s.max_images else items:
        try:
            decoded.append((item["name"], read_image(item["uri"])))
        except BadImage:
            continue
    if not decoded:
        raise InputNotFound(f"images {s.images}: no readable image")
    shape = Counter(im.shape for _, im in decoded).most_common(1)[0][0]
    kept = [(n, im) for n, im in decoded if im.shape == shape]
    x = torch.from_numpy(np.stack([im for _, im in kept])).permute(0, 3, 1, 2)
    return [n for n, _ in kept], x.float().div_(255).to(device)


def _batches(images, bs: int) -> list:
    return [images[i:i + bs] for i in range(0, len(images), bs)]


def _flops(model, images) -> dict[str, Any]:
    """GFLOPs per image (batch 1) of both modes; the policy network counted where it runs."""
    from step_model.flops import measure_gflops

    out: dict[str, Any] = {}
    for mode, changes in zip(MODES, (BASELINE, None), strict=True):
        with model.inference_scope(changes):
            counts = [measure_gflops(model, images[i:i + 1]) for i in range(len(images))]
        out[f"gflops_{mode}"] = {k: sum(c[k] for c in counts) / len(counts) for k in counts[0]}
    return out


def _counting(model, images, repeats: int) -> dict[str, Any]:
    """ms per image of the tuned forward (batch 1, no grad) under either FLOP counter,
    ``repeats`` passes, the two counters interleaved per image (the GFLOPs pass before
    warmed both up); ``same_counts``: every image counted alike by both."""
    import torch

    from step_model.bench_parts import stats
    from step_model.flops import flop_counter, flops_by_part

    root = type(model).__name__
    times: dict[str, list[float]] = {"flop_counter_mode": [], "part_counter": []}
    same = True
    with torch.no_grad():
        for _ in range(repeats):
            for i in range(len(images)):
                x, counted = images[i:i + 1], []
                for name, parts_of in (("flop_counter_mode", None), ("part_counter", model)):
                    t0 = time.perf_counter()
                    with flop_counter(parts_of=parts_of) as fc:
                        model(x)
                    times[name].append(1e3 * (time.perf_counter() - t0))
                    counted.append(flops_by_part(fc, root))
                same = same and counted[0] == counted[1]
    out: dict[str, Any] = {f"ms_per_image_{k}": stats(v) for k, v in times.items()}
    out["same_counts"] = same
    return out


def _time_forward(model, images, bs: int, s: TrainedBenchSettings, amp) -> dict[str, Any]:
    """ms per image of the forward + argmax, both modes interleaved per repeat."""
    from step_model.bench_parts import stats, time_modes

    runs = time_modes(model, _batches(images, bs), dict(zip(MODES, (BASELINE, None),
                                                             strict=True)),
                      warmup=s.warmup, repeats=s.repeats, autocast=amp)
    out: dict[str, Any] = {f"ms_per_image_{m}": stats(v) for m, v in runs.items()}
    for m in MODES:
        out[f"images_per_s_{m}"] = 1e3 / out[f"ms_per_image_{m}"]["median"]
    out["speedup"] = out["ms_per_image_plain"]["median"] / out["ms_per_image_tuned"]["median"]
    return out


def _time_parts(model, images, bs: int, s: TrainedBenchSettings, amp) -> dict[str, Any]:
    from step_model.bench_parts import time_parts

    out = {}
    for mode, changes in zip(MODES, (BASELINE, None), strict=True):
        with model.inference_scope(changes):
            out[mode] = time_parts(model, _batches(images, bs), s.repeats, amp)
    return out


def _time_predict(source, s: TrainedBenchSettings, bs: int, tmp: str) -> dict[str, Any]:
    """images/s of step predict's loop over the folder (decode, forward, write), both
    modes, ``repeats`` passes each, interleaved."""
    from pipelines.predict.images import list_images
    from pipelines.predict.palette import palette_for
    from pipelines.predict.predictor import Predictor
    from pipelines.predict.runner import run_batches
    from step_model.bench_parts import stats

    items, _ = list_images(s.images)
    items = items[:s.max_images] if s.max_images else items
    palette, _ = palette_for(None, source.num_classes)
    plan = {"checkpoint": source.checkpoint, "inference": source.inference,
            "device": s.device, "out": f"{tmp}/predict", "palette": palette.tolist(),
            "token_maps": False, "flops": False, "precision": s.precision,
            "rewrites": s.rewrites(), "io_threads": s.io_threads}
    predictor = Predictor(plan)
    predictor(items[:bs])  # warm-up
    runs: dict[str, list[float]] = {m: [] for m in MODES}
    forward_ms: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(s.repeats):
        for mode, changes in zip(MODES, (BASELINE, None), strict=True):
            with predictor.model.inference_scope(changes):
                t0 = time.perf_counter()
                records: list[dict[str, Any]] = []
                run_batches(predictor, items, bs, records.extend)
                seconds = time.perf_counter() - t0
            done = [r for r in records if r["status"] == "ok"]
            runs[mode].append(len(done) / seconds)
            forward_ms[mode].append(sum(r["forward_ms"] for r in done) / len(done))
    out: dict[str, Any] = {f"images_per_s_{m}": stats(v) for m, v in runs.items()}
    out.update({f"forward_ms_{m}": stats(v) for m, v in forward_ms.items()})
    out["speedup"] = out["images_per_s_tuned"]["median"] / out["images_per_s_plain"]["median"]
    out["io_threads"] = s.io_threads
    predictor.close()
    return out


def headline(doc: dict[str, Any]) -> dict[str, Any]:
    """Wall speedup, GFLOPs cut and their ratio (first batch size); the predict path's
    speedup against the forward's; the policy network's share of time against FLOPs;
    the tuned model's images/s at each batch size against the first."""
    first = str(doc["batch_sizes"][0])
    fwd = doc["by_batch"][first]["forward"]
    cut = doc["gflops_plain"]["total"] / doc["gflops_tuned"]["total"]
    out: dict[str, Any] = {
        "batch_size": int(first),
        "gflops_plain": doc["gflops_plain"]["total"], "gflops_tuned": doc["gflops_tuned"]["total"],
        "gflops_cut": cut, "ms_plain": fwd["ms_per_image_plain"]["median"],
        "ms_tuned": fwd["ms_per_image_tuned"]["median"], "wall_speedup": fwd["speedup"],
        "speedup_per_gflops_cut": fwd["speedup"] / cut,
        "spread_plain": fwd["ms_per_image_plain"]["spread"],
        "spread_tuned": fwd["ms_per_image_tuned"]["spread"],
    }
    counting = doc.get("counting")
    if counting:  # the counted forward over the bare one (the bare one: with its argmax)
        out.update({f"counted_ms_{k}": counting[f"ms_per_image_{k}"]["median"]
                    for k in ("flop_counter_mode", "part_counter")},
                   counting_same_counts=counting["same_counts"])
    parts = doc["by_batch"][first].get("parts")
    if parts and doc["gflops_tuned"]["total"]:
        t = parts["tuned"]
        time_share = t["policy"]["median"] / t["total"]["median"]
        flop_share = doc["gflops_tuned"]["policy"] / doc["gflops_tuned"]["total"]
        out.update(policy_time_share=time_share, policy_flop_share=flop_share,
                   policy_time_per_flop_share=time_share / flop_share if flop_share else None)
    for bs, entry in doc["by_batch"].items():
        if "predict" in entry:
            p = entry["predict"]["speedup"]
            out[f"predict_speedup_b{bs}"] = p
            out[f"predict_per_forward_speedup_b{bs}"] = p / entry["forward"]["speedup"]
        if bs != first:
            out[f"images_per_s_tuned_b{bs}_vs_b{first}"] = (
                entry["forward"]["images_per_s_tuned"] / fwd["images_per_s_tuned"])
    return out


def _log_mlflow(s: TrainedBenchSettings, doc: dict[str, Any]) -> None:
    if not (s.mlflow_run_id or s.mlflow_experiment):
        return
    from pipelines.tracking.runs import RunLogger, create_run, resolve_tracking_uri

    uri = resolve_tracking_uri(s.tracking_uri)
    run_id = s.mlflow_run_id or create_run(uri, s.mlflow_experiment, run_name="bench-model")
    log = RunLogger(run_id, uri)
    log.log_params({"bench.model": s.model or s.checkpoint, "bench.images": s.images,
                    "bench.batch_sizes": s.batch_sizes, "bench.device": doc["device"]})
    log.log_metrics({f"bench.{k}": float(v) for k, v in doc["headline"].items()
                     if isinstance(v, (int, float)) and v is not None})
    log.log_dict(doc, "bench_model.json")
    if not s.mlflow_run_id:
        log.end()
    doc["mlflow_run_id"] = run_id


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """What the command prints: the headline, then per batch size forward and predict."""
    h = doc["headline"]
    lines = [f"step bench model: {doc['checkpoint']} on {doc['device']} "
             f"({doc['threads']} threads), {doc['images']} images {doc['image_size']}",
             f"  batch {h['batch_size']}: plain {h['ms_plain']:.1f} ms, tuned "
             f"{h['ms_tuned']:.1f} ms per image -> wall speedup {h['wall_speedup']:.2f}x; "
             f"GFLOPs {h['gflops_plain']:.3g} -> {h['gflops_tuned']:.3g} "
             f"({h['gflops_cut']:.2f}x); speedup / GFLOPs cut {h['speedup_per_gflops_cut']:.2f}"]
    if h.get("policy_time_share") is not None:
        lines.append(f"  policy network: {h['policy_time_share']:.2f} of the tuned forward's "
                     f"time, {h['policy_flop_share']:.2f} of its GFLOPs")
    if h.get("counted_ms_part_counter") is not None:
        lines.append(f"  counting GFLOPs: the tuned forward takes "
                     f"{h['counted_ms_flop_counter_mode']:.1f} ms under FlopCounterMode, "
                     f"{h['counted_ms_part_counter']:.1f} ms under the part counter"
                     + ("" if h["counting_same_counts"] else " (COUNTS DIFFER)"))
    for bs, entry in doc["by_batch"].items():
        f = entry["forward"]
        line = (f"  batch {bs}: forward {f['images_per_s_plain']:.2f} -> "
                f"{f['images_per_s_tuned']:.2f} images/s ({f['speedup']:.2f}x)")
        if "predict" in entry:
            p = entry["predict"]
            line += (f"; step predict {p['images_per_s_plain']['median']:.2f} -> "
                     f"{p['images_per_s_tuned']['median']:.2f} images/s ({p['speedup']:.2f}x)")
        lines.append(line)
    return lines
