"""``step bench model``: the plain ViT and the STEP model, same weights, same run.

The baseline is the same module with policy ``none`` and halting off (the config is
switched between calls, so weights, threads and caches are shared). Both run on real
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
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# the demo's LoveDA scenes, shipped in the repository (relative to its root, like configs/)
DEFAULT_IMAGES = Path("demo_data/loveda")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="vit_base_patch16_384")
    parser.add_argument("--image-size", type=int, default=1024, help="square side (resized if the images differ)")
    parser.add_argument("--policy", default="threshold", choices=["none", "oracle", "threshold", "budget"],
                        help="oracle: tokens from the labels, an upper bound")
    parser.add_argument("--merge-thresholds", type=float, nargs=4, metavar=("T2", "T4", "T8", "T16"), default=None)
    parser.add_argument("--budget", type=float, default=None, help="fraction of tokens kept (policy budget)")
    parser.add_argument("--exits", type=int, nargs="*", default=[], help="exit blocks, 1-based (none: no exits)")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.95], help="exit thresholds")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--exit-policy", default="confidence", choices=["confidence", "random", "uniform"])
    parser.add_argument("--decoder", default="linear", choices=["linear", "mask"])
    parser.add_argument("--varlen", default="auto", choices=["auto", "per_image", "pad_mask"])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder with img_dir/ and ann_dir/")
    parser.add_argument("--num-classes", type=int, default=7)
    parser.add_argument("--no-reduce-zero-label", dest="reduce_zero_label", action="store_false",
                        help="labels are already 0..C-1 / 255 (default: 0 = ignore, c -> c-1, as LoveDA)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")


def load_pairs(folder: Path, size: int, reduce_zero_label: bool):
    """Real (image float [0,1] (1,3,S,S), label int64 (1,S,S)) pairs from img_dir/ + ann_dir/."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    img_dir, ann_dir = folder / "img_dir", folder / "ann_dir"
    if not img_dir.is_dir() or not ann_dir.is_dir():
        raise FileNotFoundError(f"--images {folder}: expected img_dir/ and ann_dir/ inside")
    pairs = []
    for img_path in sorted(img_dir.iterdir()):
        ann_path = ann_dir / (img_path.stem + ".png")
        if not ann_path.is_file():
            raise FileNotFoundError(f"{img_path}: no label {ann_path}")
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
        raise FileNotFoundError(f"--images {folder}: no images in img_dir/")
    return pairs


def measure(args: argparse.Namespace) -> dict:
    """The benchmark (``args`` as :func:`configure` defines them); returns the result."""
    import torch

    from .model import build_step_model

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    step_cfg, base_cfg = bench_configs(args)
    torch.manual_seed(0)
    model = build_step_model(step_cfg).to(device).eval()
    pairs = [(n, i.to(device), lab.to(device)) for n, i, lab in load_pairs(args.images, args.image_size, args.reduce_zero_label)]
    per_image, flows = count_per_image(model, pairs, step_cfg, base_cfg)
    time_interleaved(model, pairs, per_image, step_cfg, base_cfg, args.repeats)
    device_name = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
    return summarize(args, device_name, step_cfg, per_image, flows)


def run(args: argparse.Namespace) -> int:
    result = measure(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in SUMMARY_KEYS}, indent=2))
    return 0


# what the command prints (the JSON file has everything)
SUMMARY_KEYS = ("policy", "uses_labels", "upper_bound", "tokens_in", "tokens_mean",
                "halted_fraction", "gflops_baseline", "gflops", "gflops_policy_net",
                "latency_ms_baseline", "latency_ms", "flop_reduction", "speedup", "cpu_speedup")


def bench_configs(args: argparse.Namespace):
    """(STEP config from the options, baseline config: the same with policy ``none`` and
    halting off)."""
    from .config import ExitConfig, PolicyConfig, StepConfig

    policy = {"mode": args.policy}
    if args.merge_thresholds:
        policy["thresholds"] = dict(zip((2, 4, 8, 16), args.merge_thresholds, strict=True))
    if args.budget is not None:
        policy["budget"] = args.budget
    step_cfg = StepConfig(
        backbone=args.backbone, num_classes=args.num_classes, decoder=args.decoder, varlen=args.varlen,
        policy=PolicyConfig(**policy),
        exits=ExitConfig(blocks=args.exits, thresholds=args.thresholds, top_k=args.top_k, policy=args.exit_policy),
    )
    base_cfg = step_cfg.model_copy(update={
        "policy": step_cfg.policy.model_copy(update={"mode": "none"}),
        "exits": step_cfg.exits.model_copy(update={"halting": False}),
    })
    return step_cfg, base_cfg


def _forward(model, cfg, img, lab):
    import torch

    model.cfg = cfg
    with torch.no_grad():
        return model(img, lab)


def count_per_image(model, pairs, step_cfg, base_cfg) -> tuple[list[dict], list[dict]]:
    """FLOPs (baseline, STEP split by part, the policy network alone) and the token flow of
    each image; these passes double as warm-up. Returns (per-image records with empty
    latency lists, flow summaries)."""
    import torch

    from .flops import flop_counter, measure_gflops

    per_image, flows = [], []
    for name, img, lab in pairs:
        model.cfg = base_cfg
        g_base = measure_gflops(model, img, lab)
        model.cfg = step_cfg
        g_step = measure_gflops(model, img, lab)
        with torch.no_grad(), flop_counter() as counter:
            model.policy.eval()(img)
        flow = _forward(model, step_cfg, img, lab).flow.summary()
        flows.append(flow)
        per_image.append({"image": name, "gflops_baseline": g_base["total"], "gflops": g_step,
                          "gflops_policy_net": counter.get_total_flops() / 1e9,
                          "tokens": flow["num_tokens"][0], "latency_ms_baseline": [], "latency_ms": [],
                          "cpu_ms_baseline": [], "cpu_ms": []})
    return per_image, flows


def time_interleaved(model, pairs, per_image: list[dict], step_cfg, base_cfg, repeats: int) -> None:
    """``repeats`` rounds of baseline then STEP, image by image, appending wall and process
    CPU milliseconds to each record's ``latency_ms*`` / ``cpu_ms*`` lists."""
    import torch

    on_cuda = next(model.parameters()).device.type == "cuda"

    def sync() -> None:  # CUDA runs asynchronously: wait for the kernels before reading the clock
        if on_cuda:
            torch.cuda.synchronize()

    for _ in range(repeats):
        for rec, (_, img, lab) in zip(per_image, pairs, strict=True):
            for suffix, cfg in (("_baseline", base_cfg), ("", step_cfg)):
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                _forward(model, cfg, img, lab)
                sync()
                rec["latency_ms" + suffix].append((time.perf_counter() - t0) * 1e3)
                rec["cpu_ms" + suffix].append((time.process_time() - c0) * 1e3)


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def summarize(args: argparse.Namespace, device_name: str, step_cfg, per_image: list[dict],
              flows: list[dict]) -> dict:
    """The result JSON: per-image means of tokens, FLOPs and latencies, and their ratios."""
    mean = _mean
    n = len(per_image)
    g_base = sum(r["gflops_baseline"] for r in per_image)
    parts = {k: sum(r["gflops"][k] for r in per_image) for k in ("policy", "encoder", "exits", "decoder", "total")}
    policy_net = sum(r["gflops_policy_net"] for r in per_image)
    # oracle runs no policy; a deployed model would: its cost is part of every headline
    oracle = args.policy == "oracle"
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
        "backbone": args.backbone,
        "image_size": args.image_size,
        "device": device_name,
        "images": n,
        "policy": args.policy,
        # the oracle reads the labels: an upper bound, never a model's result
        "uses_labels": oracle,
        "upper_bound": oracle,
        "policy_weights": "random heads (seed 0): the choices show the mechanics only"
        if args.policy in ("threshold", "budget") else None,
        "exits": list(step_cfg.exits.blocks or []),
        "exit_thresholds": list(args.thresholds),
        "varlen": args.varlen,
        "repeats": args.repeats,
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
