"""``step bench model``: the plain ViT and the STEP model, same weights, same run.

The baseline is the same module with policy ``none`` and halting off (its inference
settings are switched between calls with ``model.inference_scope``, so weights, threads
and caches are shared). Both run on real
image/label pairs (default: the LoveDA fixtures, 1024 x 1024), interleaved image by image
so that load from other processes hits both alike; ``latency_ms*`` is the best of the
repeats per image, averaged over images (``*_mean`` keep the means). FLOPs are counted on what executes
(:func:`step_model.flops.measure_gflops`, fused attention included), once per image;
the first counted pass doubles as warm-up. The default path is the learned policy
(``threshold``): the policy network runs and is counted. ``flop_reduction`` always includes
the policy network, also in ``oracle`` mode, where it does not run but a deployed model
would (``flop_reduction_excl_policy`` leaves it out). The oracle chooses tokens from the
labels: its results carry ``uses_labels`` / ``upper_bound``.
Weights are random (seed 0): compute figures do not depend on them, but halting and the
policy's choices do, so token counts and halting here show the mechanics, not a trained
model's behaviour.

:class:`BenchModelSettings` is the typed input of :func:`measure`; the ``step bench
model`` command (``pipelines/cli/bench_model.py``) is generated from it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from .config import InferenceConfig, InferenceOverrides, StrictModel


class BenchInputError(ValueError):
    """Settings that cannot run here (no images, no CUDA device): the user's to fix."""


# the demo's LoveDA scenes, shipped in the repository (relative to its root, like configs/)
DEFAULT_IMAGES = Path("demo_data/loveda")


class BenchModelSettings(StrictModel):
    """What :func:`measure` benchmarks: an architecture, its inference settings, images."""

    backbone: str = Field("vit_base_patch16_384", description="timm ViT with 16x16 patches")
    image_size: int = Field(1024, ge=16, description="square side (resized if the images differ)")
    exits: list[int] = Field([], description="exit blocks, 1-based (none: no exits)")
    decoder: Literal["linear", "mask"] = "linear"
    inference: InferenceOverrides = Field(
        InferenceOverrides(), description="the STEP model's inference settings, changes to "
        "the defaults (the learned policy in mode threshold); oracle uses the labels: an "
        "upper bound, labelled as such")
    images: str = Field(str(DEFAULT_IMAGES), description="folder with img_dir/ and ann_dir/")
    num_classes: int = Field(7, ge=1)
    reduce_zero_label: bool = Field(
        True, description="raw 0 = ignore and c -> c-1, as LoveDA (off: labels are train ids)")
    device: Literal["cpu", "cuda"] = "cpu"
    repeats: int = Field(2, ge=1, description="timed passes per image (best one counts)")

    def step_inference(self) -> InferenceConfig:
        """The STEP model's settings: the defaults with ``inference`` applied."""
        return InferenceConfig().apply(self.inference)


# the baseline: the same module, plain 16x16 tokens and no halting
BASELINE = {"policy_mode": "none", "halting": False}


def load_pairs(folder: Path, size: int, reduce_zero_label: bool):
    """Real (image float [0,1] (1,3,S,S), label int64 (1,S,S)) pairs from img_dir/ + ann_dir/."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    img_dir, ann_dir = folder / "img_dir", folder / "ann_dir"
    if not img_dir.is_dir() or not ann_dir.is_dir():
        raise BenchInputError(f"images {folder}: expected img_dir/ and ann_dir/ inside")
    pairs = []
    for img_path in sorted(img_dir.iterdir()):
        ann_path = ann_dir / (img_path.stem + ".png")
        if not ann_path.is_file():
            raise BenchInputError(f"{img_path}: no label {ann_path}")
        img = torch.from_numpy(np.asarray(Image.open(img_path).convert("RGB")).copy())
        lab = torch.from_numpy(np.asarray(Image.open(ann_path)).astype(np.int64))
        if reduce_zero_label:
            lab = torch.where(lab == 0, 255, lab - 1)
        img = img.permute(2, 0, 1)[None].float() / 255.0
        lab = lab[None]
        if img.shape[-2:] != (size, size):
            img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)
            lab = F.interpolate(lab[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
        pairs.append((img_path.name, img, lab))
    if not pairs:
        raise BenchInputError(f"images {folder}: no images in img_dir/")
    return pairs


def measure(settings: BenchModelSettings, prepare: dict | None = None) -> dict:
    """The benchmark; returns the result document.

    ``prepare``: the inference rewrites timed (:func:`step_model.fuse.prepare_for_inference`'s
    keywords: ``fold_batchnorm``, ``channels_last``, ``compile_policy``), applied after the
    FLOPs are counted (they change no FLOP that is counted) and followed by one untimed
    forward per mode, so that a compilation is not timed."""
    import torch

    from .config import ExitConfig, PolicyConfig, StepConfig
    from .model import build_step_model

    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchInputError("device cuda: no CUDA device available")
    inference = settings.step_inference()
    cfg = StepConfig(backbone=settings.backbone, num_classes=settings.num_classes,
                     decoder=settings.decoder, policy=PolicyConfig(),
                     exits=ExitConfig(blocks=settings.exits))
    torch.manual_seed(0)
    model = build_step_model(cfg, inference).to(device).eval()
    pairs = [(n, i.to(device), lab.to(device)) for n, i, lab in
             load_pairs(Path(settings.images), settings.image_size, settings.reduce_zero_label)]
    per_image, flows = count_per_image(model, pairs)
    rewrites: dict = {}
    if prepare:
        from .fuse import prepare_for_inference

        rewrites = prepare_for_inference(model, **prepare)
        _, img, lab = pairs[0]
        for changes in (BASELINE, None):
            with model.inference_scope(changes):
                _forward(model, img, lab)
    time_interleaved(model, pairs, per_image, settings.repeats)
    device_name = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
    return {**summarize(settings, device_name, model, per_image, flows), "rewrites": rewrites}


# what the command prints (the JSON file has everything)
SUMMARY_KEYS = ("policy", "uses_labels", "upper_bound", "tokens_in", "tokens_mean",
                "halted_fraction", "gflops_baseline", "gflops", "gflops_policy_net",
                "latency_ms_baseline", "latency_ms", "flop_reduction", "speedup", "cpu_speedup")


def _forward(model, img, lab):
    import torch

    with torch.no_grad():
        return model(img, lab)


def count_per_image(model, pairs) -> tuple[list[dict], list[dict]]:
    """FLOPs (baseline, STEP split by part, the policy network alone) and the token flow of
    each image; these passes double as warm-up. Returns (per-image records with empty
    latency lists, flow summaries)."""
    import torch

    from .flops import flop_counter, measure_gflops

    per_image, flows = [], []
    for name, img, lab in pairs:
        with model.inference_scope(BASELINE):
            g_base = measure_gflops(model, img, lab)
        g_step = measure_gflops(model, img, lab)
        with torch.no_grad(), flop_counter() as counter:
            model.policy.eval()(img)
        flow = _forward(model, img, lab).flow.summary()
        flows.append(flow)
        per_image.append({"image": name, "gflops_baseline": g_base["total"], "gflops": g_step,
                          "gflops_policy_net": counter.get_total_flops() / 1e9,
                          "tokens": flow["num_tokens"][0], "latency_ms_baseline": [], "latency_ms": [],
                          "cpu_ms_baseline": [], "cpu_ms": []})
    return per_image, flows


def time_interleaved(model, pairs, per_image: list[dict], repeats: int) -> None:
    """``repeats`` rounds of baseline then STEP, image by image, appending wall and process
    CPU milliseconds to each record's ``latency_ms*`` / ``cpu_ms*`` lists."""
    import torch

    on_cuda = next(model.parameters()).device.type == "cuda"

    def sync() -> None:  # CUDA runs asynchronously: wait for the kernels before reading the clock
        if on_cuda:
            torch.cuda.synchronize()

    for _ in range(repeats):
        for rec, (_, img, lab) in zip(per_image, pairs, strict=True):
            for suffix, changes in (("_baseline", BASELINE), ("", None)):
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                with model.inference_scope(changes):
                    _forward(model, img, lab)
                sync()
                rec["latency_ms" + suffix].append((time.perf_counter() - t0) * 1e3)
                rec["cpu_ms" + suffix].append((time.process_time() - c0) * 1e3)


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def summarize(settings: BenchModelSettings, device_name: str, model, per_image: list[dict],
              flows: list[dict]) -> dict:
    """The result JSON: per-image means of tokens, FLOPs and latencies, and their ratios."""
    mean = _mean
    n = len(per_image)
    g_base = sum(r["gflops_baseline"] for r in per_image)
    parts = {k: sum(r["gflops"][k] for r in per_image) for k in ("policy", "encoder", "exits", "decoder", "total")}
    policy_net = sum(r["gflops_policy_net"] for r in per_image)
    # oracle runs no policy; a deployed model would: its cost is part of every headline
    inference = model.inference
    oracle = inference.policy_mode == "oracle"
    incl_policy = parts["total"] + (policy_net if oracle else 0.0)
    # best of the repeats per image: on a shared machine the minimum is the estimate of the
    # uncontended latency (as timeit does); the means are reported next to it
    lat_base = mean([min(r["latency_ms_baseline"]) for r in per_image])
    lat_step = mean([min(r["latency_ms"]) for r in per_image])
    cpu_base = mean([min(r["cpu_ms_baseline"]) for r in per_image])
    cpu_step = mean([min(r["cpu_ms"]) for r in per_image])
    lat_base_mean = mean([mean(r["latency_ms_baseline"]) for r in per_image])
    lat_step_mean = mean([mean(r["latency_ms"]) for r in per_image])
    depth = len(flows[0]["tokens_per_block"][0])
    tokens = [f["num_tokens"][0] for f in flows]
    halted = sum(sum(f["halted_per_exit"][0]) for f in flows)
    return {
        "backbone": settings.backbone,
        "image_size": settings.image_size,
        "device": device_name,
        "images": n,
        "policy": inference.policy_mode,
        # the oracle reads the labels: an upper bound, never a model's result
        "uses_labels": oracle,
        "upper_bound": oracle,
        "policy_weights": "random heads (seed 0): the choices show the mechanics only"
        if inference.policy_mode in ("threshold", "budget") else None,
        "exits": list(model.exit_blocks),
        "exit_thresholds": list(inference.exit_thresholds),
        "varlen": inference.varlen,
        "inference": inference.to_dict(),
        "repeats": settings.repeats,
        "tokens_in": flows[0]["tokens_in"],
        "tokens_mean": mean(tokens),
        "tokens_per_block": [mean([f["tokens_per_block"][0][i] for f in flows]) for i in range(depth)],
        "supertokens_per_level": {s: mean([f["supertokens_per_level"][s][0] for f in flows]) for s in flows[0]["supertokens_per_level"]},
        "halted_fraction": halted / sum(tokens),
        "gflops_baseline": g_base / n,
        "gflops": parts["total"] / n,
        "gflops_policy": parts["policy"] / n,
        "gflops_encoder": parts["encoder"] / n,
        "gflops_exits": parts["exits"] / n,
        "gflops_decoder": parts["decoder"] / n,
        "gflops_policy_net": policy_net / n,
        "policy_fraction_of_baseline": policy_net / g_base,
        "gflops_incl_policy": incl_policy / n,
        "latency_ms_baseline": lat_base,
        "latency_ms": lat_step,
        "latency_ms_baseline_mean": lat_base_mean,
        "latency_ms_mean": lat_step_mean,
        "speedup_mean": lat_base_mean / lat_step_mean,
        # process CPU time (all threads): less sensitive to other processes than wall time
        "cpu_ms_baseline": cpu_base,
        "cpu_ms": cpu_step,
        "cpu_speedup": cpu_base / cpu_step,
        "flop_reduction": g_base / incl_policy,
        "flop_reduction_excl_policy": g_base / (parts["total"] - parts["policy"]),
        "speedup": lat_base / lat_step,
        "per_image": per_image,
    }
