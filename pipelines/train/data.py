"""The training loader of a ``TrainConfig``: shards split by rank, then DataLoader worker.

``data.resample: auto`` switches to sampling shards with replacement, with a warning,
only when a dataset has fewer shards than ranks x DataLoader workers (tiny datasets):
then a rank could otherwise get no shard at all.
"""

from __future__ import annotations

import warnings

from pipelines.common.data import resolve_data_uri
from pipelines.train.config import TrainConfig


def augment_config(cfg: TrainConfig) -> dict:
    d = cfg.data
    return {"scale_min": d.scale_range[0], "scale_max": d.scale_range[1],
            "hflip": 0.5 if d.hflip else 0.0, "photometric": d.photometric}


def train_loader(cfg: TrainConfig, *, epoch: int):
    from data_prep.loader import build_loader

    uri, split = resolve_data_uri(cfg.data.train)
    kwargs = dict(split=split, batch_size=cfg.data.batch_size, crop_size=cfg.data.crop_size, train=True,
                  seed=cfg.train.seed, epoch=epoch, num_workers=cfg.data.num_workers,
                  augment=augment_config(cfg), to_float=False)
    if cfg.data.resample is True:
        return build_loader(uri, resample=True, **kwargs)
    try:
        return build_loader(uri, **kwargs)
    except ValueError as err:
        if cfg.data.resample is False or "shard" not in str(err):
            raise
        if epoch == 0:
            warnings.warn(f"{err} -> data.resample=auto: sampling shards with replacement",
                          RuntimeWarning, stacklevel=2)
        return build_loader(uri, resample=True, **kwargs)
