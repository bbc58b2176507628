"""The loader: DDP/worker shard split, determinism, augmentation alignment, eval mode."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_prep import AugmentConfig, build_loader, fixtures, prepare, split_shards
from data_prep.augment import augment
from data_prep.loader import decode_image, decode_label, rank_sample_range, split_samples

from helpers import LOVEDA


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_local) -> str:
    """10 synthetic samples in 5 shards of 2 (48 x 64, PNG, class colours exact)."""
    src = tmp_path_factory.mktemp("loader_src")
    fixtures.make_tree("folder", src, n=10)
    out = tmp_path_factory.mktemp("loader_shards")
    prepare("folder", str(src), str(out), "train", samples_per_shard=2,
            layout=str(src / "layout.yaml"), progress=False)
    return str(out)


def _all_keys(uri: str) -> list[str]:
    return pq.read_table(Path(uri) / "manifest.parquet").column("key").to_pylist()


def test_split_shards_two_ranks_two_workers_disjoint_and_covering() -> None:
    shards = [f"s{i}" for i in range(11)]
    parts = [split_shards(shards, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert all(parts)
    flat = [s for p in parts for s in p]
    assert sorted(flat) == sorted(shards) and len(flat) == len(set(flat))
    # rank first: rank 0 holds every other shard, whatever the worker count
    assert sorted(parts[0] + parts[1]) == sorted(shards[0::2])


RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
from data_prep.loader import build_loader
rank, world, store, uri, out = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
loader = build_loader(uri, batch_size=1, crop_size=16, train=True, seed=3, epoch=1,
                      num_workers=2, with_keys=True)
keys = [k for _, _, ks in loader for k in ks]
torch.save({"keys": keys, "len": len(loader), "num_samples": loader.num_samples}, out)
dist.destroy_process_group()
"""


def test_ddp_two_ranks_two_workers_see_disjoint_samples_covering_the_epoch(shards: str, tmp_path: Path) -> None:
    """Two real gloo ranks (rank/world read from torch.distributed), each with 2 workers."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    procs = [
        subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(r), "2", str(tmp_path / "store"),
                          shards, str(tmp_path / f"r{r}.pt")], env=env)
        for r in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=150) == 0
    results = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(2)]
    keys = [set(r["keys"]) for r in results]
    assert all(len(set(r["keys"])) == len(r["keys"]) for r in results)  # no repeats in a rank
    assert not keys[0] & keys[1]
    # equal steps on both ranks (DDP-safe); with 5 shards of 2 split 3/2, rank 0 stops at 4
    assert results[0]["len"] == results[1]["len"] == len(results[0]["keys"]) == len(results[1]["keys"])
    # the whole epoch is covered when nothing is dropped for step equality
    assert results[0]["num_samples"] + results[1]["num_samples"] == 10
    all_keys = set(_all_keys(shards))
    covered = set()
    for r in range(2):
        loader = build_loader(shards, batch_size=1, crop_size=16, train=True, seed=3, epoch=1,
                              num_workers=2, rank=r, world_size=2)
        for w in range(2):
            covered |= {s["__key__"] for s in loader.dataset._sample_stream(r, w, 2)}
    assert covered == all_keys and keys[0] | keys[1] <= all_keys


def test_shuffle_is_deterministic_per_seed_and_epoch(shards: str) -> None:
    def run(seed: int, epoch: int) -> tuple[list[str], torch.Tensor]:
        loader = build_loader(shards, batch_size=2, crop_size=32, train=True, seed=seed,
                              epoch=epoch, num_workers=2, with_keys=True)
        batches = list(loader)
        # 2 workers: 3 + 2 shards of 2 samples -> 3 + 2 full batches of 2
        assert len(batches) == len(loader) == 5
        return [k for *_, ks in batches for k in ks], torch.cat([b[0] for b in batches])

    keys_a, images_a = run(0, 0)
    keys_b, images_b = run(0, 0)
    assert keys_a == keys_b and torch.equal(images_a, images_b)
    keys_c, _ = run(0, 1)
    assert keys_c != keys_a


def test_batches_have_the_training_contract(shards: str) -> None:
    loader = build_loader(shards, batch_size=2, crop_size=40, train=True, num_workers=0)
    images, labels = next(iter(loader))
    assert images.shape == (2, 3, 40, 40) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert labels.shape == (2, 40, 40) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) <= {0, 1, 2, 255}


def test_not_enough_shards_is_an_error_unless_resampling(shards: str) -> None:
    with pytest.raises(ValueError, match="5 shard.*4 rank.*2 worker.*resample=True"):
        build_loader(shards, batch_size=1, crop_size=16, num_workers=2, rank=0, world_size=4)
    loader = build_loader(shards, batch_size=1, crop_size=16, num_workers=2, rank=3, world_size=4,
                          resample=True, with_keys=True)
    keys = [k for *_, ks in loader for k in ks]
    assert len(keys) == len(loader) == 4  # ceil(10 / (4 x 2)) = 2 samples per worker
    assert set(keys) <= set(_all_keys(shards))


def test_augmentation_keeps_image_and_label_aligned(shards: str) -> None:
    """The synthetic image colour is a function of the class: after random scale, crop,
    padding and flip, every pixel whose colour is exactly a class colour must carry that
    class, and padded pixels must be black with label 255."""
    image, raw = fixtures.synthetic_pair(fixtures.RAW_VALUES["folder"], size=(48, 64), seed=1)
    train = np.vectorize(fixtures.RAW_VALUES["folder"].get)(raw).astype(np.uint8)
    img_t = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    lab_t = torch.from_numpy(train)
    colours = {c: torch.tensor(fixtures.class_colour(c), dtype=torch.float32) / 255
               for c in (0, 1, 2, 255)}  # 255: ignore, black like the padding
    cfg = AugmentConfig(photometric=False)
    checked = 0
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        out_img, out_lab = augment(img_t, lab_t, 200, cfg, g)  # 200 > 2 x 64: always padded
        assert out_img.shape == (3, 200, 200) and out_lab.shape == (200, 200)
        for c, colour in colours.items():
            exact = (out_img - colour[:, None, None]).abs().amax(0) < 1e-4
            assert (out_lab[exact] == c).all(), f"seed {seed}: class {c} misaligned"
            checked += int(exact.sum())
        assert (out_lab == 255).sum() >= 200 * 200 - 96 * 128  # the ignore padding
    assert checked > 12 * 200 * 200 * 0.5

    # a flip with scale 1 and a full-size crop is an exact mirror of image and label together
    cfg = AugmentConfig(scale_min=1.0, scale_max=1.0, hflip=1.0, photometric=False)
    out_img, out_lab = augment(img_t, lab_t, 48, cfg, torch.Generator().manual_seed(0))
    x0 = next(x for x in range(17) if torch.equal(
        out_lab, lab_t[:, x : x + 48].flip(-1)))
    assert torch.allclose(out_img, img_t[:, :, x0 : x0 + 48].flip(-1).float() / 255)


def test_decoders_and_eval_mode(shards: str) -> None:
    data = (LOVEDA / "img_dir/0.png").read_bytes()
    assert decode_image(data).shape == (3, 1024, 1024)
    label = decode_label((LOVEDA / "ann_dir/0.png").read_bytes())
    assert label.shape == (1024, 1024) and label.dtype == torch.uint8

    loader = build_loader(shards, batch_size=4, crop_size=None, train=False, num_workers=2,
                          pad_to_multiple=32, with_keys=True)
    seen = []
    for images, labels, keys in loader:  # 48 x 64 padded to 64 x 64 (image 0, label 255)
        assert images.shape[-2:] == (64, 64) and labels.shape[-2:] == (64, 64)
        assert (labels[:, 48:] == 255).all() and (images[:, :, 48:] == 0).all()
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        seen += keys
    assert sorted(seen) == sorted(_all_keys(shards))  # every sample exactly once
    loader = build_loader(shards, batch_size=1, crop_size=None, train=False, num_workers=0,
                          eval_long_side=40, pad_to_multiple=16)
    images, labels = next(iter(loader))
    assert images.shape == (1, 3, 32, 48) and labels.shape == (1, 32, 48)  # 30 x 40 padded
    assert (labels[0, 30:] == 255).all() and (images[0, :, 30:] == 0).all()
    raw = build_loader(shards, batch_size=2, crop_size=None, train=False, num_workers=0, to_float=False)
    float_images, _ = next(iter(build_loader(shards, batch_size=2, crop_size=None, train=False,
                                             num_workers=0)))
    images, labels = next(iter(raw))
    assert images.dtype == labels.dtype == torch.uint8
    assert torch.equal(images.float() / 255, float_images)


# ---- evaluation splits samples, not shards ---------------------------------------------


@pytest.mark.parametrize("sizes", [[3], [2, 2, 2, 2, 2], [5, 1, 0, 4], [1]])
@pytest.mark.parametrize("max_samples", [None, 2, 7])
def test_eval_sample_split_covers_every_sample_once_and_balances(sizes: list[int],
                                                                 max_samples: int | None) -> None:
    total = sum(sizes) if max_samples is None else min(sum(sizes), max_samples)
    for world in (1, 2, 3, 4, 8):
        for workers in (1, 2, 3):
            per_rank = []
            seen: list[tuple[int, int]] = []
            for r in range(world):
                n = 0
                for w in range(workers):
                    pieces = split_samples(sizes, r, world, w, workers, max_samples)
                    assert all(0 <= lo < hi <= sizes[i] for i, lo, hi in pieces)
                    got = [(i, p) for i, lo, hi in pieces for p in range(lo, hi)]
                    seen += got
                    n += len(got)
                per_rank.append(n)
                assert rank_sample_range(total, r, world)[1] - rank_sample_range(total, r, world)[0] == n
            # every sample exactly once, and the first `total` of the split (shard order)
            assert len(seen) == len(set(seen)) == total
            flat = [(i, p) for i, s in enumerate(sizes) for p in range(s)]
            assert sorted(seen) == flat[:total]
            assert max(per_rank) - min(per_rank) <= 1, (world, workers, per_rank)


@pytest.mark.parametrize(("world", "workers"), [(2, 2), (3, 2), (4, 1), (12, 2)])
def test_eval_loader_gives_every_rank_its_share_of_samples(shards: str, world: int,
                                                           workers: int) -> None:
    """Real eval loaders (dataloader workers included): more ranks than shards still
    covers every sample exactly once, each rank within one sample of the others."""
    keys: list[list[str]] = []
    for r in range(world):
        loader = build_loader(shards, batch_size=2, crop_size=None, train=False,
                              num_workers=workers, rank=r, world_size=world, with_keys=True)
        keys.append([k for *_, ks in loader for k in ks])
        assert loader.num_samples == len(keys[-1]) and loader.total_samples == 10
    flat = [k for ks in keys for k in ks]
    assert sorted(flat) == sorted(_all_keys(shards))  # 10 samples, each exactly once
    counts = [len(ks) for ks in keys]
    assert max(counts) - min(counts) <= 1, counts
    assert loader.skipped == {}  # reading part of a shard is not damage

    # a global cap: the same first samples whatever the number of ranks
    capped = [k for r in range(world) for *_, ks in build_loader(
        shards, batch_size=1, crop_size=None, train=False, num_workers=workers, rank=r,
        world_size=world, with_keys=True, max_samples=3) for k in ks]
    single = [k for *_, ks in build_loader(shards, batch_size=1, crop_size=None, train=False,
                                           num_workers=0, rank=0, world_size=1, with_keys=True,
                                           max_samples=3) for k in ks]
    assert sorted(capped) == sorted(single) and len(single) == 3
    with pytest.raises(ValueError, match="max_samples"):
        build_loader(shards, batch_size=1, crop_size=16, train=True, max_samples=3)


def test_excluded_keys_never_reach_training_and_the_epoch_counts_the_rest(shards: str) -> None:
    """``exclude_keys`` (a group kept from training): under 2 ranks no excluded key is ever
    yielded, no kept one twice in an epoch, and both ranks take the same number of steps,
    counted from the kept samples of each shard (the manifest)."""
    keys = sorted(_all_keys(shards))
    excluded = frozenset(keys[:3])  # a whole shard and one sample of the next
    seen: list[str] = []
    steps = []
    for rank in range(2):
        loader = build_loader(shards, batch_size=1, crop_size=16, num_workers=1, rank=rank,
                              world_size=2, with_keys=True, exclude_keys=excluded, seed=3)
        got = [k for *_, ks in loader for k in ks]
        steps.append(len(loader))
        seen += got
    assert not set(seen) & excluded
    assert len(seen) == len(set(seen)) and set(seen) <= set(keys) - excluded
    assert steps[0] == steps[1] and len(seen) == 2 * steps[0]
    with pytest.raises(ValueError, match="leaves no sample"):
        build_loader(shards, batch_size=1, crop_size=16, num_workers=0, exclude_keys=set(keys))
    with pytest.raises(ValueError, match="training loaders only"):
        build_loader(shards, batch_size=1, crop_size=None, train=False, exclude_keys={keys[0]})


class _StuckWorker(torch.utils.data.IterableDataset):
    def __iter__(self):
        time.sleep(600)  # a worker that never delivers (a fork that deadlocked, a hung read)
        yield torch.zeros(1)


def test_a_worker_that_never_delivers_is_an_error_not_a_hang(monkeypatch):
    from data_prep import loader as loader_module

    monkeypatch.setattr(loader_module, "WORKER_TIMEOUT_S", 2)
    stuck = loader_module.SegLoader(_StuckWorker(), None, num_workers=1, steps=None,
                                    num_samples=1)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out after 2 seconds"):
        next(iter(stuck))
    assert time.monotonic() - t0 < 60
