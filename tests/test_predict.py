"""``step predict`` on a tiny random-init checkpoint and a handful of small real images:
the registered model through a real ``mlflow server`` (its thresholds applied), the local
loop and Ray Data ``map_batches`` (the session's local Ray), mixed image sizes in one
batch, a corrupt file skipped and counted, ``--strict``, token maps and GFLOPs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import LOVEDA, RANDOM_HEADS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MODEL = {"backbone": "vit_tiny_patch16_384", "num_classes": 7, "decoder": "linear",
         "policy": {"pretrained": False, "levels": [2, 4, 8]}, "exits": {"blocks": [4, 8]}}
INFERENCE = {"policy_mode": "threshold", "exit_thresholds": [0.9], **RANDOM_HEADS}
# what the search would have chosen: merge everything, halt early
TUNED = {"exit_thresholds": [0.2, 0.2], "merge_thresholds": {"2": 0.0, "4": 0.0, "8": 0.0}}
SIZES = {"a": (128, 128), "b": (128, 128), "sub/c": (50, 70)}  # name -> (width, height)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Checkpoint, a shard folder's description (the dataset the search used), and images:
    two 128 px LoveDA crops, a 50 x 70 one in a sub-folder, a corrupt PNG, a text file."""
    import torch

    from pipelines.common.checkpoint import save_checkpoint
    from pipelines.common.model import build_model

    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "ckpt", build_model(MODEL, INFERENCE))
    shards = root / "val"
    shards.mkdir()
    (shards / "dataset.json").write_text(json.dumps(
        {"name": "loveda", "num_classes": 7, "ignore_index": 255,
         "class_names": ["background", "building", "road", "water", "barren", "forest",
                         "agriculture"]}))
    (shards / "sizes.json").write_text(json.dumps({"val-000000.tar": 3}))
    images = root / "images"
    scenes = sorted((LOVEDA / "img_dir").glob("*.png"))
    for i, (name, size) in enumerate(SIZES.items()):
        dest = images / f"{name}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.open(scenes[i % len(scenes)]).convert("RGB").crop((0, 0, *size)).save(dest)
    (images / "corrupt.png").write_bytes((images / "a.png").read_bytes()[:300])
    (images / "notes.txt").write_text("not an image")
    return {"root": root, "ckpt": str(ckpt), "shards": str(shards), "images": str(images)}


@pytest.fixture(scope="module")
def registered(case, mlflow_server):
    """The checkpoint registered as `step tune` does (tags: checkpoint, inference), from a
    run that records the shard folder it searched on."""
    from pipelines.tracking.registry import register_tuned_model
    from pipelines.tracking.runs import RunLogger, create_run

    run_id = create_run(mlflow_server, "predict-test", run_name="tune")
    RunLogger(run_id, mlflow_server).log_params({"data": case["shards"]})
    reg = register_tuned_model(mlflow_server, run_id, case["ckpt"], TUNED,
                               {"miou": 0.5, "gflops": 1.0, "drop": 0.1},
                               name="predict-tiny", max_drop=1.0, drop_mode="absolute",
                               baseline_miou=0.6)
    assert reg is not None
    return f"models:/{reg['name']}/{reg['version']}"


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_a_version_whose_held_out_check_broke_its_limit_says_so(case, registered,
                                                              mlflow_server, capsys):
    """The pipeline tags the version it registered with the held-out check's verdict;
    ``step predict`` on that version prints the warning and keeps it in its notes."""
    from pipelines.predict.settings import PredictSettings
    from pipelines.predict.source import resolve_source
    from pipelines.tracking.registry import holdout_tags, tag_version

    name, version = registered[len("models:/"):].rsplit("/", 1)
    s = PredictSettings(model=registered, images=case["images"], tracking_uri=mlflow_server,
                        out=str(case["root"] / "out_unused"))
    assert not [n for n in resolve_source(s).notes if "drop limit" in n]
    check = {"images": 87, "drop": 3.76, "drop_lo": 2.88, "drop_hi": 4.71,
             "limit_broken": True, "worst_group": "0001TP", "worst_group_drop": 5.66}
    tag_version(mlflow_server, name, version, holdout_tags(check))
    try:
        [warning] = [n for n in resolve_source(s).notes if "drop limit" in n]
        assert warning == (f"WARNING: {name} version {version} broke its drop limit (1.0) on "
                           "87 held-out images: drop 3.76, worst group 0001TP 5.66")
        assert f"step predict: {warning}" in capsys.readouterr().out
    finally:  # the fixture's version is shared by the module's other tests
        tag_version(mlflow_server, name, version, holdout_tags({**check, "limit_broken": False}))
    assert not [n for n in resolve_source(s).notes if "drop limit" in n]


def test_registered_model_locally_with_its_thresholds(case, registered, mlflow_server,
                                                      capsys):
    from pipelines.cli import main
    from pipelines.predict.palette import LOVEDA as LOVEDA_COLOURS

    out = case["root"] / "out_local"
    rc = main(["predict", "--model", registered, "--images", case["images"],
               "--out", str(out), "--tracking-uri", mlflow_server, "--batch-size", "2",
               "--no-ray", "--flops"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    doc = _summary(out)
    assert doc["executor"] == "local"
    assert doc["registered_model"]["version"] == registered.rsplit("/", 1)[1]
    from step_model.config import InferenceConfig

    # the checkpoint's settings with the registered ones, resolved on the driver
    assert doc["inference"] == InferenceConfig(**INFERENCE).apply(TUNED).to_dict()
    assert doc["thresholds_from_registry"]
    # the corrupt file is reported and skipped, the text file is not an input
    assert doc["images"] == 3 and doc["skipped"] == 1
    assert doc["skipped_images"][0]["image"].endswith("corrupt.png")
    assert doc["skipped_by_reason"] == {"undecodable_image": 1}
    assert doc["ignored_examples"] == ["notes.txt"]
    assert "skipped" in printed.out and "corrupt.png" in printed.out
    # the dataset the search ran on gives the palette and the class names
    assert doc["dataset"] == "loveda" and doc["palette"] == "loveda"
    assert doc["class_names"][1] == "building"
    per = {r["name"]: r for r in doc["per_image"]}
    assert set(per) == set(SIZES)
    for name, (w, h) in SIZES.items():
        mask = np.asarray(Image.open(out / "masks" / f"{name}.png"))
        colour = np.asarray(Image.open(out / "color" / f"{name}.png"))
        assert mask.shape == (h, w) and mask.dtype == np.uint8 and mask.max() < 7
        assert (colour == np.asarray(LOVEDA_COLOURS, dtype=np.uint8)[mask]).all()
    # merge threshold 0 merges every 8 x 8 block: a 128 px image (8 x 8 cells) is 1 token
    assert per["a"]["tokens"] == 1 and per["a"]["tokens_in"] == 64
    assert per["a"]["batch"] == 2 and per["sub/c"]["batch"] == 1  # batched by size
    assert doc["gflops_mean"] > 0 and doc["gflops_split_mean"]["policy"] > 0
    assert doc["throughput_images_per_s"] > 0 and doc["halted_fraction"] is not None


def test_ray_data_path_token_maps_and_flops(case, registered, ray_local):
    """The same thresholds given as flags to the checkpoint itself, on Ray Data: the same
    masks as the registered model's local run; token maps; GFLOPs of what executed."""
    import torch

    from pipelines.cli import main
    from pipelines.common.checkpoint import load_model
    from step_model import measure_gflops

    out = case["root"] / "out_ray"
    rc = main(["predict", "--model", case["ckpt"], "--images", case["images"],
               "--out", str(out), "--ray", "--batch-size", "4", "--token-maps", "--flops",
               "--thresholds", "0.2", "--merge-thresholds", "2=0,4=0,8=0"])
    assert rc == 0
    doc = _summary(out)
    assert doc["executor"] == "ray" and len(doc["nodes"]) == 1 and doc["workers"] == 1
    assert doc["images"] == 3 and doc["skipped"] == 1
    # no dataset recorded with a bare checkpoint: the fixed palette
    assert doc["palette"] == "fixed" and doc["dataset"] is None
    per = {r["name"]: r for r in doc["per_image"]}
    local = case["root"] / "out_local"
    for name, (w, h) in SIZES.items():
        if local.is_dir():  # the local test ran first (same inference settings)
            assert (np.asarray(Image.open(out / "masks" / f"{name}.png"))
                    == np.asarray(Image.open(local / "masks" / f"{name}.png"))).all()
        levels = np.asarray(Image.open(out / "levels" / f"{name}.png"))
        depth = np.asarray(Image.open(out / "exit_depth" / f"{name}.png"))
        assert levels.shape == depth.shape == (-(-h // 16), -(-w // 16))
        assert set(np.unique(levels)) <= {1, 2, 4, 8} and depth.max() <= 12
        assert (out / "token_maps" / f"{name}.png").is_file()
    assert per["a"]["batch"] == 2  # a and b in one forward, c (another size) in its own
    # batch size 1 (the odd size): GFLOPs are exactly measure_gflops of that image
    model, _ = load_model(case["ckpt"])
    model.set_inference(TUNED)
    img = np.asarray(Image.open(Path(case["images"]) / "sub" / "c.png"))
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
    assert per["sub/c"]["gflops"] == pytest.approx(measure_gflops(model, x)["total"],
                                                   rel=1e-6)


def test_strict_stops_at_a_bad_image_and_errors_are_one_line(case, registered, tmp_path,
                                                            mlflow_server, capsys):
    import torch

    from pipelines.cli import main

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rc = main(["predict", "--model", case["ckpt"], "--images", str(bad),
               "--out", str(tmp_path / "o"), "--strict", "--no-ray"])
    err = capsys.readouterr().err
    assert rc == 1 and "--strict: bad image" in err and "x.png" in err
    assert not (tmp_path / "o" / "summary.json").exists()
    # refused on the driver, before any weights load or any Ray worker starts
    rc = main(["predict", "--model", case["ckpt"], "--images", case["images"],
               "--out", str(tmp_path / "o"), "--policy-mode", "oracle", "--no-ray"])
    assert rc == 1 and "needs ground-truth labels" in capsys.readouterr().err
    rc = main(["predict", "--model", case["ckpt"], "--images", case["images"],
               "--out", str(tmp_path / "o"), "--thresholds", "0.2,0.2,0.2", "--ray"])
    assert rc == 1 and "3 values for 2 exits" in capsys.readouterr().err  # before Ray
    if not torch.cuda.is_available():
        rc = main(["predict", "--model", case["ckpt"], "--images", case["images"],
                   "--out", str(tmp_path / "o"), "--device", "cuda", "--no-ray"])
        assert rc == 1 and "no CUDA device" in capsys.readouterr().err
    rc = main(["predict", "--model", "models:/no-such-model/3", "--images", case["images"],
               "--out", str(tmp_path / "o"), "--tracking-uri", mlflow_server])
    assert rc == 1 and "no such registered model version" in capsys.readouterr().err
