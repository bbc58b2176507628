"""The images the halting protocol measures: shard sets, each whole or only some groups.

A held-out group is often stored with the images it was kept from: the CamVid pipeline
keeps its dusk recording from training (``data.holdout: {groups: [0001TP],
from_training: true}``), so those images sit in the *training* split's shards next to the
images the model was trained on. A :class:`MeasuredSet` with ``groups`` reads only those
groups' images of its shards (``eval_loader(part="groups")``, the held-out check's own
filter); without, the whole set (a validation split, or a held-out split of its own).

Every image is named by its group (``groups``: a key pattern or manifest column), or, with
no groups defined, by its set's label (``data`` / ``holdout``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class MeasuredSet:
    data: str  # a shard directory (or a manifest / shard pattern naming a split)
    label: str  # the images' group when no groups are defined
    groups: tuple[str, ...] = ()  # only these groups' images (empty: every image)


@dataclass
class SetCounts:
    """Images read per set (a held-out group name that matches nothing shows as 0)."""

    images: dict[str, int] = field(default_factory=dict)


def measured_sets(data: str, holdout_data: list[str], holdout_groups: list[str]
                  ) -> list[MeasuredSet]:
    """``data`` whole, then each of ``holdout_data`` (only ``holdout_groups``, if any)."""
    return [MeasuredSet(data, "data"),
            *(MeasuredSet(uri, "holdout", tuple(holdout_groups)) for uri in holdout_data)]


def protocol_batches(sets: list[MeasuredSet], groups, *, batch_size: int,
                     max_samples: int | None, device: str, counts: SetCounts | None = None
                     ) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]]:
    """A function yielding (images, labels, group of each image) on ``device`` over every
    set in turn (``max_samples``: at most that many images of each set)."""
    from pipelines.common.data import batch_to_device, eval_loader, resolve_data_uri
    from pipelines.common.groups import key_grouper
    from pipelines.common.holdout import Holdout

    def batches():
        for s in sets:
            grouper = key_grouper(resolve_data_uri(s.data)[0], groups) \
                if groups is not None else None
            holdout = Holdout(groups=list(s.groups), group_by=groups) if s.groups else None
            loader = eval_loader(s.data, batch_size=batch_size, num_workers=0, rank=0,
                                 world_size=1, max_samples=max_samples, holdout=holdout,
                                 part="groups" if holdout else "search", with_keys=True)
            n = 0
            for images, labels, keys in loader:
                n += len(keys)
                images, labels = batch_to_device(images, labels, device)
                yield images, labels, [grouper(k) if grouper else s.label for k in keys]
            if counts is not None:
                counts.images[s.data] = n

    return batches


@dataclass(frozen=True)
class ProtocolRequest:
    """What the halting protocol measures: ``sets``, grouped by ``groups`` (a
    :class:`pipelines.common.groups.Groups`, or None: by set), ``bins`` confidence bins."""

    sets: list[MeasuredSet]
    groups: object = None
    bins: int = 15


def run_halting(model, request: ProtocolRequest, *, num_classes: int, op, batch_size: int,
                max_samples: int | None, device: str, echo: Callable[[str], None]) -> dict:
    """:func:`pipelines.analyze.halting.run_protocol` over ``request``'s sets, with the
    sets and their image counts recorded (``sets``, ``group_by``)."""
    from pipelines.analyze.halting import run_protocol
    from pipelines.common.data import dataset_info
    from pipelines.common.errors import InvalidInput

    for s in request.sets:
        n = dataset_info(s.data).num_classes
        if n != num_classes:
            raise InvalidInput(f"{s.data} has {n} classes but the checkpoint predicts "
                               f"{num_classes}")
    counts = SetCounts()
    batches = protocol_batches(request.sets, request.groups, batch_size=batch_size,
                               max_samples=max_samples, device=device, counts=counts)
    doc = run_protocol(model, batches, num_classes=num_classes, op=op, bins=request.bins,
                       echo=echo)
    doc["group_by"] = request.groups.describe() if request.groups is not None else "shard set"
    doc["sets"] = [{"data": s.data, "label": s.label, "groups": list(s.groups) or None,
                    "images": counts.images.get(s.data, 0)} for s in request.sets]
    for s in doc["sets"]:
        if not s["images"]:
            only = f" of group(s) {', '.join(s['groups'])}" if s["groups"] else ""
            echo(f"analyze: warning: no image{only} in {s['data']}")
    return doc
