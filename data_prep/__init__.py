"""data_prep: segmentation datasets -> deterministic WebDataset shards -> training batches.

Public API (see docs/data.md)::

    report = prepare("loveda", src, out, split="train", samples_per_shard=64)  # `step prep`
    info = read_dataset_info(out)          # num_classes, class_names, ignore_index=255, ...
    loader = build_loader(out, batch_size=8, crop_size=512, train=True, seed=0, epoch=0,
                          num_workers=2, augment=AugmentConfig())
    for images, labels in loader:          # float [0,1] (B,3,h,w), int64 (B,h,w), 255 = ignore
        ...

Imports are lazy so ``import data_prep`` stays cheap (Ray and torch load on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "AugmentConfig",
    "DatasetError",
    "DatasetInfo",
    "IGNORE_INDEX",
    "PrepError",
    "PrepReport",
    "READERS",
    "SegLoader",
    "build_loader",
    "prepare",
    "read_dataset_info",
    "split_shards",
]

_WHERE = {
    "AugmentConfig": "data_prep.augment",
    "DatasetError": "data_prep.errors",
    "IGNORE_INDEX": "data_prep.conventions",
    "READERS": "data_prep.readers",
    "DatasetInfo": "data_prep.info",
    "read_dataset_info": "data_prep.info",
    "PrepError": "data_prep.prep",
    "PrepReport": "data_prep.prep",
    "prepare": "data_prep.prep",
    "SegLoader": "data_prep.loader",
    "build_loader": "data_prep.loader",
    "split_shards": "data_prep.loader",
}

if TYPE_CHECKING:
    from data_prep.augment import AugmentConfig
    from data_prep.conventions import IGNORE_INDEX
    from data_prep.info import DatasetInfo, read_dataset_info
    from data_prep.loader import SegLoader, build_loader, split_shards
    from data_prep.prep import PrepError, PrepReport, prepare
    from data_prep.readers import READERS, DatasetError


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'data_prep' has no attribute {name!r}")
