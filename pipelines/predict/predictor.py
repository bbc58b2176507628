"""The model on one worker (this process, or a Ray Data actor): images in, files and
per-image records out.

A call gets a batch of inputs (``{"uri", "name"}``), decodes them (a bad one becomes a
``skipped`` record), groups them by size (a forward needs one size; the model pads each
size to a multiple of 16 itself and crops the logits back) and runs one forward per
group, under the project's autocast rule (:func:`pipelines.common.precision.autocast`:
bf16 on CUDA), with the policy network's batch norms folded (:mod:`step_model.fuse`).
With ``flops`` the forward runs under ``step_model.flop_counter``, the counter
``measure_gflops`` uses, so the GFLOPs are those of the forward that produced the masks,
policy and halting included; each image of a group gets the group's mean, which is its
own exact count at batch size 1.

With ``io_threads`` the images are decoded and the files written on a thread pool, so
that the runner can decode the next batch (:func:`pipelines.predict.runner.
run_batches`) and the files of this one are written while the next forward runs. The
counter intercepts every operator in Python, which
costs more than the tuned model's small operators themselves: ``forward_ms`` of a
counted forward is not the model's time (``flops`` is off by default).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from pipelines.common.errors import ExpectedFailure, InvalidInput
from pipelines.predict.images import BadImage, read_image
from pipelines.predict.writer import output_paths, write_outputs


def _read(item: dict[str, str]) -> np.ndarray | BadImage:
    try:
        return read_image(item["uri"])
    except BadImage as err:
        return err


class Predictor:
    """Holds the model; ``plan`` is the runner's picklable description of the job."""

    def __init__(self, plan: dict[str, Any]) -> None:
        import torch

        from pipelines.common.checkpoint import load_model
        from step_model.config import stored_inference

        self.plan = plan
        self.device = torch.device(plan["device"])
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ExpectedFailure(f"--device {plan['device']}: no CUDA device on this machine")
        self.model, _ = load_model(plan["checkpoint"], device=self.device)
        self.model.set_inference(stored_inference(plan["inference"]))
        # eval-only rewrites of the policy network (ForwardSettings.rewrites)
        from step_model.fuse import prepare_for_inference

        prepare_for_inference(self.model, **plan.get("rewrites", {}))
        if self.model.inference.policy_mode == "oracle":
            raise InvalidInput("policy mode 'oracle' needs labels (see --policy-mode)")
        self.depth = int(self.model.encoder.depth)
        self.palette = np.asarray(plan["palette"], dtype=np.uint8)
        # decoding and writing on threads, overlapping the forward (0: in line)
        threads = int(plan.get("io_threads", 0))
        self._pool = ThreadPoolExecutor(threads, "predict-io") if threads else None
        self._writes: list[Future] = []

    def __call__(self, items: list[dict[str, str]]) -> list[dict[str, Any]]:
        """Decode, forward and write one batch; its files are written when this returns."""
        records = self.run(items, self.decode(items))
        self.flush()
        return records

    @property
    def io_pool(self) -> ThreadPoolExecutor | None:
        return self._pool

    def decode(self, items: list[dict[str, str]], parallel: bool = True
               ) -> list[np.ndarray | BadImage]:
        """The batch's images (a bad one as its :class:`BadImage`), decoded on the I/O
        threads (PNG/JPEG decoding releases the GIL) unless ``parallel`` is False (a
        task already on them)."""
        if self._pool is None or not parallel:
            return [_read(item) for item in items]
        return list(self._pool.map(_read, items))

    def run(self, items: list[dict[str, str]], decoded: list[np.ndarray | BadImage]
            ) -> list[dict[str, Any]]:
        """Forward and write decoded images; with I/O threads the files are written in the
        background (:meth:`flush` waits for them and raises their errors)."""
        records: list[dict[str, Any] | None] = [None] * len(items)
        groups: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
        for i, (item, image) in enumerate(zip(items, decoded, strict=True)):
            if isinstance(image, BadImage):
                records[i] = {"image": item["uri"], "name": item["name"], "status": "skipped",
                              "reason": image.reason, "detail": image.detail}
                continue
            groups.setdefault(image.shape[:2], []).append((i, image))
        for group in groups.values():
            for i, rec in zip([i for i, _ in group], self._forward(
                    [items[i] for i, _ in group], [im for _, im in group]), strict=True):
                records[i] = rec
        return [r for r in records if r is not None]

    def flush(self) -> None:
        """Wait for the files being written; the first write error is raised."""
        pending, self._writes = self._writes, []
        for f in pending:
            f.result()

    def close(self) -> None:
        """Stop the I/O threads after the pending writes (their errors are :meth:`flush`'s
        to raise: closing after a failure must not hide the first error)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._writes = []

    def _forward(self, items: list[dict[str, str]], images: list[np.ndarray]
                 ) -> list[dict[str, Any]]:
        import torch

        x = torch.from_numpy(np.stack(images)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255)
        b = x.shape[0]
        from pipelines.common.precision import autocast

        split: dict[str, float] | None = None
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast(self.device, self.plan.get("precision", "auto")):
            if self.plan["flops"]:
                from step_model.flops import flop_counter, flops_by_part

                with flop_counter(parts_of=self.model) as fc:
                    out = self.model(x)
                split = flops_by_part(fc, type(self.model).__name__)
            else:
                out = self.model(x)
            masks = out.logits.argmax(1).to(torch.uint8).cpu().numpy()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = (time.perf_counter() - t0) / b
        flow = out.flow
        tokens = flow.num_tokens.cpu().tolist()
        halted = flow.halted_per_exit.sum(1).cpu().tolist()
        levels = flow.cell_level.cpu().numpy() if self.plan["token_maps"] else None
        depths = flow.cell_exit_depth.cpu().numpy() if self.plan["token_maps"] else None
        records = []
        for j, (item, image) in enumerate(zip(items, images, strict=True)):
            cells = None if levels is None else {
                "level": levels[j], "depth": depths[j], "max_depth": self.depth}
            args = (self.plan["out"], item["name"], image, masks[j], self.palette, cells)
            if self._pool is None:
                paths = write_outputs(*args)
            else:
                self._writes.append(self._pool.submit(write_outputs, *args))
                paths = output_paths(item["name"], cells is not None)
            records.append({
                "image": item["uri"], "name": item["name"], "status": "ok",
                "height": int(image.shape[0]), "width": int(image.shape[1]),
                "outputs": paths, "batch": b,
                "gflops": None if split is None else split["total"] / b,
                "gflops_split": None if split is None else {k: v / b for k, v in split.items()
                                                            if k != "total"},
                "tokens": int(tokens[j]), "tokens_in": int(flow.tokens_in),
                "halted": int(halted[j]),
                "halted_fraction": float(halted[j]) / tokens[j] if tokens[j] else 0.0,
                "forward_ms": 1000 * seconds,
            })
        return records
