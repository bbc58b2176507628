"""Timing tools of the trained-model benchmark: the forward timed whole and by part.

The parts follow the forward's pieces (:meth:`StepSegmenter.forward_tokens`,
``forward_encoder``, ``forward_head``): ``policy`` (the policy network), ``embedding``
(padding, superpatch selection and the supertoken embedding: ``forward_tokens`` less the
policy network), ``blocks_1-K`` (the blocks up to the first exit K), one ``blocks_K+1-L``
per later segment, ``exit_heads``, ``norm_halting`` (the encoder's own bookkeeping: token
dropping, the final norm), ``decoder``, ``upsample_argmax`` (``forward_head`` less the
decoder, plus the argmax a mask needs). Pieces are timed around their calls; the modules
inside them (policy, blocks, exit heads, decoder) by forward hooks, every timer read after
a device synchronisation, so the hooks' synchronisations make a part-timed forward slower
on CUDA than an untimed one: the whole forward is timed separately, without hooks.

Statistics: the median of the repeats (robust to a shared machine's bursts) and the
spread, (max - min) / median, so that a reader sees how far one repeat is from another.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued kernels (CUDA runs asynchronously;
    the clock must not be read before they finish); a no-op on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def stats(values: list[float]) -> dict[str, float]:
    """median, min, max and spread ((max - min) / median) of repeated measurements."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / med if med else 0.0, "n": len(values)}


def segments(exit_blocks: list[int], depth: int) -> list[tuple[int, int]]:
    """The encoder's segments, 1-based inclusive block ranges: up to the first exit, then
    between exits, then after the last one (one segment without exits)."""
    bounds = [b for b in sorted(exit_blocks) if b < depth] + [depth]
    out, start = [], 1
    for end in bounds:
        out.append((start, end))
        start = end + 1
    return out


def segment_name(seg: tuple[int, int]) -> str:
    return f"blocks_{seg[0]}-{seg[1]}"


class PartTimer:
    """Accumulates milliseconds per part over forwards (hooks on the model's modules)."""

    def __init__(self, model, sync: Callable[[], None]) -> None:
        self.model, self.sync = model, sync
        self.ms: dict[str, float] = defaultdict(float)
        self._open: dict[str, float] = {}
        depth = model.encoder.depth
        self.block_part = {}
        for seg in segments(list(model.exit_blocks), depth):
            for i in range(seg[0], seg[1] + 1):
                self.block_part[i] = segment_name(seg)

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.ms[name] += (time.perf_counter() - t0) * 1e3

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """Forward hooks on the policy network, each block, the exit heads and the decoder."""
        m = self.model
        modules = [("policy", m.policy), ("exit_heads", m.exit_heads), ("decoder", m.decoder)]
        modules += [(self.block_part[i], b) for i, b in enumerate(m.encoder.blocks, start=1)]
        handles = []
        for name, module in modules:
            children = list(module) if isinstance(module, torch.nn.ModuleList) else [module]
            for child in children:
                handles.append(child.register_forward_pre_hook(self._start(name, child)))
                handles.append(child.register_forward_hook(self._stop(name, child)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _start(self, name, module):
        def hook(*_):
            self.sync()
            self._open[id(module)] = time.perf_counter()
        return hook

    def _stop(self, name, module):
        def hook(*_):
            self.sync()
            self.ms[name] += (time.perf_counter() - self._open.pop(id(module))) * 1e3
        return hook


def timed_forward(model, images: torch.Tensor, timer: PartTimer) -> torch.Tensor:
    """One forward through the pieces with every part timed; returns the masks (B, H, W)."""
    with timer.hooks():
        with timer.part("_tokens"):
            tokens = model.forward_tokens(images)
        with timer.part("_encoder"):
            encoded = model.forward_encoder(tokens)
        with timer.part("_head"):
            logits, _ = model.forward_head(tokens, encoded)
            masks = logits.argmax(1)
    return masks


def split_parts(ms: dict[str, float], calls: int) -> dict[str, float]:
    """The accumulated timings -> ms per forward by part, the pieces less their modules."""
    per = {k: v / calls for k, v in ms.items()}
    blocks = {k: v for k, v in per.items() if k.startswith("blocks_")}
    out = {"policy": per.get("policy", 0.0),
           "embedding": per["_tokens"] - per.get("policy", 0.0),
           **dict(sorted(blocks.items(), key=lambda kv: int(kv[0].split("_")[1].split("-")[0]))),
           "exit_heads": per.get("exit_heads", 0.0),
           "norm_halting": per["_encoder"] - sum(blocks.values()) - per.get("exit_heads", 0.0),
           "decoder": per.get("decoder", 0.0),
           "upsample_argmax": per["_head"] - per.get("decoder", 0.0)}
    out["total"] = per["_tokens"] + per["_encoder"] + per["_head"]
    return out


def time_parts(model, batches: list[torch.Tensor], repeats: int,
               autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, dict]:
    """ms per forward (per batch) by part: median and spread over ``repeats`` passes over
    ``batches`` (one warm pass before them, untimed)."""
    sync = synchronizer(batches[0].device)
    runs: dict[str, list[float]] = defaultdict(list)
    with torch.inference_mode(), autocast():
        for b in batches:  # warm-up
            model.forward_head(*_tokens_encoded(model, b))
        for _ in range(repeats):
            timer = PartTimer(model, sync)
            for b in batches:
                timed_forward(model, b, timer)
            for k, v in split_parts(timer.ms, len(batches)).items():
                runs[k].append(v)
    return {k: stats(v) for k, v in runs.items()}


def _tokens_encoded(model, images):
    tokens = model.forward_tokens(images)
    return tokens, model.forward_encoder(tokens)


def time_modes(model, batches: list[torch.Tensor], modes: dict[str, Any], *, warmup: int,
               repeats: int, autocast: Callable[[], contextlib.AbstractContextManager]
               ) -> dict[str, list[float]]:
    """ms per image of the forward + argmax over ``batches``, per mode ({name: inference
    changes for ``model.inference_scope``}): ``warmup`` untimed batches per mode, then
    ``repeats`` rounds, each running every mode once over all batches, one after the
    other, so that a burst of load from other processes hits the modes alike."""
    sync = synchronizer(batches[0].device)
    n = sum(b.shape[0] for b in batches)
    runs: dict[str, list[float]] = {m: [] for m in modes}
    with torch.inference_mode(), autocast():
        for changes in modes.values():
            with model.inference_scope(changes):
                for b in batches[:warmup]:
                    forward_masks(model, b)
        for _ in range(repeats):
            for mode, changes in modes.items():
                with model.inference_scope(changes):
                    sync()
                    t0 = time.perf_counter()
                    for b in batches:
                        forward_masks(model, b)
                    sync()
                runs[mode].append((time.perf_counter() - t0) * 1e3 / n)
    return runs


def forward_masks(model, images: torch.Tensor) -> torch.Tensor:
    """The masks of one forward (what a user gets: the argmax)."""
    return model(images).logits.argmax(1)
