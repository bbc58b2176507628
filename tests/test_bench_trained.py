"""``step bench model --checkpoint | --model`` on a tiny trained-like checkpoint and real
image crops: plain and tuned side by side, every part of the forward timed, step
predict's loop, the headline's ratios consistent with the figures they come from, and the
registered model's settings plus MLflow logging through a real ``mlflow server``.
Correctness only: timings on a shared CPU are not asserted beyond being positive."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from helpers import LOVEDA, RANDOM_HEADS

pytestmark = pytest.mark.timeout(600)

MODEL = {"backbone": "vit_tiny_patch16_384", "num_classes": 7, "decoder": "linear",
         "policy": {"pretrained": False, "levels": [2, 4, 8]}, "exits": {"blocks": [4, 8]}}
# the checkpoint's own settings: merge everything, halt early (a big GFLOPs cut)
INFERENCE = {"policy_mode": "threshold", "exit_thresholds": [0.2],
             "merge_thresholds": {"2": 0.0, "4": 0.0, "8": 0.0}, **RANDOM_HEADS}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    import torch

    from pipelines.common.checkpoint import save_checkpoint
    from pipelines.common.model import build_model

    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "ckpt", build_model(MODEL, INFERENCE))
    images = root / "images"
    images.mkdir()
    for i, scene in enumerate(sorted((LOVEDA / "img_dir").glob("*.png"))):
        Image.open(scene).convert("RGB").crop((0, 0, 128, 96)).save(images / f"{i}.png")
    return {"root": root, "ckpt": str(ckpt), "images": str(images)}


def _run(argv: list[str], out) -> dict:
    from pipelines.cli import main

    assert main(["bench", "model", *argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_checkpoint_plain_and_tuned_by_part_and_predict(case, capsys):
    doc = _run(["--checkpoint", case["ckpt"], "--images", case["images"],
                "--batch-sizes", "1,2", "--repeats", "2", "--warmup", "1",
                "--threads", "1"], case["root"] / "ckpt.json")
    assert doc["images"] == 3 and doc["image_size"] == [96, 128] and doc["threads"] == 1
    assert {k: doc["inference"]["tuned"]["merge_thresholds"][k] for k in ("2", "4", "8")} \
        == {"2": 0.0, "4": 0.0, "8": 0.0}
    assert doc["inference"]["plain"]["policy_mode"] == "none"
    assert doc["inference"]["plain"]["halting"] is False
    plain, tuned = doc["gflops_plain"], doc["gflops_tuned"]
    assert plain["policy"] == 0 and tuned["policy"] > 0  # the policy network counted
    assert tuned["total"] < plain["total"]
    for bs in ("1", "2"):
        entry = doc["by_batch"][bs]
        fwd = entry["forward"]
        for m in ("plain", "tuned"):
            st = fwd[f"ms_per_image_{m}"]
            assert st["n"] == 2 and 0 < st["min"] <= st["median"] <= st["max"]
        assert fwd["speedup"] == pytest.approx(fwd["ms_per_image_plain"]["median"]
                                               / fwd["ms_per_image_tuned"]["median"])
        parts = entry["parts"]["tuned"]
        assert {"policy", "embedding", "blocks_1-4", "blocks_5-8", "blocks_9-12",
                "exit_heads", "norm_halting", "decoder", "upsample_argmax",
                "total"} <= set(parts)
        assert parts["policy"]["median"] > 0 and parts["exit_heads"]["median"] > 0
        # the plain model runs no policy network and no exit heads
        assert entry["parts"]["plain"]["policy"]["median"] == 0
        assert entry["parts"]["plain"]["exit_heads"]["median"] == 0
        pred = entry["predict"]
        assert pred["images_per_s_plain"]["median"] > 0
        assert pred["images_per_s_tuned"]["median"] > 0
    counting = doc["counting"]
    assert counting["same_counts"] is True
    for k in ("flop_counter_mode", "part_counter"):
        assert counting[f"ms_per_image_{k}"]["n"] == 2 * 3  # repeats x images
    h = doc["headline"]
    assert h["counted_ms_part_counter"] == counting["ms_per_image_part_counter"]["median"]
    assert h["gflops_cut"] == pytest.approx(plain["total"] / tuned["total"])
    assert h["speedup_per_gflops_cut"] == pytest.approx(h["wall_speedup"] / h["gflops_cut"])
    assert 0 < h["policy_flop_share"] < 1 and 0 < h["policy_time_share"] < 1
    assert h["images_per_s_tuned_b2_vs_b1"] == pytest.approx(
        doc["by_batch"]["2"]["forward"]["images_per_s_tuned"]
        / doc["by_batch"]["1"]["forward"]["images_per_s_tuned"])
    assert h["predict_per_forward_speedup_b2"] == pytest.approx(
        doc["by_batch"]["2"]["predict"]["speedup"] / doc["by_batch"]["2"]["forward"]["speedup"])
    printed = capsys.readouterr().out
    assert "wall speedup" in printed and "speedup / GFLOPs cut" in printed
    assert "under the part counter" in printed and "COUNTS DIFFER" not in printed


def test_settings_refuse_two_models_and_a_checkpoint_as_model(case, capsys):
    from pipelines.cli import main

    assert main(["bench", "model", "--checkpoint", case["ckpt"], "--model",
                 "models:/x/1", "--print-config"]) == 2
    assert "model, checkpoint" in capsys.readouterr().err
    assert main(["bench", "model", "--model", case["ckpt"], "--print-config"]) == 2
    assert "models:/NAME/VERSION" in capsys.readouterr().err


@pytest.mark.integration
def test_registered_model_settings_and_mlflow_logging(case, mlflow_server):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.registry import register_tuned_model
    from pipelines.tracking.runs import create_run

    run_id = create_run(mlflow_server, "bench-test", run_name="tune")
    # the search chose a milder point than the checkpoint's own
    chosen = {"exit_thresholds": [0.9], "merge_thresholds": {"2": 0.5, "4": 0.5, "8": 0.5}}
    reg = register_tuned_model(mlflow_server, run_id, case["ckpt"], chosen,
                               {"miou": 0.5, "gflops": 1.0, "drop": 0.1}, name="bench-tiny",
                               max_drop=1.0, drop_mode="absolute", baseline_miou=0.6)
    doc = _run(["--model", f"models:/{reg['name']}/{reg['version']}", "--tracking-uri",
                mlflow_server, "--images", case["images"], "--repeats", "1",
                "--no-parts", "--no-predict", "--mlflow-experiment", "bench-test"],
               case["root"] / "reg.json")
    assert doc["registered_model"]["name"] == "bench-tiny"
    assert doc["inference"]["tuned"]["exit_thresholds"] == [0.9]
    assert {k: doc["inference"]["tuned"]["merge_thresholds"][k] for k in ("2", "4", "8")} \
        == {"2": 0.5, "4": 0.5, "8": 0.5}
    run = MlflowClient(mlflow_server).get_run(doc["mlflow_run_id"])
    assert run.data.metrics["bench.gflops_cut"] == pytest.approx(doc["headline"]["gflops_cut"])
    assert run.data.params["bench.model"].startswith("models:/bench-tiny/")


def test_predict_loop_with_io_threads_writes_what_the_serial_loop_writes(case):
    """The loop the benchmark times: decoding the next batch and writing files on threads
    gives the same files and records as one step after the other; a bad image is still
    skipped and counted."""
    from pipelines.cli import main

    images = case["root"] / "io_images"
    images.mkdir()
    for f in sorted((case["root"] / "images").glob("*.png")):
        (images / f.name).write_bytes(f.read_bytes())
    (images / "z_corrupt.png").write_bytes((images / "0.png").read_bytes()[:200])
    docs = {}
    for threads in ("0", "2"):
        out = case["root"] / f"io_{threads}"
        assert main(["predict", "--model", case["ckpt"], "--images", str(images), "--out",
                     str(out), "--no-ray", "--batch-size", "2", "--io-threads",
                     threads]) == 0
        docs[threads] = json.loads((out / "summary.json").read_text())
    assert docs["0"]["images"] == docs["2"]["images"] == 3
    assert docs["0"]["skipped"] == docs["2"]["skipped"] == 1
    for kind in ("masks", "color"):
        assert len(list((case["root"] / "io_2" / kind).glob("*.png"))) == 3
        for f in sorted((case["root"] / "io_0" / kind).glob("*.png")):
            assert f.read_bytes() == (case["root"] / "io_2" / kind / f.name).read_bytes()
    strip = ("forward_ms",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in docs["0"]["per_image"]] \
        == [{k: v for k, v in r.items() if k not in strip} for r in docs["2"]["per_image"]]
    assert docs["2"]["flops_counted"] is False and docs["2"]["gflops_mean"] is None
