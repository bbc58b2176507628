"""The halting protocol: what halting costs at the operating point, where, and whether the
exits know it. Per group of images (a recording, a city: ``data.groups``), and over all.

Three settings of one checkpoint on the same images (:func:`pipelines.analyze.tradeoff.
variant_inference`):

* ``plain``: policy ``none``, halting off (the tradeoff's ``plain``);
* ``merging_only``: the operating point's sharing, halting off (the tradeoff's ``dcts``);
* ``tuned``: sharing and halting (the tradeoff's ``step``).

mIoU of each, and ``drop_from_halting`` = merging only - tuned (mIoU points). Then, with
the layout fixed (the two runs share it: the same policy at the same thresholds):

* **halted and active pixels apart.** A labelled pixel is *halted* when the tuned run's
  token over it halted at an exit, *active* when it ran every block; per set (and per
  exit) its share of the labelled pixels and the pixel accuracy of the tuned run's
  segmentation and of the merging-only run's on the same pixels;
* **calibration of the exits.** Per exit, the tokens that halted there in the tuned run
  (their confidence decided that they halt) and, separately, every token reaching that
  exit in the merging-only run (the exit head itself, with no halting before it): a
  reliability table and the ECE (:mod:`pipelines.evaluate.calibration`). A token's
  prediction is the exit head's argmax and its confidence the maximum softmax probability;
  it is scored *per pixel*: against each labelled pixel it covers, weighted by pixels
  (a 8 x 8 supertoken weighs 64 cells' pixels, as its area does in mIoU). Its
  ``count`` is tokens, its ``weight`` labelled pixels.

The merging-only run is one forward with halting on, exit rule ``uniform`` and zero
tokens to halt at every exit (``halt_counts``): the exit heads run on every token and
nothing halts, so its segmentation is the halting-off forward's (``tests/test_halting_
protocol.py`` checks it) and one forward gives both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.analyze.ceiling import cell_counts, token_histograms
from pipelines.evaluate.calibration import DEFAULT_BINS, Reliability
from pipelines.evaluate.metrics import IGNORE_INDEX, per_image_confusion, scores_from_confusion
from step_model.config import PATCH, InferenceConfig
from step_model.flops import flop_counter

SETTINGS = ("plain", "merging_only", "tuned")
# the settings whose GFLOPs the protocol counts (counting the merging-only forward too
# tripled its time; its cost is the tradeoff's ``dcts`` row)
COUNTED = ("plain", "tuned")
OVERALL = "all images"


def protocol_inference(op: InferenceConfig) -> dict[str, InferenceConfig]:
    """The three settings' inference settings from the operating point."""
    from pipelines.analyze.tradeoff import variant_inference

    return {"plain": variant_inference("plain", op),
            "merging_only": variant_inference("dcts", op),
            "tuned": variant_inference("step", op)}


class _Group:
    """One group's sums."""

    def __init__(self, num_classes: int, exits: list[str], bins: int) -> None:
        self.images = 0
        self.gflops = torch.zeros(len(SETTINGS), dtype=torch.float64)  # summed over images
        self.confusion = torch.zeros(len(SETTINGS), num_classes, num_classes, dtype=torch.int64)
        # pixel sets: every exit, "halted" (any exit), "active"; columns: labelled pixels,
        # right in the tuned run, right in the merging-only run
        self.pixels = {k: torch.zeros(3, dtype=torch.float64)
                       for k in (*exits, "halted", "active")}
        self.halted = {e: Reliability(bins) for e in exits}
        self.reaching = {e: Reliability(bins) for e in exits}

    def merge(self, other: _Group) -> _Group:
        out = _Group.__new__(_Group)
        out.images = self.images + other.images
        out.gflops = self.gflops + other.gflops
        out.confusion = self.confusion + other.confusion
        out.pixels = {k: v + other.pixels[k] for k, v in self.pixels.items()}
        out.halted = {e: r.merge(other.halted[e]) for e, r in self.halted.items()}
        out.reaching = {e: r.merge(other.reaching[e]) for e, r in self.reaching.items()}
        return out

    def result(self) -> dict[str, Any]:
        miou = {s: _nan_none(scores_from_confusion(self.confusion[i]).miou)
                for i, s in enumerate(SETTINGS)}
        drop = None if None in (miou["merging_only"], miou["tuned"]) \
            else 100.0 * (miou["merging_only"] - miou["tuned"])
        labelled = float(self.pixels["halted"][0] + self.pixels["active"][0])
        pixels = {}
        for k, (n, right_tuned, right_merged) in self.pixels.items():
            n = float(n)
            pixels[k] = {"pixels": n, "share": n / labelled if labelled else None,
                         "accuracy_tuned": float(right_tuned) / n if n else None,
                         "accuracy_merging_only": float(right_merged) / n if n else None}
        gflops = {s: _nan_none(float(self.gflops[i]) / self.images) if self.images else None
                  for i, s in enumerate(SETTINGS)}
        return {
            "images": self.images, "miou": miou, "drop_from_halting": drop, "gflops": gflops,
            "pixels": pixels,
            "calibration": {e: {"halted": self.halted[e].result(),
                                "reaching": self.reaching[e].result()}
                            for e in self.halted},
        }


def _nan_none(v: float) -> float | None:
    return None if v != v else v


class HaltingMeter:
    """Sums of the protocol per group; :meth:`update` takes one batch's three forwards."""

    def __init__(self, num_classes: int, exit_blocks: list[int], depth: int,
                 bins: int = DEFAULT_BINS, temperatures: list[float] | None = None) -> None:
        self.num_classes = num_classes
        self.exit_blocks = list(exit_blocks)
        self.temperatures = temperatures or [1.0] * len(self.exit_blocks)
        self.exits = [f"exit_{b}" for b in self.exit_blocks]
        self.depth = depth
        self.bins = bins
        self.groups: dict[str, _Group] = {}

    def _group(self, name: str) -> _Group:
        if name not in self.groups:
            self.groups[name] = _Group(self.num_classes, self.exits, self.bins)
        return self.groups[name]

    def update(self, groups: list[str], labels: torch.Tensor, plain, merged, tuned,
               gflops: tuple[float | None, ...] = (None, None, None)) -> None:
        """One batch: ``groups`` (one name per image), labels (B, H, W), and the outputs
        of the plain, merging-only (exit heads run, nothing halted) and tuned forwards;
        ``gflops``: what each of the three forwards executed, per image of the batch
        (None: not counted)."""
        labels = labels.cpu()
        preds = [o.logits.argmax(1).cpu() for o in (plain, merged, tuned)]
        confusion = torch.stack([per_image_confusion(p, labels, self.num_classes)
                                 for p in preds], 1)  # (B, 3, C, C)
        depth_px = _pixel_map(tuned.flow.cell_exit_depth.cpu(), labels.shape[-2:])
        labelled = labels != IGNORE_INDEX
        right_tuned = (preds[2] == labels) & labelled
        right_merged = (preds[1] == labels) & labelled
        cells = cell_counts(labels, self.num_classes).double()
        cells = cells.reshape(cells.shape[0], -1, self.num_classes)  # (B, G, C)
        halted_tok = _token_scores(tuned, cells, self.exit_blocks, self.temperatures)
        reaching_tok = _token_scores(merged, cells, self.exit_blocks, self.temperatures)
        for b, name in enumerate(groups):
            g = self._group(name)
            g.images += 1
            g.gflops += torch.tensor([float("nan") if v is None else v for v in gflops],
                                     dtype=torch.float64)
            g.confusion += confusion[b]
            sets = {e: depth_px[b] == blk for e, blk in zip(self.exits, self.exit_blocks,
                                                            strict=True)}
            sets["halted"] = depth_px[b] < self.depth
            sets["active"] = depth_px[b] >= self.depth
            for k, sel in sets.items():
                m = sel & labelled[b]
                g.pixels[k] += torch.tensor([float(m.sum()), float((right_tuned[b] & m).sum()),
                                             float((right_merged[b] & m).sum())],
                                            dtype=torch.float64)
            for e, blk in zip(self.exits, self.exit_blocks, strict=True):
                t = halted_tok.get(e)  # None: no exit ran (a forward without halting)
                if t is not None:
                    g.halted[e].add(*t.pick(b, t.depth[b] == blk))
                t = reaching_tok.get(e)
                if t is not None:
                    g.reaching[e].add(*t.pick(b, t.present[b]))

    def result(self) -> dict[str, Any]:
        """``{groups: {group: figures}, overall: figures}``, groups sorted by name."""
        names = sorted(self.groups)
        overall = None
        for name in names:
            overall = self.groups[name] if overall is None else overall.merge(self.groups[name])
        return {"groups": {n: self.groups[n].result() for n in names},
                "overall": overall.result() if overall is not None else None}


def _pixel_map(cell_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, gh, gw) per cell -> (B, H, W) per pixel (the padding cropped)."""
    h, w = size
    return cell_map.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)[:, :h, :w]


@dataclass
class _Tokens:
    """One exit's tokens in one forward, each (B, N) on the CPU: the exit head's
    confidence, labelled pixels of its predicted class and all labelled pixels of the
    token, the blocks the token ran through, whether it was present at the exit."""

    confidence: torch.Tensor
    right: torch.Tensor
    pixels: torch.Tensor
    depth: torch.Tensor
    present: torch.Tensor

    def pick(self, b: int, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(confidence, right, pixels) of image ``b``'s tokens in ``mask`` that cover a
        labelled pixel."""
        keep = mask & (self.pixels[b] > 0)
        return self.confidence[b][keep], self.right[b][keep], self.pixels[b][keep]


def _token_scores(out, cells: torch.Tensor, exit_blocks: list[int],
                  temperatures: list[float]) -> dict[str, _Tokens]:
    """{exit name: its tokens} for every exit that ran in ``out``; ``cells``: (B, G, C)
    labelled pixels per grid cell and class; ``temperatures``: one per exit."""
    flow = out.flow
    c2t = flow.cell_to_token.cpu()
    depth_cells = flow.cell_exit_depth.cpu().reshape(c2t.shape)
    res = {}
    # a forward without halting runs no exit (eval mode): then there is nothing to zip
    for blk, t, logits, valid in zip(exit_blocks, temperatures, out.exit_logits,
                                     out.exit_valid, strict=False):
        n = logits.shape[1]
        conf, pred = (logits.detach().float() / t).softmax(-1).max(-1)
        hist = token_histograms(cells, c2t, n)  # (B, N, C)
        # every cell of a token ran as deep as the token: any of them gives its depth
        depth = torch.zeros(c2t.shape[0], n, dtype=torch.long).scatter(1, c2t, depth_cells)
        right = hist.gather(-1, pred.cpu()[..., None]).squeeze(-1)
        res[f"exit_{blk}"] = _Tokens(conf.cpu(), right, hist.sum(-1), depth, valid.cpu())
    return res


def merging_only_forward(model, images: torch.Tensor, labels: torch.Tensor,
                         setting: InferenceConfig):
    """The merging-only forward (``setting``: halting off) with every exit head run on
    every token: halting on, exit rule ``uniform``, zero tokens to halt at each exit."""
    exits = len(model.exit_blocks)
    model.set_inference(setting, halting=True, exit_policy="uniform")
    zeros = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    out = model(images, labels, halt_counts=[zeros] * exits if exits else None)
    if exits and int(out.flow.halted_per_exit.sum()):
        raise RuntimeError("the merging-only forward halted tokens")
    return out


def run_protocol(model, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor,
                                                               list[str]]]],
                 *, num_classes: int, op: InferenceConfig, bins: int = DEFAULT_BINS,
                 echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``batches()`` yields (images, labels, group of each image) on the model's device.
    Returns the ``halting`` part of the analysis (:meth:`HaltingMeter.result` and the
    three settings)."""
    settings = protocol_inference(op)
    meter = HaltingMeter(num_classes, list(model.exit_blocks), model.encoder.depth, bins,
                         temperatures=op.temperatures_per_exit(len(model.exit_blocks)))
    with torch.no_grad():
        for images, labels, groups in batches():
            # GFLOPs counted on what executes (policy network included), for the plain and
            # the tuned forward: counting dispatches every operator through Python, which
            # tripled the protocol's time when the merging-only forward was counted too
            with flop_counter(parts_of=model) as count:
                model.set_inference(settings["plain"])
                plain = model(images, labels)
            g_plain = count.get_total_flops() / 1e9 / len(groups)
            merged = merging_only_forward(model, images, labels, settings["merging_only"])
            with flop_counter(parts_of=model) as count:
                model.set_inference(settings["tuned"])
                tuned = model(images, labels)
            g_tuned = count.get_total_flops() / 1e9 / len(groups)
            meter.update(groups, labels, plain, merged, tuned, (g_plain, None, g_tuned))
    model.set_inference(op)
    if echo is not None:
        echo(f"analyze: halting protocol on {sum(g.images for g in meter.groups.values())} "
             f"images in {len(meter.groups)} group(s)")
    return {"inference": {k: v.to_dict() for k, v in settings.items()},
            "exits": meter.exits, "bins": bins, **meter.result()}
