"""Training and evaluation batches from ``step prep`` shards, through ``data_prep``'s loader.

One loader per Ray Train worker, built inside the worker: the training loader splits
shards by ``torch.distributed`` rank, then by DataLoader worker; the evaluation loader
splits *samples* (contiguous ranges, balanced to within one sample), so that every rank has
work even when the validation split is a single shard. (Ray Data feeding Ray Train
deadlocks with 2 workers on 2 CPUs: its read tasks never get a CPU, measured with Ray 2.60.)

The training loader, which reads a ``TrainConfig``, is :mod:`pipelines.train.data`.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from typing import Literal

import torch

from pipelines.common.errors import InvalidInput
from pipelines.common.groups import key_grouper
from pipelines.common.holdout import is_held_out

log = logging.getLogger(__name__)


_SHARD_PATTERN = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(\{[0-9.]+\}|[0-9]{6})\.tar$")


def resolve_data_uri(uri: str) -> tuple[str, str | None]:
    """(shard directory, split or None) for what ``data.train`` / ``data.val`` may name:
    the directory itself, its ``manifest.parquet`` (or ``sizes.json`` / ``dataset.json``),
    or a shard URL / brace pattern such as ``.../val-{000000..000009}.tar``, whose prefix
    picks the split. A pattern stands for its whole split: the loader splits shards itself.
    """
    uri = str(uri).rstrip("/")
    head, name = (posixpath if "://" in uri else os.path).split(uri)
    head = head or "."
    if name in ("manifest.parquet", "sizes.json", "dataset.json"):
        return head, None
    m = _SHARD_PATTERN.match(name)
    if m:
        return head, m.group("split")
    return uri, None


def batch_to_device(images, labels, device):
    """Move a loader batch to ``device`` as float [0, 1] images and int64 labels.

    Loaders here yield uint8 (``to_float=False``) and the conversion happens on the device:
    `step bench data` measured the float32/int64 host-side batch at 0.78x of pure decode
    throughput against 0.97x for uint8, and uint8 moves 4x (images) / 8x (labels) fewer
    bytes over PCIe. Float batches (other callers) pass through unchanged.
    """
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    return images, labels.long()


def eval_loader(uri: str, *, batch_size: int = 1, num_workers: int = 1,
                rank: int | None = None, world_size: int | None = None,
                max_samples: int | None = None, holdout=None,
                part: Literal["search", "holdout", "groups"] = "search",
                with_keys: bool = False):
    """Every sample of ``uri`` once, whole images at their own resolution.

    Under DDP each rank reads its own contiguous range of samples, sizes differing by at
    most 1 across ranks (the confusion matrices are summed afterwards). ``max_samples`` is
    a global cap: the first ``max_samples`` samples of the split, split across the ranks,
    the same images whatever the number of ranks (pass the same value to
    ``evaluate_model``). The loader's ``num_samples`` is this rank's share and
    ``total_samples`` the count over all ranks.

    ``holdout`` (a :class:`pipelines.common.holdout.Holdout` or its dict) with
    ``part="search"`` leaves the held-out images out: a held-out fraction or held-out
    groups are filtered by key (``max_samples`` then counts the images kept), and a
    held-out split may not be the split read. ``part="holdout"`` yields only the held-out
    images: those keys of the split, or the held-out split of ``uri``. ``part="groups"``
    yields the images of the held-out groups only (no fraction: the training split's
    images that ``from_training`` kept from the trainings). ``with_keys`` adds the sample
    keys as a third batch element.
    """
    from data_prep.loader import build_loader

    uri, split = resolve_data_uri(uri)
    holdout = as_holdout(holdout)
    keep = None
    if holdout is not None:
        if holdout.split is not None and part == "holdout":
            split = holdout.split  # a whole split: nothing to filter
        else:
            if part == "search" and holdout.split is not None \
                    and _picked_split(uri, split) == holdout.split:
                raise InvalidInput(f"{uri}: split {holdout.split!r} is held out from the search")
            keep = key_filter(uri, holdout, part)
    if keep is None:
        return build_loader(uri, split=split, batch_size=batch_size, crop_size=None,
                            train=False, num_workers=num_workers, rank=rank,
                            world_size=world_size, to_float=False, max_samples=max_samples,
                            with_keys=with_keys)
    if max_samples is not None and (world_size or 1) > 1:
        raise InvalidInput("max_samples with held-out keys needs a single-process "
                         "evaluation (world_size=1)")
    inner = build_loader(uri, split=split, batch_size=batch_size, crop_size=None, train=False,
                         num_workers=num_workers, rank=rank, world_size=world_size,
                         to_float=False, with_keys=True)
    kept = sum(map(keep, split_keys(uri, _picked_split(uri, split))))
    if max_samples is not None:
        kept = min(kept, max_samples)
    return KeyFilter(inner, keep, max_samples, with_keys, total=kept,
                     single=(world_size or 1) == 1)


def key_filter(uri: str, holdout, part: str):
    """key -> whether ``part`` (search | holdout | groups) of the split keeps it; None when
    ``holdout`` filters nothing there (the search, with only a held-out split)."""
    h = as_holdout(holdout)
    if part not in ("search", "holdout", "groups"):
        raise ValueError(f"part must be 'search', 'holdout' or 'groups', got {part!r}")
    groups = frozenset(h.groups) if h is not None else frozenset()
    fraction = h.fraction if h is not None and part != "groups" else None
    if fraction is None and not groups:
        if part == "search":
            return None
        return lambda key: False
    grouper = key_grouper(uri, h.group_by) if groups else None

    def in_group(key: str) -> bool:
        return grouper is not None and grouper(key) in groups

    def held(key: str) -> bool:
        return (fraction is not None and is_held_out(key, fraction)) or in_group(key)

    if part == "groups":
        return in_group
    if part == "holdout":
        return held
    return lambda key: not held(key)


class KeyFilter:
    """An evaluation loader that passes on only the samples whose key ``keep`` accepts,
    up to ``max_samples`` of them (the held-out images are read and dropped: the shards do
    not know the split, and decoding a few images costs less than a second copy of them)."""

    def __init__(self, loader, keep, max_samples: int | None, with_keys: bool, *,
                 total: int, single: bool):
        self.loader, self.keep, self.max_samples = loader, keep, max_samples
        self.with_keys = with_keys
        self.total_samples = total
        self.num_samples = total if single else None

    def __iter__(self):
        seen = 0
        for images, labels, keys in self.loader:
            idx = [i for i, k in enumerate(keys) if self.keep(k)]
            if self.max_samples is not None:
                idx = idx[: self.max_samples - seen]
            if not idx:
                continue
            sel = torch.tensor(idx)
            batch = (images[sel], labels[sel])
            yield (*batch, [keys[i] for i in idx]) if self.with_keys else batch
            seen += len(idx)
            if self.max_samples is not None and seen >= self.max_samples:
                return


def as_holdout(value):
    """A :class:`pipelines.common.holdout.Holdout` from itself, its dict, or None."""
    from pipelines.common.holdout import Holdout

    if value is None or isinstance(value, Holdout):
        return value
    return Holdout.model_validate(value)


def split_keys(uri: str, split: str) -> list[str]:
    """The sample keys of ``split`` in ``uri``'s manifest."""
    import io

    import pyarrow.parquet as pq

    from data_prep import storage

    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(uri, "manifest.parquet"))),
                          columns=["split", "key"])
    return [k for s, k in zip(table.column("split").to_pylist(),
                              table.column("key").to_pylist(), strict=True) if s == split]


def holdout_keys(uri: str, holdout) -> tuple[set[str], set[str]]:
    """(searched keys, held-out keys) of the split that ``uri`` names (a held-out split
    leaves the whole split to the search)."""
    uri, split = resolve_data_uri(uri)
    keys = split_keys(uri, _picked_split(uri, split))
    keep = key_filter(uri, holdout, "search") if holdout is not None else None
    if keep is None:
        return set(keys), set()
    searched = {k for k in keys if keep(k)}
    return searched, set(keys) - searched


def _picked_split(uri: str, split: str | None) -> str:
    from data_prep.info import read_dataset_info

    return read_dataset_info(uri).pick_split(split, False)


def dataset_info(uri: str):
    from data_prep.info import read_dataset_info

    return read_dataset_info(resolve_data_uri(uri)[0])
