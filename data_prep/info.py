"""What a shard directory holds: ``dataset.json`` + ``sizes.json`` -> :class:`DatasetInfo`."""

from __future__ import annotations

import json
from dataclasses import dataclass

from data_prep import storage
from data_prep.errors import DatasetError, DatasetNotFound
from data_prep.shards import SHARD_RE


@dataclass(frozen=True)
class DatasetInfo:
    uri: str
    name: str
    num_classes: int
    class_names: tuple[str, ...]
    ignore_index: int  # always 255
    num_samples: dict[str, int]  # split -> samples
    shard_sizes: dict[str, int]  # shard file name -> samples

    @property
    def splits(self) -> list[str]:
        return sorted(self.num_samples)

    def shards(self, split: str) -> list[str]:
        """Shard file names of ``split``, in order."""
        return sorted(n for n in self.shard_sizes if SHARD_RE.match(n).group("split") == split)

    def shard_uris(self, split: str) -> list[str]:
        return [storage.join(self.uri, n) for n in self.shards(split)]

    def pick_split(self, split: str | None, train: bool) -> str:
        if split is None:
            split = self.splits[0] if len(self.splits) == 1 else ("train" if train else "val")
        if split not in self.num_samples:
            raise DatasetError(f"{self.uri}: no split {split!r} (has {self.splits})")
        if not self.shards(split):
            raise DatasetError(f"{self.uri}: split {split!r} has no shards")
        return split


def read_dataset_info(uri: str) -> DatasetInfo:
    """Read the description of a ``step prep`` output directory (local or ``s3://``)."""
    uri = str(uri).rstrip("/") if storage.is_s3(uri) else str(uri)
    try:
        meta = json.loads(storage.read_bytes(storage.join(uri, "dataset.json")))
        sizes = json.loads(storage.read_bytes(storage.join(uri, "sizes.json")))
    except FileNotFoundError as err:
        raise DatasetNotFound(
            f"{uri}: not a step prep output ({err.args[0] if err.args else err} missing); run `step prep` first"
        ) from None
    num_samples: dict[str, int] = {}
    for name, n in sizes.items():
        m = SHARD_RE.match(name)
        if m is None:
            raise ValueError(f"{uri}/sizes.json: {name!r} is not a shard name")
        num_samples[m.group("split")] = num_samples.get(m.group("split"), 0) + int(n)
    return DatasetInfo(
        uri=uri,
        name=meta["name"],
        num_classes=int(meta["num_classes"]),
        class_names=tuple(meta["class_names"]),
        ignore_index=int(meta["ignore_index"]),
        num_samples=num_samples,
        shard_sizes={k: int(v) for k, v in sizes.items()},
    )
