"""Evaluation under real torch.distributed (gloo, one process per rank, no Ray).

The defect these tests guard against: a validation split with fewer shards than ranks left a rank without data,
its reductions had other shapes, and gloo aborted ("Received data size doesn't match
expected size"). Evaluation now splits samples, not shards: these tests run a one-shard,
3-image LoveDA split on 2 ranks (2 dataloader workers each) and on 4 ranks (one rank without
any image), and check that every image is evaluated exactly once, that the ranks' shares
differ by at most one image, and that the figures equal a single-process evaluation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from data_prep.loader import build_loader
from pipelines.common.data import eval_loader
from pipelines.common.model import build_model
from pipelines.evaluate.evaluator import EvalOptions, evaluate_model

from helpers import LOVEDA, REPO

MODEL_CFG = {"backbone": "vit_tiny_patch16_384", "num_classes": 7,
             "policy": {"mode": "oracle", "pretrained": False, "levels": [2, 4]},
             "exits": {"blocks": [2, 4], "thresholds": [0.3], "top_k": 1}}

# One rank: evaluates the whole split, then the first 2 images (a global max_samples), and
# saves both results and the keys of the batches it evaluated.
RANK_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from data_prep.loader import build_loader
from pipelines.common.data import eval_loader
from pipelines.evaluate.evaluator import EvalOptions, evaluate_model
from pipelines.common.model import build_model

rank, world, workers = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
store, uri, model_path, cfg, out = sys.argv[4:9]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
model = build_model(json.loads(cfg))
model.load_state_dict(torch.load(model_path, weights_only=True))

def recorded(loader, keys):
    for images, labels, batch_keys in loader:
        keys.extend(batch_keys)
        yield images, labels

results = {}
for name, cap in (("all", None), ("cap2", 2)):
    keys = []
    loader = build_loader(uri, batch_size=1, crop_size=None, train=False, num_workers=workers,
                          with_keys=True, to_float=False, max_samples=cap)
    result = evaluate_model(model, recorded(loader, keys), num_classes=7, options=EvalOptions(
        max_samples=cap, count_flops=True, latency_samples=1, progress=False))
    shares = eval_loader(uri, num_workers=workers, max_samples=cap)
    results[name] = {"result": result.to_dict(), "keys": keys,
                     "num_samples": shares.num_samples, "total_samples": shares.total_samples}
dist.barrier()
dist.destroy_process_group()
with open(out, "w") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory, ray_local) -> str:
    """``step prep --dataset loveda --src <fixtures>/loveda --split train``: 3 images, 1 shard
    (downscaled to 64 px to keep the forwards cheap)."""
    from data_prep.prep import prepare

    out = tmp_path_factory.mktemp("val_one_shard")
    prepare("loveda", str(LOVEDA), str(out), split="train", max_side=64, progress=False)
    sizes = json.loads((out / "sizes.json").read_text())
    assert list(sizes.values()) == [3], sizes  # one shard of 3: fewer shards than ranks
    return str(out)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("eval_model") / "model.pt"
    torch.save(build_model(MODEL_CFG).state_dict(), path)
    return str(path)


def _single_process(uri: str, model_file: str, max_samples: int | None) -> dict:
    model = build_model(MODEL_CFG)
    model.load_state_dict(torch.load(model_file, weights_only=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' setting: the same kernels, the same sums
    try:
        loader = eval_loader(uri, rank=0, world_size=1, max_samples=max_samples)
        return evaluate_model(model, loader, num_classes=7, options=EvalOptions(
            max_samples=max_samples, count_flops=True, progress=False)).to_dict()
    finally:
        torch.set_num_threads(threads)


def _assert_close(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for k in want:
            _assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_close(g, w, f"{where}[{i}]")
    elif want is None or got is None:
        assert got is want, where
    else:
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), where


COMPARED = ("miou", "per_class_iou", "pixel_accuracy", "mean_accuracy", "num_images", "gflops",
            "gflops_split", "tokens_in", "tokens_mean", "tokens_per_block",
            "supertokens_per_level", "halted_fraction", "halted_per_exit", "per_class_halting")


@pytest.mark.parametrize(("world", "workers"), [(2, 2), (4, 1)], ids=["2ranks-2workers", "4ranks"])
def test_one_shard_split_is_evaluated_once_across_ranks(one_shard: str, model_file: str,
                                                        tmp_path: Path, world: int,
                                                        workers: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(r), str(world), str(workers),
             str(tmp_path / "store"), one_shard, model_file, json.dumps(MODEL_CFG),
             str(tmp_path / f"r{r}.json")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=240)
            logs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-3000:]}"
    ranks = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(world)]
    all_keys = pq.read_table(Path(one_shard) / "manifest.parquet").column("key").to_pylist()
    assert len(all_keys) == 3

    for name, cap in (("all", None), ("cap2", 2)):
        runs = [r[name] for r in ranks]
        expected_n = 3 if cap is None else cap
        # every image exactly once over the ranks, shares balanced to within one image
        keys = [k for run in runs for k in run["keys"]]
        assert len(keys) == len(set(keys)) == expected_n
        assert set(keys) <= set(all_keys)
        counts = [len(run["keys"]) for run in runs]
        assert max(counts) - min(counts) <= 1, counts
        assert [run["num_samples"] for run in runs] == counts
        assert all(run["total_samples"] == expected_n for run in runs)
        # every rank gets the same, global result, equal to one process evaluating it all
        reference = _single_process(one_shard, model_file, cap)
        assert reference["num_images"] == expected_n
        for run in runs:
            got = run["result"]
            assert got["num_images"] == expected_n
            for field in COMPARED:
                _assert_close(got[field], reference[field], field)
            assert got["latency_ms"] > 0  # timed on the ranks with data, averaged over all
    # the global cap picks the same images as in a single process: the first of the split
    single = [k for *_, ks in build_loader(one_shard, batch_size=1, crop_size=None, train=False,
                                           num_workers=0, with_keys=True, rank=0, world_size=1,
                                           max_samples=2) for k in ks]
    assert {k for r in ranks for k in r["cap2"]["keys"]} == set(single)
