"""``step analyze``: layout ceilings, policy_vs_oracle, the JSON of the command
end to end on tiny real data, and the oracle refusals of eval / tune."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import RANDOM_HEADS, blocky_labels, tiny


def _known_map() -> torch.Tensor:
    """A 32 x 64 label map (2 x 4 cells) whose left 2 x 2 window mixes classes 1 and 2."""
    lab = torch.zeros(1, 32, 64, dtype=torch.long)
    lab[0, :20, :32] = 1      # 640 px of class 1 in the window ...
    lab[0, 20:, :32] = 2      # ... and 384 px of class 2
    lab[0, 4:8, 36:40] = 3    # cell (0, 2): class 0 with a 16 px speck of class 3
    lab[0, :16, 48:] = 2      # cell (0, 3): class 2
    lab[0, 16:, 32:48] = 3    # cell (1, 2): class 3
    lab[0, 24:, 48:] = 255    # cell (1, 3): class 0 on top, ignore below
    return lab


def test_ceiling_paints_each_token_with_its_majority_label():
    from pipelines.analyze.ceiling import cell_counts, layout_confusion
    from pipelines.evaluate.metrics import confusion_matrix, scores_from_confusion
    from step_model.selection import build_layout

    labels = _known_map()
    accepted = {2: torch.tensor([[[True, False]]])}  # one 2 x 2 token over the mixed window
    layout = build_layout(accepted, (2, 4), 1, "cpu")
    cm = layout_confusion(cell_counts(labels, 4), layout.cell_to_token)
    # direct: every pixel takes the most frequent labelled class of its token's pixels
    token_of_pixel = layout.cell_to_token.view(1, 2, 4).repeat_interleave(16, 1).repeat_interleave(16, 2)
    painted = torch.zeros_like(labels)
    for t in token_of_pixel.unique():
        inside = token_of_pixel == t
        votes = torch.bincount(labels[inside & (labels != 255)], minlength=4)
        painted[inside] = int(votes.argmax())
    assert torch.equal(cm, confusion_matrix(painted, labels, 4))
    ious = [368 / 384, 640 / 1024, 256 / 640, 256 / 272]  # worked out by hand
    assert scores_from_confusion(cm).miou == pytest.approx(sum(ious) / 4)


def test_oracle_at_purity_one_reaches_100_and_layouts_match_the_model():
    from pipelines.analyze.layouts import LayoutSweep

    model = tiny("threshold", num_classes=5)
    labels = torch.cat([blocky_labels(64, 96, 1), blocky_labels(64, 96, 2)])  # no ignore
    images = torch.rand(2, 3, 64, 96)
    sweep = LayoutSweep(model, 5, purities=[1.0, 0.5], thresholds=[0.5], budgets=[0.5])
    sweep.update(images, labels)
    rows = {(r["layout"], r["setting"]): r for r in sweep.rows()}
    exact = rows[("oracle", 1.0)]
    assert exact["ceiling_miou"] == 1.0 and exact["tokens_fraction"] < 1.0
    assert exact["uses_labels"] and not rows[("threshold", 0.5)]["uses_labels"]
    assert rows[("oracle", 0.5)]["tokens_fraction"] <= exact["tokens_fraction"]
    # the same token counts as the model's own selection at those settings
    cells = 2 * 4 * 6
    for key, kw in ((("oracle", 1.0), {"policy_mode": "oracle"}),
                    (("threshold", 0.5), {"merge_thresholds": dict.fromkeys((2, 4, 8, 16), 0.5)}),
                    (("budget", 0.5), {"budget": 0.5})):
        model.set_inference(kw)
        layout, _ = model.select(images, labels)
        assert rows[key]["tokens_fraction"] == int(layout.num_tokens.sum()) / cells, key


def test_predicted_layouts_are_the_oracles_rule_on_predictions():
    """The predicted layouts apply the oracle's rule to a predictor's masks: a predictor that
    returns the labels gives the oracle's layouts exactly (predicted_vs_oracle 1), one that
    sees a single class merges every window and loses the ceiling; the learned policy's
    figure ignores them, and they are not marked as using labels."""
    from pipelines.analyze.layouts import PREDICTED, LayoutSweep, policy_vs_oracle

    model = tiny("threshold", num_classes=5)
    labels = torch.cat([blocky_labels(64, 96, 1), blocky_labels(64, 96, 2)])
    images = torch.rand(2, 3, 64, 96)

    def rows_with(predict):
        sweep = LayoutSweep(model, 5, purities=[1.0, 0.95], thresholds=[0.5], budgets=[],
                            predict=predict)
        sweep.update(images, labels)
        return sweep.rows()

    perfect = rows_with(lambda imgs: labels)
    by = {(r["layout"], r["setting"]): r for r in perfect}
    for p in (1.0, 0.95):
        assert by[(PREDICTED, p)]["tokens_fraction"] == by[("oracle", p)]["tokens_fraction"]
        assert by[(PREDICTED, p)]["ceiling_miou"] == by[("oracle", p)]["ceiling_miou"]
        assert not by[(PREDICTED, p)]["uses_labels"]
    assert policy_vs_oracle(perfect, layouts=(PREDICTED,))["value"] == pytest.approx(1.0)
    without = [r for r in perfect if r["layout"] != PREDICTED]
    assert policy_vs_oracle(perfect) == policy_vs_oracle(without)
    flat = {(r["layout"], r["setting"]): r
            for r in rows_with(lambda imgs: torch.zeros_like(labels))}
    assert flat[(PREDICTED, 1.0)]["tokens_fraction"] < by[("oracle", 1.0)]["tokens_fraction"]
    assert flat[(PREDICTED, 1.0)]["ceiling_miou"] < by[("oracle", 1.0)]["ceiling_miou"]


def _row(layout, setting, frac, ceiling):
    return {"layout": layout, "setting": setting, "tokens_fraction": frac,
            "ceiling_miou": ceiling, "token_cut": 1 / frac, "uses_labels": layout == "oracle"}


def test_policy_vs_oracle_arithmetic():
    from pipelines.analyze.layouts import policy_vs_oracle

    rows = [_row("oracle", 1.0, 0.565, 0.72), _row("oracle", 0.95, 0.465, 0.695),
            _row("threshold", 0.5, 0.555, 0.683),   # cuts more but loses ceiling
            _row("threshold", 0.8, 2 / 3, 0.695),   # reaches the ceiling: cuts 1.5x
            _row("threshold", 0.9, 0.8, 0.70),      # reaches it too, cuts less
            _row("budget", 0.5, 0.5, 0.653)]
    out = policy_vs_oracle(rows)
    assert out["best"]["setting"] == 0.8
    assert out["value"] == pytest.approx(1.5 / (1 / 0.465))
    assert out["oracle_ceiling"] == 0.695 and out["reason"] is None
    short = policy_vs_oracle([r for r in rows if r["setting"] not in (0.8, 0.9)])
    assert short["value"] is None and "no learned setting reaches" in short["reason"]
    assert short["best_ceiling"]["setting"] == 0.5  # the closest learned setting is named


# ---- end to end on tiny real data ---------------------------------------------------------

# in the older layout (inference keys inside the architecture): builds, and the oracle copy
# below is a checkpoint as trainings wrote them before inference.yaml existed
MODEL = {"backbone": "vit_tiny_patch16_384", "num_classes": 7, "decoder": "linear",
         "policy": {"mode": "threshold", "pretrained": False, "levels": [2, 4, 8]},
         "exits": {"blocks": [4, 8], "thresholds": [0.5], "top_k": 1}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny STEP checkpoint (random init, seeded) and a copy saved in oracle mode, in the
    older layout (no inference.yaml)."""
    import yaml

    from pipelines.common.checkpoint import save_checkpoint
    from pipelines.common.model import build_model

    root = tmp_path_factory.mktemp("analyze")
    torch.manual_seed(0)
    model = build_model(MODEL)
    model.set_inference(RANDOM_HEADS)
    learned = save_checkpoint(root / "learned", model)
    oracle_cfg = {**MODEL, "policy": {**MODEL["policy"], "mode": "oracle"}}
    oracle = root / "oracle"
    oracle.mkdir()
    (oracle / "model.pt").write_bytes((learned / "model.pt").read_bytes())
    (oracle / "model_config.yaml").write_text(yaml.safe_dump(oracle_cfg))
    return {"learned": str(learned), "oracle": str(oracle), "root": root}


def test_step_analyze_writes_every_part_and_logs_to_mlflow(checkpoints, tiny_shards,
                                                           mlflow_server, capsys):
    from mlflow.tracking import MlflowClient

    from pipelines.cli import main

    out = checkpoints["root"] / "analysis.json"
    rc = main(["analyze", "--checkpoint", checkpoints["learned"], "--data", tiny_shards["val"],
               "--max-samples", "1", "--thresholds", "0.3", "--merge-thresholds", "0.5",
               "--layout-thresholds", "0.5", "0.9", "--budgets", "0.5", "--seeds", "3",
               "--ablation-thresholds", "0.2", "0.99",
               "--tracking-uri", mlflow_server, "--experiment", "analyze", "--json", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-3000:]
    doc = json.loads(out.read_text())
    assert {"layouts", "policy_vs_oracle", "tradeoff", "ablation", "flow"} <= set(doc)
    kinds = [(r["layout"], r["setting"]) for r in doc["layouts"]]
    assert kinds == [("oracle", 1.0), ("oracle", 0.98), ("oracle", 0.95), ("oracle", 0.9),
                     ("threshold", 0.5), ("threshold", 0.9), ("budget", 0.5)]
    for r in doc["layouts"]:
        assert 0 < r["tokens_fraction"] <= 1 and 0 <= r["ceiling_miou"] <= 1
    assert set(doc["policy_vs_oracle"]) >= {"value", "oracle_cut", "best", "reason"}
    trade = {r["variant"]: r for r in doc["tradeoff"]}
    assert list(trade) == ["plain", "dcts", "exits", "step"]
    # the policy network runs (and is counted) exactly where the learned policy shares
    assert trade["plain"]["gflops_policy"] == trade["exits"]["gflops_policy"] == 0
    assert trade["dcts"]["gflops_policy"] > 0 and trade["step"]["gflops_policy"] > 0
    assert trade["dcts"]["tokens_mean"] < trade["plain"]["tokens_mean"]
    abl = doc["ablation"]
    assert abl["random"]["halted_per_exit"] == abl["confidence"]["halted_per_exit"] \
        == abl["uniform"]["halted_per_exit"]  # the same counts at every exit
    assert [s["seed"] for s in abl["random"]["seeds"]] == [3]
    for k in ("confidence", "random", "uniform"):  # tokens are matched, their area is not
        assert 0.0 <= abl[k]["halted_cell_fraction"] <= 1.0
    sweep = doc["ablation_sweep"]
    assert [r["exit_threshold"] for r in sweep] == [0.2, 0.99]
    for r in sweep:  # matched counts at every exit, at every threshold of the curve
        assert r["random"]["halted_per_exit"] == r["confidence"]["halted_per_exit"] \
            == r["uniform"]["halted_per_exit"]
        assert r["confidence_wins"] == (r["confidence"]["miou"] > max(
            r["random"]["miou"], r["uniform"]["miou"]))
    halted = [sum(r["confidence"]["halted_per_exit"].values()) for r in sweep]
    assert halted[0] > halted[1]  # a lower threshold halts more
    assert doc["confidence_wins"] == all(
        [abl["confidence"]["miou"] > max(abl["random"]["miou"], abl["uniform"]["miou"])]
        + [r["confidence_wins"] for r in sweep])
    flow = doc["flow"]
    assert flow["images"] == 1 and len(flow["tokens_per_block"]) == 12
    assert sum(flow["tokens_per_level"][s] * int(s) ** 2 for s in flow["tokens_per_level"]) \
        == flow["tokens_in"]  # every cell in exactly one token
    for shares in flow["per_class"].values():
        assert sum(shares["level"].values()) == pytest.approx(1.0)
        assert sum(shares["exit"].values()) == pytest.approx(1.0)
    assert "policy_vs_oracle" in printed.out and "[uses labels: upper bound]" in printed.out
    assert "at exit threshold 0.99:" in printed.out
    score = doc["operating_point"]["inference"]["exit_score"]  # what decided the exits
    assert f"{score} exits beat random and uniform at every point: " \
        + ("yes" if doc["confidence_wins"] else "no") in printed.out
    client = MlflowClient(mlflow_server)
    files = {f.path for f in client.list_artifacts(doc["run_id"], "analysis")}
    assert {"analysis/layouts.csv", "analysis/tradeoff.csv", "analysis/ablation.csv",
            "analysis/flow_per_class.csv", "analysis/layouts.png", "analysis/tradeoff.png",
            "analysis/ablation.png", "analysis/flow_per_class.png",
            "analysis/ablation_sweep.csv", "analysis/ablation_sweep.png"} <= files
    run = client.get_run(doc["run_id"])
    assert run.info.status == "FINISHED" and "tradeoff_step_gflops" in run.data.metrics
    # the halting protocol runs on the same images, one group (no groups defined)
    assert list(doc["halting"]["groups"]) == ["data"] and doc["halting"]["overall"]["images"] == 1
    assert {"analysis/halting_miou.csv", "analysis/reliability_exit_4.png"} <= files


def test_layouts_only_runs_the_policy_alone(checkpoints, tiny_shards, mlflow_server, capsys):
    """``--layouts-only`` (a stage-1 checkpoint is enough): the layout curve of the layout
    sweep itself, no STEP forward, and only its table and plot in MLflow."""
    from mlflow.tracking import MlflowClient

    from pipelines.analyze.layouts import LayoutSweep
    from pipelines.cli import main
    from pipelines.common.checkpoint import load_model
    from pipelines.common.data import batch_to_device, eval_loader

    out = checkpoints["root"] / "layouts.json"
    model, _ = load_model(checkpoints["learned"])
    assert main(["analyze", "--checkpoint", checkpoints["learned"], "--data", tiny_shards["val"],
                 "--layouts-only", "--layout-thresholds", "0.5", "--budgets", "0.5",
                 "--tracking-uri", mlflow_server, "--experiment", "analyze",
                 "--json", str(out)]) == 0, capsys.readouterr().err[-3000:]
    doc = json.loads(out.read_text())
    assert doc["layouts_only"] and doc["tradeoff"] == [] and doc["flow"] is None
    sweep = LayoutSweep(model, 7, purities=[1.0, 0.98, 0.95, 0.9], thresholds=[0.5], budgets=[0.5])
    for images, labels in eval_loader(tiny_shards["val"], num_workers=0):
        sweep.update(*batch_to_device(images, labels, "cpu"))
    assert doc["num_images"] == sweep.images == 3
    assert [r["tokens_fraction"] for r in doc["layouts"]] == pytest.approx(
        [r["tokens_fraction"] for r in sweep.rows()])
    files = {f.path for f in MlflowClient(mlflow_server).list_artifacts(doc["run_id"], "analysis")}
    assert {"analysis/layouts.csv", "analysis/layouts.png"} <= files
    assert not {"analysis/tradeoff.csv", "analysis/flow_tokens.csv"} & files
    assert list(doc["seconds"]) == ["layouts"]  # nothing else ran
    assert doc["predicted_layouts"] is None and doc["predicted_vs_oracle"] is None


def test_predicted_layouts_from_the_checkpoints_own_unpruned_masks(checkpoints, tiny_shards,
                                                                    capsys):
    """``--predicted-layouts self``: the oracle's rule on the checkpoint's own unpruned masks
    (policy none, no halting), one row per purity, and their figure printed."""
    from pipelines.analyze.layouts import LayoutSweep
    from pipelines.cli import main
    from pipelines.common.checkpoint import load_model
    from pipelines.common.data import batch_to_device, eval_loader

    out = checkpoints["root"] / "predicted.json"
    assert main(["analyze", "--checkpoint", checkpoints["learned"], "--data", tiny_shards["val"],
                 "--layouts-only", "--layout-thresholds", "0.5", "--budgets", "0.5",
                 "--purities", "1.0", "0.95", "--predicted-layouts", "self", "--no-mlflow",
                 "--json", str(out)]) == 0, capsys.readouterr().err[-3000:]
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["predicted_layouts"] == "self"
    ref, _ = load_model(checkpoints["learned"])
    ref.eval().set_inference(policy_mode="none", halting=False)
    sweep = LayoutSweep(ref, 7, purities=[1.0, 0.95], thresholds=[], budgets=[],
                        predict=lambda images: ref(images).logits.argmax(1))
    for images, labels in eval_loader(tiny_shards["val"], num_workers=0):
        sweep.update(*batch_to_device(images, labels, "cpu"))
    want = [r for r in sweep.rows() if r["layout"] == "predicted"]
    got = [r for r in doc["layouts"] if r["layout"] == "predicted"]
    assert [r["setting"] for r in got] == [1.0, 0.95]
    assert [r["tokens_fraction"] for r in got] == pytest.approx([r["tokens_fraction"] for r in want])
    assert [r["ceiling_miou"] for r in got] == pytest.approx([r["ceiling_miou"] for r in want])
    assert "predicted_vs_oracle" in printed


def test_oracle_is_refused_without_allow_oracle_and_labelled_with_it(
        checkpoints, tiny_shards, mlflow_server, capsys):
    from mlflow.tracking import MlflowClient

    from pipelines.cli import main
    from pipelines.common.settings import ConfigError
    from pipelines.workflow.report import build_report

    val = tiny_shards["val"]
    # the checkpoint's own mode, and a mode asked for, are both refused, naming the flag
    for argv in (["--checkpoint", checkpoints["oracle"]],
                 ["--checkpoint", checkpoints["learned"], "--policy-mode", "oracle"]):
        assert main(["eval", *argv, "--data", val, "--no-mlflow"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("step eval: error: ") and "--allow-oracle" in err
    assert main(["tune", "--checkpoint", checkpoints["oracle"], "--data", val,
                 "--space", "exits_only"]) == 2
    assert "--allow-oracle" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="allow_oracle"):
        build_report(run_id="r", tracking_uri="sqlite:///unused.db", tune_doc={},
                     eval_doc={"inference": {"policy_mode": "oracle"}},
                     checkpoint=checkpoints["learned"], val_data=val, num_images=0)
    # allowed: computed, and labelled an upper bound that uses labels everywhere
    out = checkpoints["root"] / "eval_oracle.json"
    assert main(["eval", "--checkpoint", checkpoints["oracle"], "--data", val,
                 "--allow-oracle", "--max-samples", "1", "--latency-samples", "0",
                 "--tracking-uri", mlflow_server, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["uses_labels"] is True and doc["upper_bound"] is True
    assert "upper bound" in capsys.readouterr().out
    tags = MlflowClient(mlflow_server).get_run(doc["run_id"]).data.tags
    assert tags["step.uses_labels"] == "true" and tags["step.upper_bound"] == "true"


def test_a_pipeline_that_would_tune_the_oracle_is_refused_before_training(tmp_path, monkeypatch):
    import yaml

    from pipelines.common.settings import ConfigError
    from pipelines.workflow.runner import run_pipeline

    from helpers import LOVEDA, REPO

    monkeypatch.chdir(REPO)
    cfg = yaml.safe_load((REPO / "configs/tiny/pipeline.yaml").read_text())
    cfg.update(policy=None, step={"config": "configs/tiny/step.yaml"},  # oracle sharing
               tune={**cfg["tune"], "space": "exits_only"}, storage=str(tmp_path),
               data={**cfg["data"], "src": str(LOVEDA)})
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="tune.allow_oracle: true"):
        run_pipeline(path)


def test_halting_only_measures_a_held_out_group_stored_with_the_training_images(
        checkpoints, tiny_shards, mlflow_server, capsys):
    """``--halting-only`` where the held-out group sits in the training shards (as the
    CamVid pipeline keeps its dusk recording from training): val read whole, only that
    group's images of the training shards; figures per group; tables, reliability plots
    and metrics in MLflow."""
    from mlflow.tracking import MlflowClient

    from pipelines.cli import main

    out = checkpoints["root"] / "halting.json"
    # keys are <scene>_<copy>: the group is the copy (val: 0; train: 0 to 3, 3 held out)
    rc = main(["analyze", "--checkpoint", checkpoints["learned"], "--data", tiny_shards["val"],
               "--halting-only", "--groups.pattern", r"_(\d+)$",
               "--holdout-data", tiny_shards["train"], "--holdout-groups", "3",
               "--thresholds", "0.3", "--merge-thresholds", "0.5",
               "--tracking-uri", mlflow_server, "--experiment", "analyze", "--json", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-3000:]
    doc = json.loads(out.read_text())
    h = doc["halting"]
    assert doc["halting_only"] and doc["layouts"] == [] and doc["flow"] is None
    assert [(s["groups"], s["images"]) for s in h["sets"]] == [(None, 3), (["3"], 3)]
    assert {g: f["images"] for g, f in h["groups"].items()} == {"0": 3, "3": 3}
    assert doc["num_images"] == h["overall"]["images"] == 6
    assert h["inference"]["tuned"]["exit_thresholds"] == [0.3]
    assert not h["inference"]["merging_only"]["halting"]
    for f in [*h["groups"].values(), h["overall"]]:
        px = f["pixels"]
        assert px["halted"]["share"] + px["active"]["share"] == pytest.approx(1.0)
        assert px["halted"]["pixels"] == px["exit_4"]["pixels"] + px["exit_8"]["pixels"]
        assert f["drop_from_halting"] == pytest.approx(
            100 * (f["miou"]["merging_only"] - f["miou"]["tuned"]))
        # counted on what ran, for the plain and the tuned forward (not the merging-only one)
        assert f["gflops"]["plain"] > 0 and f["gflops"]["tuned"] > 0
        assert f["gflops"]["merging_only"] is None
        for e in ("exit_4", "exit_8"):
            assert len(f["calibration"][e]["halted"]["bins"]["count"]) == 15
            assert f["calibration"][e]["reaching"]["weight"] == px["halted"]["pixels"] \
                + px["active"]["pixels"]  # every labelled pixel reaches every exit there
    assert "halting protocol" in printed.out and "drop from halting" in printed.out
    from pipelines.analyze.halting_report import halting_tables

    header, rows = halting_tables(h)["halting_miou.csv"]
    assert header[-2:] == ["gflops_plain", "gflops_tuned"]  # no column that is always empty
    assert all(r[-1] > 0 and r[-2] > 0 for r in rows)
    client = MlflowClient(mlflow_server)
    files = {f.path for f in client.list_artifacts(doc["run_id"], "analysis")}
    assert {"analysis/halting_miou.csv", "analysis/halting_pixels.csv",
            "analysis/calibration.csv", "analysis/reliability.csv",
            "analysis/reliability_exit_4.png", "analysis/reliability_exit_8.png"} <= files
    assert "analysis/layouts.csv" not in files
    metrics = client.get_run(doc["run_id"]).data.metrics
    assert metrics["halting_3_drop_from_halting"] == pytest.approx(
        h["groups"]["3"]["drop_from_halting"])
    assert metrics["halting_all_exit_4_ece_reaching"] == pytest.approx(
        h["overall"]["calibration"]["exit_4"]["reaching"]["ece"])


def test_held_out_groups_need_a_definition_of_groups(capsys):
    from pipelines.cli import main

    assert main(["analyze", "--checkpoint", "unused", "--data", "unused", "--halting-only",
                 "--holdout-data", "unused", "--holdout-groups", "0001TP", "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("step analyze: error: ") and "holdout_groups: needs groups" in err
