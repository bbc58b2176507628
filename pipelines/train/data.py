"""The training loader of a ``TrainConfig``: shards split by rank, then DataLoader worker.

``data.exclude_groups`` skips every training image of those groups (``data.groups``), in
every stage: the held-out check then measures a condition no weight was fitted on.

``data.resample: auto`` switches to sampling shards with replacement, with a warning,
only when a dataset has fewer shards than ranks x DataLoader workers (tiny datasets):
then a rank could otherwise get no shard at all.
"""

from __future__ import annotations

import warnings

from pipelines.common.data import resolve_data_uri
from pipelines.common.errors import InvalidInput
from pipelines.train.config import TrainConfig


def augment_config(cfg: TrainConfig) -> dict:
    d = cfg.data
    return {"scale_min": d.scale_range[0], "scale_max": d.scale_range[1],
            "hflip": 0.5 if d.hflip else 0.0, "photometric": d.photometric}


def excluded_keys(cfg: TrainConfig) -> frozenset[str]:
    """The training keys of ``data.exclude_groups`` (empty without). A group with no
    training image is an error naming the groups found: a misspelt group would otherwise
    train on the images a held-out check counts as unseen."""
    d = cfg.data
    if not d.exclude_groups:
        return frozenset()
    from data_prep.info import read_dataset_info
    from pipelines.common.groups import group_counts, split_groups

    uri, split = resolve_data_uri(d.train)
    split = read_dataset_info(uri).pick_split(split, True)
    groups = split_groups(uri, split, d.groups)
    missing = sorted(set(d.exclude_groups) - set(groups.values()))
    if missing:
        raise InvalidInput(f"data.exclude_groups: {missing} not in the training split "
                         f"{split!r} of {uri} (its groups by {d.groups.describe()}: "
                         f"{group_counts(groups.values())})")
    return frozenset(k for k, g in groups.items() if g in set(d.exclude_groups))


def train_loader(cfg: TrainConfig, *, epoch: int):
    from data_prep.loader import build_loader

    uri, split = resolve_data_uri(cfg.data.train)
    kwargs = dict(split=split, batch_size=cfg.data.batch_size, crop_size=cfg.data.crop_size, train=True,
                  seed=cfg.train.seed, epoch=epoch, num_workers=cfg.data.num_workers,
                  augment=augment_config(cfg), to_float=False,
                  exclude_keys=excluded_keys(cfg))
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
