"""``step bench gpu``: the GPU readiness check, one JSON, at most ~5 minutes on one GPU.

No CUDA path runs in CI (the reference machine has no GPU), so this command is what a
session with a borrowed GPU, or a user on their first GPU node, runs before anything long:

Run it from the repository root (it reads ``configs/`` and ``demo_data/``).

1. ``train``: a few bf16 training steps of the tiny STEP config through Ray Train with the
   NCCL backend (1 GPU worker), on the bundled demo data sharded on the spot. Proves the
   device placement, autocast, NCCL process group, checkpoint and evaluation paths.
2. ``varlen``: one ViT block on a batch with mixed token counts, ``pad_mask`` against
   ``per_image`` (:mod:`step_model.varlen`): the largest difference of their outputs on the
   valid tokens (fp32 and bf16), and the time of each. ``padding_overhead`` compares the
   padded call with a rectangular batch of the same token total (no padding, no mask: about
   what a packed variable-length kernel could reach): above 0.15 a packed strategy is
   worth adding.
3. ``model``: ``step bench model --device cuda`` (ViT-B at 1024), learned-policy path
   (``threshold``, the shipped ImageNet EfficientNet-Lite0 with untrained heads: a compute
   figure, not an accuracy one) and oracle path (labels used: an upper bound).

Each part is independent: a failing part is recorded with its error and the others run.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from typing import Any, Literal

from pydantic import Field

from pipelines.common.errors import ExpectedFailure
from pipelines.common.settings import StrictModel

Part = Literal["train", "varlen", "model"]


class BenchGpuSettings(StrictModel):
    parts: list[Part] = Field(default_factory=lambda: ["train", "varlen", "model"],
                              description="parts to run (train varlen model)")
    device: Literal["cuda", "cpu"] = Field("cuda", description="cpu only to smoke-test this "
                                           "command itself")
    backbone: str = Field("vit_base_patch16_384", description="timm backbone (varlen, model)")
    tokens: int = Field(4096, ge=1, description="longest image's tokens (varlen)")
    batch: int = Field(8, ge=1, description="images per varlen batch")
    repeats: int = Field(10, ge=1, description="timed repeats (varlen)")
    train_steps: int = Field(6, ge=1, description="training steps (train)")


def _timed(fn, device, repeats: int) -> float:
    """Median milliseconds of ``fn()`` after two warm-up calls."""
    import torch

    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]


def bench_varlen(device, backbone: str, tokens: int, batch: int, repeats: int) -> dict[str, Any]:
    import timm
    import torch

    from step_model.varlen import run_block

    torch.manual_seed(0)
    block = timm.create_model(backbone, pretrained=False).blocks[0].to(device).eval()
    dim = block.norm1.normalized_shape[0]
    # mixed counts, as dCTS + halting leave them: from 30% to 100% of the longest
    lengths = [max(1, round(tokens * (0.3 + 0.7 * i / max(batch - 1, 1)))) for i in range(batch)]
    x = torch.randn(batch, tokens, dim, device=device)
    # the same token total in a rectangular batch (no padding, no mask): what a packed
    # variable-length kernel could reach
    dense = torch.randn(batch, round(sum(lengths) / batch), dim, device=device)
    out: dict[str, Any] = {"backbone": backbone, "lengths": lengths,
                           "padding_fraction": 1 - sum(lengths) / (batch * tokens)}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype == torch.bfloat16 and device.type != "cuda":
            continue
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype,
                                             enabled=dtype != torch.float32):
            a = run_block(block, x, lengths, "per_image")
            b = run_block(block, x, lengths, "pad_mask")
            diff = max(float((a[i, :n].float() - b[i, :n].float()).abs().max())
                       for i, n in enumerate(lengths))
            res = {
                "max_abs_diff": diff,
                "per_image_ms": _timed(lambda: run_block(block, x, lengths, "per_image"),
                                       device, repeats),
                "pad_mask_ms": _timed(lambda: run_block(block, x, lengths, "pad_mask"),
                                      device, repeats),
                "no_padding_ms": _timed(lambda: block(dense), device, repeats),
            }
        res["padding_overhead"] = res["pad_mask_ms"] / res["no_padding_ms"] - 1
        out[name] = res
    return out


def bench_train(device_type: str, steps: int) -> dict[str, Any]:
    from data_prep.prep import prepare
    from pipelines.common.cluster import init_ray
    from pipelines.train.config import load_train_config
    from pipelines.train.trainer import fit

    init_ray()
    with tempfile.TemporaryDirectory(prefix="step-bench-gpu-") as tmp:
        for split in ("train", "val"):
            prepare("loveda", "demo_data/loveda", f"{tmp}/{split}", split="train",
                    max_side=256, samples_per_shard=1, progress=False)
        use_gpu = device_type == "cuda"
        cfg = load_train_config("configs/tiny/step.yaml", [
            f"data.train={tmp}/train", f"data.val={tmp}/val", f"train.steps={steps}",
            "train.checkpoint_every=1000", "train.log_every=1", "train.max_failures=0",
            f"train.precision={'bf16' if use_gpu else 'fp32'}", "scaling.num_workers=1",
            f"scaling.use_gpu={str(use_gpu).lower()}", f"storage.storage_path={tmp}/ray",
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", "mlflow.log_model=false",
            "name=bench-gpu",
        ], stage="step")
        t0 = time.perf_counter()
        result = fit(cfg)
        return {"backend": "nccl" if use_gpu else "gloo", "steps": steps,
                "seconds": time.perf_counter() - t0,
                "metrics": {k: v for k, v in result.metrics.items()
                            if isinstance(v, int | float)}}


def bench_model(device_type: str, backbone: str) -> dict[str, Any]:
    from step_model.bench import BenchModelSettings, measure

    return {policy: measure(BenchModelSettings(
        backbone=backbone, image_size=1024, exits=[6, 8], device=device_type, repeats=3,
        inference={"policy_mode": policy, "exit_thresholds": 0.9}))
        for policy in ("threshold", "oracle")}


def bench(args: BenchGpuSettings) -> tuple[dict[str, Any], bool]:
    """Run the parts; returns (the report, whether a part failed)."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ExpectedFailure("no CUDA device (use --device cpu only to smoke-test)")
    device = torch.device(args.device)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda"
                              else "cpu", "torch": torch.__version__}
    parts = {
        "varlen": lambda: bench_varlen(device, args.backbone, args.tokens, args.batch,
                                       args.repeats),
        "train": lambda: bench_train(device.type, args.train_steps),
        "model": lambda: bench_model(device.type, args.backbone),
    }
    failed = False
    for name in args.parts:
        t0 = time.perf_counter()
        try:
            report[name] = parts[name]()
        except Exception as err:  # noqa: BLE001 - recorded; the other parts still run
            failed = True
            report[name] = {"error": f"{type(err).__name__}: {err}",
                            "traceback": traceback.format_exc()}
        report[name]["part_seconds"] = time.perf_counter() - t0
        print(f"step bench gpu: {name} done in {report[name]['part_seconds']:.1f}s", flush=True)
    return report, failed
