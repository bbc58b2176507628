"""The training/eval loader: WebDataset shards (local or ``s3://``) -> (images, labels) batches.

``build_loader`` returns a :class:`SegLoader`, a thin wrapper around a
``torch.utils.data.DataLoader`` over a webdataset pipeline. Each dataloader worker:

1. takes its share of the data:

   * training splits *shards*: the shard list is shuffled with ``Random(seed + epoch)``
     (the same order on every rank), split by rank (``shards[rank::world]``), then by
     worker (``[worker::num_workers]``), so ranks and workers see disjoint shards that
     together cover the epoch (:func:`split_shards`);
   * evaluation splits *samples*: the split's samples, numbered in shard (directory) order
     then tar order (offsets from ``sizes.json``), optionally capped to the first
     ``max_samples``, are cut into contiguous ranges, one per rank, then one per worker,
     whose sizes differ by at most 1 (:func:`split_samples`). Every rank has work as soon
     as there are at least as many samples as ranks, even when the whole split is one
     shard (ADE20K val: 2,000 images, one shard). A worker reads only the shards its range
     touches, and stops reading a shard at the end of its range (the samples before its
     range are streamed past, not decoded);
2. streams each shard with ``webdataset.tarfile_samples`` (``s3://`` through a boto3
   streaming opener registered as a webdataset gopen scheme);
3. shuffles samples in a buffer (train), decodes (torchvision/libpng: ~30% faster than
   PIL here), augments (train) and batches.

Rank and world size come from ``torch.distributed`` when it is initialised (Ray Train
workers under DDP), else rank 0 of 1; both can be passed explicitly.

Epoch length comes from ``sizes.json``. Training under DDP needs every rank to take the
same number of steps, so each rank stops after the smallest per-rank batch count
(computable on every rank from ``sizes.json`` and the shared shard order; the few samples
past it wait for another epoch's shuffle). With ``resample=True`` workers draw shards with
replacement instead, for datasets with fewer shards than ranks x workers.

Nothing bad is skipped silently: a corrupt sample, or a tar that is truncated or unreadable
(detected also when a shard yields fewer samples than ``sizes.json`` promises), is logged
with its shard and counted in :attr:`SegLoader.skipped` (shared across worker processes).
In evaluation, damage is counted by the worker whose sample range it hits (a truncated
shard read by two workers counts once per worker that lost samples).
"""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing as mp
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep import storage
from data_prep.augment import AugmentConfig, augment, resize_pair
from data_prep.conventions import IGNORE_INDEX, SHARD_IMAGE_EXTS, SHARD_LABEL_EXT
from data_prep.info import DatasetInfo, read_dataset_info

log = logging.getLogger(__name__)

# How long the iterating process waits for a dataloader worker's next batch before it
# raises. A worker is forked from the process that iterates, and a fork of a process with
# many threads (a Ray Train worker: gRPC's among them) can deadlock in the child's at-fork
# handlers before any of our code runs. It did: the CamVid recipe's plain-ViT training of
# 2026-12-07 stopped for 14 minutes at an epoch boundary, rank 0 waiting for a new worker
# that hung inside os.fork, until the worker was killed and Ray Train restarted from the
# last checkpoint. With the timeout the stall becomes an error: a training restarts from
# its checkpoint (``train.max_failures``), an evaluation fails with the reason, nothing
# waits forever. Generous: a batch is decoded in well under a second, and the first one
# of a worker includes opening its shards (S3 too).
WORKER_TIMEOUT_S = 300

SKIP_REASONS = ("corrupt_sample", "incomplete_sample", "truncated_tar", "unreadable_shard")


def split_shards(shards: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """The shards of one (rank, worker): by rank first, then by dataloader worker."""
    if not 0 <= rank < world_size or not 0 <= worker < num_workers:
        raise ValueError(f"rank {rank}/{world_size}, worker {worker}/{num_workers} out of range")
    return shards[rank::world_size][worker::num_workers]


def _balanced(start: int, count: int, part: int, parts: int) -> tuple[int, int]:
    """Range ``part`` of ``parts`` contiguous ranges over [start, start + count), sizes
    differing by at most 1 (the first ``count % parts`` ranges get one more)."""
    q, r = divmod(count, parts)
    lo = start + part * q + min(part, r)
    return lo, lo + q + (part < r)


def rank_sample_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of the global sample numbers that ``rank`` evaluates, out of ``total``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank}/{world_size} out of range")
    return _balanced(0, total, rank, world_size)


def split_samples(sizes: list[int], rank: int, world_size: int, worker: int, num_workers: int,
                  max_samples: int | None = None) -> list[tuple[int, int, int]]:
    """The evaluation share of one (rank, worker): ``(shard index, lo, hi)`` pieces, i.e.
    positions ``lo..hi-1`` inside that shard, in shard order.

    Samples are numbered across shards in ``sizes`` order; the first ``max_samples`` of
    them (all when None) are split into contiguous per-rank ranges, then per-worker ranges,
    with sizes differing by at most 1 at each level. Together the (rank, worker) shares
    cover each of those samples exactly once.
    """
    if not 0 <= rank < world_size or not 0 <= worker < num_workers:
        raise ValueError(f"rank {rank}/{world_size}, worker {worker}/{num_workers} out of range")
    total = sum(sizes) if max_samples is None else min(sum(sizes), max(0, max_samples))
    r_lo, r_hi = rank_sample_range(total, rank, world_size)
    lo, hi = _balanced(r_lo, r_hi - r_lo, worker, num_workers)
    pieces = []
    offset = 0
    for idx, size in enumerate(sizes):
        a, b = max(lo, offset), min(hi, offset + size)
        if a < b:
            pieces.append((idx, a - offset, b - offset))
        offset += size
        if offset >= hi:
            break
    return pieces


def dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded RGB image -> uint8 (3, h, w)."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    return tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def decode_label(data: bytes) -> torch.Tensor:
    """Train-id PNG -> uint8 (h, w); decoded as one channel (an RGB decode would triple it)."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    return tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.GRAY)[0]


class SkipCounter:
    """Counts skipped samples/shards by reason, across dataloader worker processes."""

    def __init__(self) -> None:
        self._counts = mp.get_context().Array("q", len(SKIP_REASONS))

    def add(self, reason: str, where: str, n: int = 1) -> None:
        with self._counts.get_lock():
            self._counts[SKIP_REASONS.index(reason)] += n
        log.warning("data loader skipped %d (%s): %s", n, reason, where)

    def as_dict(self) -> dict[str, int]:
        return {r: int(self._counts[i]) for i, r in enumerate(SKIP_REASONS) if self._counts[i]}


@dataclass
class _Plan:
    shards: list[str]  # URIs, in directory order
    sizes: list[int]
    rank: int
    world_size: int
    num_workers: int
    max_samples: int | None = None  # eval: the first max_samples samples of the split only

    def order(self, seed: int, epoch: int, shuffle: bool) -> list[int]:
        idx = list(range(len(self.shards)))
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(idx)
        return idx

    def worker_indices(self, seed: int, epoch: int, shuffle: bool, rank: int, worker: int) -> list[int]:
        return split_shards(self.order(seed, epoch, shuffle), rank, self.world_size, worker, self.num_workers)

    @property
    def eval_total(self) -> int:
        """Samples an evaluation visits over all ranks (the split, capped to max_samples)."""
        total = sum(self.sizes)
        return total if self.max_samples is None else min(total, self.max_samples)

    def eval_pieces(self, rank: int, worker: int, num_workers: int) -> list[tuple[int, int, int]]:
        return split_samples(self.sizes, rank, self.world_size, worker, num_workers, self.max_samples)


class SegShards(IterableDataset):
    """The per-worker webdataset pipeline (see the module docstring)."""

    def __init__(
        self,
        plan: _Plan,
        *,
        batch_size: int,
        crop_size: int | None,
        train: bool,
        seed: int,
        epoch: int,
        augment_cfg: AugmentConfig,
        resample: bool,
        shuffle_buffer: int,
        eval_long_side: int | None,
        pad_to_multiple: int | None,
        skipped: SkipCounter,
        with_keys: bool = False,
        to_float: bool = True,
        exclude: frozenset[str] = frozenset(),
    ):
        self.plan = plan
        self.batch_size = batch_size
        self.crop_size = crop_size
        self.train = train
        self.seed = seed
        self.epoch = epoch
        self.augment_cfg = augment_cfg
        self.resample = resample
        self.shuffle_buffer = shuffle_buffer
        self.eval_long_side = eval_long_side
        self.pad_to_multiple = pad_to_multiple
        self.skipped = skipped
        self.with_keys = with_keys
        self.to_float = to_float
        self.exclude = exclude  # training: keys never yielded (plan.sizes counts the rest)

    # -- shard stream ---------------------------------------------------------------

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _samples_from(self, idx: int, lo: int = 0, hi: int | None = None) -> Iterator[dict]:
        """The samples of shard ``idx`` (positions ``lo..hi-1`` only, when ``hi`` is given:
        evaluation ranges); damage is counted, never silent."""
        import webdataset as wds

        url = self.plan.shards[idx]
        errors: list[Exception] = []

        def handler(exn: Exception) -> bool:
            errors.append(exn)
            return True  # keep going: later members / shards are still good

        whole = hi is None
        expected = self.plan.sizes[idx] if whole else hi - lo
        n = 0  # complete samples: a cut tar may end in a sample missing its label
        pos = 0  # position in the tar (complete or not), to match sizes.json offsets
        stream = wds.tarfile_samples([{"url": url}], handler=handler)
        try:
            for sample in stream:
                # an excluded key is neither yielded nor counted: sizes count the kept ones
                mine = pos >= lo and sample.get("__key__") not in self.exclude
                pos += 1
                if mine:
                    if SHARD_LABEL_EXT not in sample or not any(e in sample for e in SHARD_IMAGE_EXTS):
                        self.skipped.add("incomplete_sample", f"{url}:{sample.get('__key__')}")
                    else:
                        n += 1
                        yield sample
                if not whole and pos >= hi:
                    break  # the rest of the shard belongs to other workers / ranks
        finally:
            stream.close()
        if errors and (whole or n < expected):
            import tarfile

            truncated = any(isinstance(e, tarfile.ReadError | EOFError) for e in errors)
            self.skipped.add(
                "truncated_tar" if truncated else "unreadable_shard",
                f"{url}: {errors[0]!r}; {n} of {expected} samples read"
                + ("" if whole else f" (positions {lo}..{hi - 1})"),
            )
        elif n < expected:
            # tarfile ends quietly when a tar is cut at a member boundary; sizes.json does not
            self.skipped.add("truncated_tar", f"{url}: {n} of {expected} samples read"
                             + ("" if whole else f" (positions {lo}..{hi - 1})"))

    def _sample_stream(self, rank: int, worker: int, nw: int) -> Iterator[dict]:
        if self.resample:
            rng = random.Random(_mix(self.seed, self.epoch, rank, worker, 1))
            quota = math.ceil(sum(self.plan.sizes) / (self.plan.world_size * nw))
            n, barren = 0, 0
            while n < quota:
                before = n
                for sample in self._samples_from(rng.randrange(len(self.plan.shards))):
                    yield sample
                    n += 1
                    if n >= quota:
                        return
                barren = barren + 1 if n == before else 0
                if barren > 2 * len(self.plan.shards):  # never spin on unreadable shards
                    raise RuntimeError(f"no readable samples in {barren} shard draws in a row "
                                       f"(see loader.skipped)")
            return
        if not self.train:  # evaluation: contiguous sample ranges (split_samples)
            for idx, lo, hi in self.plan.eval_pieces(rank, worker, nw):
                yield from self._samples_from(idx, lo, hi)
            return
        for idx in self.plan.worker_indices(self.seed, self.epoch, self.train, rank, worker):
            yield from self._samples_from(idx)

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if not self.train or self.shuffle_buffer <= 1:
            yield from samples
            return
        buf: list[dict] = []
        for s in samples:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    # -- decode / augment / batch ----------------------------------------------------

    def _decoded(self, samples: Iterator[dict], g: torch.Generator) -> Iterator[tuple]:
        for s in samples:
            where = f"{s.get('__url__')}:{s.get('__key__')}"
            image_ext = next(e for e in SHARD_IMAGE_EXTS if e in s)
            try:
                image = decode_image(s[image_ext])
                label = decode_label(s[SHARD_LABEL_EXT])
                if image.shape[-2:] != label.shape:
                    raise ValueError(f"image {tuple(image.shape)} vs label {tuple(label.shape)}")
            except Exception as err:  # any decoder failure is a corrupt sample
                self.skipped.add("corrupt_sample", f"{where}: {err}")
                continue
            if self.train:
                img, lab = augment(image, label, self.crop_size, self.augment_cfg, g)
            else:
                img, lab = self._eval_transform(image, label)
            yield img, lab, s["__key__"]

    def _eval_transform(self, image: torch.Tensor, label: torch.Tensor):
        """Optional long-side resize and padding; the image may stay uint8 (see _collate)."""
        h, w = label.shape
        if self.eval_long_side and max(h, w) != self.eval_long_side:
            s = self.eval_long_side / max(h, w)
            image, label = resize_pair(image, label, (max(1, round(h * s)), max(1, round(w * s))))
        if self.pad_to_multiple:
            m = self.pad_to_multiple
            ph, pw = -label.shape[0] % m, -label.shape[1] % m
            if ph or pw:  # pad bottom/right; padded pixels are ignored by the metrics
                image = torch.nn.functional.pad(image, (0, pw, 0, ph), value=0)
                label = torch.nn.functional.pad(label, (0, pw, 0, ph), value=IGNORE_INDEX)
        return image, label

    def _batched(self, items: Iterator[tuple]) -> Iterator[tuple]:
        batch: list[tuple] = []
        for item in items:
            if batch and not self.train and item[0].shape != batch[0][0].shape:
                yield self._collate(batch)  # eval: a batch holds images of one size
                batch = []
            batch.append(item)
            if len(batch) == self.batch_size:
                yield self._collate(batch)
                batch = []
        if batch and not self.train:  # train drops the partial batch (fixed shapes, equal steps)
            yield self._collate(batch)

    def _collate(self, batch: list[tuple]) -> tuple:
        """Stack into float [0,1] images and int64 labels (or uint8 both, ``to_float=False``).

        uint8 eval images are converted straight into the batch tensor: one pass over the
        pixels instead of four (float, divide, clamp, stack). What remains is the cost of
        fresh memory: a 4 x 1024^2 float batch is 48 MB of new pages (see docs/data.md).
        """
        first_img, first_lab = batch[0][0], batch[0][1]
        img_dtype, lab_dtype = (torch.float32, torch.int64) if self.to_float else (torch.uint8, torch.uint8)
        images = _batch_tensor((len(batch), *first_img.shape), img_dtype)
        labels = _batch_tensor((len(batch), *first_lab.shape), lab_dtype)
        for i, (img, lab, _) in enumerate(batch):
            if img.dtype == img_dtype:
                images[i].copy_(img)
            elif self.to_float:  # uint8 -> [0, 1]
                images[i].copy_(img).div_(255)
            else:  # augmented float -> uint8
                torch.mul(img, 255, out=img).round_()
                images[i].copy_(img)
            labels[i].copy_(lab)
        if self.with_keys:
            return images, labels, [b[2] for b in batch]
        return images, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        storage.register_s3_gopen()  # also in spawned workers
        worker, nw = self._worker()
        rank = self.plan.rank
        rng = random.Random(_mix(self.seed, self.epoch, rank, worker, 0))
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, rank, worker, 2))
        samples = self._shuffled(self._sample_stream(rank, worker, nw), rng)
        yield from self._batched(self._decoded(samples, g))


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty batch tensor; in a dataloader worker, directly in shared memory.

    A worker's batch travels to the main process through shared memory; a tensor allocated
    there already is sent without a copy (what ``default_collate`` does too).
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
    return proto.new(storage).resize_(shape)


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers, identical in every process (``hash`` of str is salted)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class SegLoader:
    """Iterable of (images float [0,1] (B,3,h,w), labels int64 (B,h,w), 255 = ignore)."""

    def __init__(self, dataset: SegShards, info: DatasetInfo, num_workers: int, steps: int | None,
                 num_samples: int, total_samples: int | None = None):
        self.dataset = dataset
        self.info = info
        self.num_workers = num_workers
        self.steps = steps  # batches per rank per epoch (None: until the shards end)
        self.num_samples = num_samples  # samples this rank visits per epoch (before drops)
        # samples all ranks visit together per epoch (eval: the split, capped to max_samples)
        self.total_samples = total_samples

    @property
    def skipped(self) -> dict[str, int]:
        """Samples/shards skipped so far, by reason (all workers of this rank)."""
        return self.dataset.skipped.as_dict()

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("eval loaders have no fixed length; iterate to the end")
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(
            self.dataset,
            batch_size=None,  # batches are built inside the workers
            num_workers=self.num_workers,
            persistent_workers=False,  # new workers per epoch pick up set_epoch()
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=2 if self.num_workers else None,
            timeout=WORKER_TIMEOUT_S if self.num_workers else 0,
        )
        for step, batch in enumerate(loader):
            if self.steps is not None and step >= self.steps:
                break
            yield batch


def build_loader(
    uri: str,
    batch_size: int,
    crop_size: int | None = 512,
    train: bool = True,
    seed: int = 0,
    epoch: int = 0,
    num_workers: int = 2,
    augment: AugmentConfig | dict | None = None,
    *,
    split: str | None = None,
    resample: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle_buffer: int = 64,
    eval_long_side: int | None = None,
    pad_to_multiple: int | None = None,
    with_keys: bool = False,
    to_float: bool = True,
    max_samples: int | None = None,
    exclude_keys: frozenset[str] | set[str] | None = None,
) -> SegLoader:
    """A loader over the shards of ``split`` in ``uri`` (a ``step prep`` output, local or S3).

    ``train=True``: shuffled shards and samples, augmentation to ``crop_size`` squares,
    full batches only, the same number of steps on every rank. ``train=False`` (eval): no
    augmentation, no shuffling, every sample once; whole images (optionally resized to
    ``eval_long_side`` on their long side and padded to a multiple of ``pad_to_multiple``
    with image 0 / label 255), batched only with images of the same size.

    ``split`` defaults to the only split in ``uri``, else ``"train"``/``"val"``.
    ``with_keys=True`` adds the list of sample keys as a third batch element (e.g. to save
    per-image predictions in eval). ``to_float=False`` yields uint8 images (0..255) and
    uint8 labels instead, to convert on the GPU: 4x / 8x fewer bytes to build and copy.

    Evaluation splits samples, not shards, across ranks and workers (:func:`split_samples`):
    each rank gets a contiguous range of the split's samples (sizes differ by at most 1),
    so no rank is left without data while there are at least as many samples as ranks.
    ``max_samples`` (eval only) is a *global* cap: the first ``max_samples`` samples of
    the split (shard order, then tar order), split across ranks like the whole split,
    i.e. the same images whatever the number of ranks. ``num_samples`` is this rank's
    share, ``total_samples`` the count over all ranks.

    ``exclude_keys`` (training only): samples never yielded, e.g. a recording kept from
    training. The epoch length counts the samples kept per shard (from the manifest), so
    every rank still takes the same number of steps.
    """
    info = read_dataset_info(uri)
    split = info.pick_split(split, train)
    shards = info.shard_uris(split)
    sizes = [info.shard_sizes[s.rsplit("/", 1)[-1]] for s in shards]
    exclude = frozenset(exclude_keys or ())
    if exclude:
        if not train:
            raise ValueError("exclude_keys filters training loaders only; evaluation "
                             "filters keys after loading (pipelines.common.data.KeyFilter)")
        sizes = kept_shard_sizes(uri, split, [s.rsplit("/", 1)[-1] for s in shards], exclude)
        if not sum(sizes):
            raise ValueError(f"{uri}: exclude_keys leaves no sample of split {split!r}")
    if rank is None or world_size is None:
        rank, world_size = dist_rank_world()
    cfg = augment if isinstance(augment, AugmentConfig) else AugmentConfig.model_validate(augment or {})
    _check_mode_args(train, crop_size, max_samples)
    plan = _Plan(shards, sizes, rank, world_size, 1, max_samples if not train else None)
    if not train:
        # eval: a worker without samples would just idle; never start more than this rank has
        r_lo, r_hi = rank_sample_range(plan.eval_total, rank, world_size)
        num_workers = min(num_workers, r_hi - r_lo)
    nw = max(1, num_workers)
    plan.num_workers = nw
    if train and not resample and len(shards) < world_size * nw:
        raise ValueError(
            f"{uri}: {len(shards)} shard(s) of split {split!r} for {world_size} rank(s) x {nw} "
            "worker(s): every worker needs a shard. Reshard with a smaller --samples-per-shard/"
            "--shard-size, use fewer workers, or pass resample=True."
        )
    steps, num_samples, total_samples = _epoch_length(plan, batch_size, train, resample, seed, epoch)
    dataset = SegShards(
        plan, batch_size=batch_size, crop_size=crop_size, train=train, seed=seed, epoch=epoch,
        augment_cfg=cfg, resample=resample, shuffle_buffer=shuffle_buffer,
        eval_long_side=eval_long_side, pad_to_multiple=pad_to_multiple, skipped=SkipCounter(),
        with_keys=with_keys, to_float=to_float, exclude=exclude,
    )
    return SegLoader(dataset, info, num_workers, steps, num_samples, total_samples)


def kept_shard_sizes(uri: str, split: str, shard_names: list[str],
                     exclude: frozenset[str]) -> list[int]:
    """Samples per shard of ``split`` (in ``shard_names`` order) whose key is not in
    ``exclude``, from ``manifest.parquet``."""
    import io

    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(uri, "manifest.parquet"))),
                          columns=["split", "shard", "key"])
    kept = dict.fromkeys(shard_names, 0)
    for sp, shard, key in zip(table.column("split").to_pylist(),
                              table.column("shard").to_pylist(),
                              table.column("key").to_pylist(), strict=True):
        if sp == split and shard in kept and key not in exclude:
            kept[shard] += 1
    return [kept[n] for n in shard_names]


def _check_mode_args(train: bool, crop_size: int | None, max_samples: int | None) -> None:
    """The arguments that only one mode (train / eval) accepts or needs."""
    if train and not crop_size:
        raise ValueError("crop_size is required for training batches")
    if train and max_samples is not None:
        raise ValueError("max_samples caps evaluation loaders only (train=False)")
    if max_samples is not None and max_samples < 0:
        raise ValueError(f"max_samples must be >= 0, got {max_samples}")


def _epoch_length(plan: _Plan, batch_size: int, train: bool, resample: bool, seed: int,
                  epoch: int) -> tuple[int | None, int, int | None]:
    """(batches per rank per epoch (None: eval, until the data ends), samples this rank
    visits, samples all ranks visit (eval only, else None)).

    Training takes the smallest per-rank batch count, so every rank runs the same number of
    steps (DDP); with ``resample`` every worker draws the same quota of samples.
    """
    sizes, rank, world_size, nw = plan.sizes, plan.rank, plan.world_size, plan.num_workers

    def samples_of(r: int, w: int) -> int:
        return sum(sizes[i] for i in plan.worker_indices(seed, epoch, train, r, w))

    if resample:
        quota = math.ceil(sum(sizes) / (world_size * nw))
        return (nw * (quota // batch_size) if train else None), quota * nw, None
    if train:
        steps = min(sum(samples_of(r, w) // batch_size for w in range(nw)) for r in range(world_size))
        return steps, sum(samples_of(rank, w) for w in range(nw)), None
    r_lo, r_hi = rank_sample_range(plan.eval_total, rank, world_size)
    return None, r_hi - r_lo, plan.eval_total
