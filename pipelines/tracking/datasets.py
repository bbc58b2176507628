"""``step prep`` directories as MLflow dataset inputs (the UI's Dataset column, a run's Inputs).

A shard directory becomes a metadata-only dataset (the shards stay where they are) named
``<dataset>-<split>``: its source is the directory (local path or ``s3://``), its digest a
hash of the split's manifest rows (every sample's key and image / label sha256, so it
changes when any pixel does, and not when the shards are merely rewritten), its profile the
split, the sample count, the shard count and the classes. The split is the one the loaders
read: the only one, else ``train`` for training and ``val`` for evaluation.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Mapping
from typing import Any

from pipelines.common.errors import InputNotFound

# MLflow keeps at most 36 characters of a digest; 16 hex digits (64 bits) identify a split.
DIGEST_CHARS = 16
# contexts (the ``mlflow.data.context`` input tag) that read the training split
TRAINING_CONTEXTS = ("training", "train")


def manifest_digest(uri: str, split: str) -> str:
    """sha256 over the split's (key, image sha256, label sha256) rows, in key order."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from data_prep import storage

    try:
        data = storage.read_bytes(storage.join(uri, "manifest.parquet"))
    except FileNotFoundError:
        raise InputNotFound(f"{uri}: no manifest.parquet (not a `step prep` output, "
                                "or an unfinished one)") from None
    cols = ["key", "image_sha256", "label_sha256"]
    table = pq.read_table(io.BytesIO(data), columns=["split", *cols])
    table = table.filter(pc.equal(table["split"], split)).sort_by("key")
    h = hashlib.sha256()
    for key, image, label in zip(*(table[c].to_pylist() for c in cols), strict=True):
        h.update(f"{key}\t{image}\t{label}\n".encode())
    return h.hexdigest()[:DIGEST_CHARS]


def shard_dataset(uri: str, *, train: bool) -> dict[str, Any]:
    """Name, source URI, digest and profile of the split a loader reads from ``uri``."""
    from data_prep.info import read_dataset_info
    from pipelines.common.storage import absolute

    info = read_dataset_info(absolute(uri))
    split = info.pick_split(None, train)
    return {
        "name": f"{info.name}-{split}",
        "source": info.uri,
        "digest": manifest_digest(info.uri, split),
        "profile": {"split": split, "num_samples": info.num_samples[split],
                    "num_shards": len(info.shards(split)), "num_classes": info.num_classes,
                    "class_names": list(info.class_names)},
    }


def dataset_inputs(datasets: Mapping[str, str]) -> list:
    """``mlflow.entities.DatasetInput`` per ``{context: shard directory}``."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    class ShardDataset(MetaDataset):
        """A ``MetaDataset`` with a profile (MetaDataset has none)."""

        def __init__(self, source, name: str, digest: str, profile: dict[str, Any]):
            self._profile = profile
            super().__init__(source, name=name, digest=digest)

        @property
        def profile(self) -> dict[str, Any]:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    out = []
    for context, uri in datasets.items():
        if not uri:
            continue
        d = shard_dataset(uri, train=context in TRAINING_CONTEXTS)
        with warnings.catch_warnings():
            # a local path matches MLflow's local-artifact source twice (file: and plain)
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(d["source"])
        ds = ShardDataset(source, d["name"], d["digest"], d["profile"])
        out.append(DatasetInput(ds._to_mlflow_entity(),
                                tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return out
