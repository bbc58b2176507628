"""Groups, the tail, the robust guard and cliff edges: known inputs first, then real shards.

A drop limit that holds on the mean can break on a condition (a recording at dusk) that the
mean hides. These tests pin down each look past the mean on inputs whose answer is known:
figures per group, the drop on the worst fraction of the images, the guard's checks, the
cliff screen, the Bonferroni level of the confirmation; then held-out groups on real shards
(never searched, kept from training when asked, measured by the held-out check)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.common.groups import UNMATCHED, Groups, group_of_key
from pipelines.evaluate.bootstrap import ImageConfusions, miou_of
from pipelines.evaluate.groups import group_drops, group_miou, worst_group
from pipelines.evaluate.tail import tail_drop, worst_images
from pipelines.tune.guard import (
    GuardConfig,
    aggressive_neighbours,
    checks,
    cliff_step,
    confirm_confidence,
    ruled_drop,
)
from pipelines.tune.pareto import select

# ---- groups --------------------------------------------------------------------------------


def test_group_of_key_takes_the_first_capture_or_the_match():
    assert group_of_key(r"^([^_]+)_", "0001TP_006690") == "0001TP"
    assert group_of_key(r"^([^/]+)/", "aachen/aachen_000000_000019") == "aachen"
    assert group_of_key(r"^[a-z]+", "munster_01") == "munster"  # no group: the match
    assert group_of_key(r"^([^_]+)_", "nounderscore") == UNMATCHED


@pytest.mark.parametrize("bad, why", [
    ({}, "exactly one of pattern"),
    ({"pattern": "(", "column": None}, "not a regular expression"),
    ({"column": "class_pixels"}, "scalar manifest column"),
    ({"pattern": "x", "column": "split"}, "exactly one of pattern"),
])
def test_groups_settings_name_the_problem(bad, why):
    with pytest.raises(ValueError, match=why):
        Groups.model_validate(bad)


def _images(keys, diag, off=None):
    """Per-image 2-class matrices: ``diag[i]`` right pixels per class, ``off[i]`` pixels of
    class 0 predicted as 1."""
    off = off or [0] * len(keys)
    mats = np.zeros((len(keys), 2, 2), dtype=np.int64)
    for i, (d, o) in enumerate(zip(diag, off, strict=True)):
        mats[i] = [[d - o, o], [0, d]]
    return ImageConfusions(tuple(keys), mats)


KEYS = ("a_1", "a_2", "b_1", "b_2", "b_3")


def grouper(key: str) -> str:
    return key.split("_")[0]


def test_group_figures_are_the_miou_of_each_groups_summed_matrices():
    ref = _images(KEYS, [100] * 5)
    cand = _images(KEYS, [100] * 5, off=[0, 0, 40, 0, 0])  # group b loses, a does not
    per = group_drops(ref, cand, grouper)
    assert list(per) == ["a", "b"] and per["a"]["images"] == 2 and per["b"]["images"] == 3
    assert per["a"]["drop"] == pytest.approx(0.0)
    b_sum = cand.matrices[2:].sum(0)
    assert per["b"]["miou"] == pytest.approx(float(miou_of(b_sum)))
    assert per["b"]["drop"] == pytest.approx(100 * (1.0 - float(miou_of(b_sum))))
    assert group_miou(cand, grouper)["b"]["miou"] == per["b"]["miou"]
    assert worst_group(per, min_images=2) == ("b", per["b"]["drop"])
    assert worst_group(per, min_images=4) is None  # no group that large: nothing to guard


# ---- the tail --------------------------------------------------------------------------------


def test_tail_pools_the_images_the_candidate_hurts_most():
    ref = _images(KEYS, [100] * 5)
    cand = _images(KEYS, [100] * 5, off=[30, 0, 10, 0, 0])
    idx, drops = worst_images(ref, cand, 0.4)
    assert list(idx) == [0, 2]  # ceil(0.4 * 5) = 2 images, worst first
    assert drops[0] == pytest.approx(15.0) and drops[1] == 0.0
    t = tail_drop(ref, cand, 0.4)
    pooled = cand.matrices[[0, 2]].sum(0)
    assert t["drop"] == pytest.approx(100 * (1.0 - float(miou_of(pooled))))
    assert t["pixel_drop"] == pytest.approx((15.0 + 5.0) / 2)
    assert t["keys"] == ["a_1", "b_1"] and t["images"] == 2
    # the mean hides it: the whole set drops far less than its worst two images
    whole = 100 * (ref.miou() - cand.miou())
    assert t["drop"] > 2 * whole


def test_tail_is_zero_for_an_identical_candidate_and_independent_of_order():
    ref = _images(KEYS, [100, 80, 60, 90, 70])
    assert tail_drop(ref, ref, 0.2)["drop"] == 0.0
    cand = _images(KEYS, [100, 80, 60, 90, 70], off=[10, 10, 0, 10, 0])  # a three-way tie
    rev = lambda im: ImageConfusions(tuple(reversed(im.keys)), im.matrices[::-1].copy())  # noqa: E731
    assert tail_drop(ref, cand, 0.2)["keys"] == tail_drop(rev(ref), rev(cand), 0.2)["keys"]


# ---- the guard -----------------------------------------------------------------------------

# a cheap trial whose mean and interval keep the limit but whose worst images do not, and a
# dearer one that keeps every check
TRIALS = [
    {"trial_id": "mean-only", "miou": 0.49, "gflops": 3.0, "drop_lo": 0.2, "drop_hi": 1.8,
     "tail_drop": 5.5, "tail_images": 10, "worst_group_drop": 1.4, "params": {}},
    {"trial_id": "bad-group", "miou": 0.49, "gflops": 3.5, "drop_lo": 0.2, "drop_hi": 1.8,
     "tail_drop": 1.5, "tail_images": 10, "worst_group_drop": 2.6, "params": {}},
    {"trial_id": "robust", "miou": 0.495, "gflops": 5.0, "drop_lo": -0.3, "drop_hi": 1.4,
     "tail_drop": 1.9, "tail_images": 10, "worst_group_drop": 0.8, "params": {}},
]


def test_robust_guard_looks_past_the_mean():
    robust = select(TRIALS, 0.50, 2.0, "points", guard="robust")
    ci = select(TRIALS, 0.50, 2.0, "points", guard="ci")
    assert ci.best["trial_id"] == "mean-only"
    # robust: the worst group, not the tail, so the trial whose worst images lose 5.5
    # points is kept and the one whose worst group breaks the limit is not
    assert robust.best["trial_id"] == "mean-only" and robust.n_feasible == 2
    verdict = {c["name"]: c for c in checks(TRIALS[0], "robust", 2.0)}
    assert "tail" not in verdict and verdict["worst_group"]["ok"]
    assert not {c["name"]: c for c in checks(TRIALS[1], "robust", 2.0)}["worst_group"]["ok"]
    assert "worst 0.2 of the images" not in robust.message()


def test_strict_guard_checks_the_tail_too():
    strict = select(TRIALS, 0.50, 2.0, "points", guard="strict")
    assert strict.best["trial_id"] == "robust" and strict.n_feasible == 1
    assert strict.plain["trial_id"] == "mean-only"  # the point rule's answer, kept
    verdict = {c["name"]: c for c in checks(TRIALS[0], "strict", 2.0)}
    assert verdict["interval"]["ok"] and not verdict["tail"]["ok"]
    assert verdict["tail"]["value"] == 5.5 and verdict["tail"]["limit"] == 2.0
    assert "worst 0.2 of the images" in strict.message()
    # a tail of fewer images than tail.min_images is its noise: shown, not checked
    few = {**TRIALS[0], "tail_images": 2}
    assert "tail" not in {c["name"] for c in checks(few, "strict", 2.0)}


def test_ruled_drop_keeps_the_old_rules_and_maps_other_limits():
    t = {"drop": 1.0, "drop_hi": 2.5, "tail_drop": 3.0, "tail_images": 5}
    assert ruled_drop(t, "none", 2.0) == 1.0 and ruled_drop(t, "ci", 2.0) == 2.5
    custom = GuardConfig(tail={"fraction": 0.2, "max_drop": 4.0})
    assert ruled_drop(t, custom, 2.0) == 2.5  # the tail is 1.0 under its own limit of 4
    assert ruled_drop({**t, "tail_drop": 5.0}, custom, 2.0) == pytest.approx(3.0)
    assert ruled_drop({**t, "tail_drop": math.nan}, custom, 2.0) == math.inf


def test_guard_presets_and_mappings_validate():
    from pipelines.common.settings import ConfigError, validate
    from pipelines.tune.search import TuneSettings

    assert TuneSettings().guard.name == "robust" and TuneSettings().guard.tail is None
    assert validate(TuneSettings, {"guard": "ci"}).guard.name == "ci"
    assert validate(TuneSettings, {"guard": "strict"}).guard.tail is not None
    assert validate(TuneSettings, {"guard": {"tail": {}}}).guard.name == "strict"
    assert validate(TuneSettings, {"guard": {"groups": None}}).guard.name == "custom"
    with pytest.raises(ConfigError, match="guard"):
        validate(TuneSettings, {"guard": "maybe"})
    with pytest.raises(ConfigError, match="guard.tail.fraction"):
        validate(TuneSettings, {"guard": {"tail": {"fraction": 0.9}}})


def test_bonferroni_level_of_the_confirmation():
    assert confirm_confidence("robust", 0.95, 5) == pytest.approx(0.99)
    assert confirm_confidence("robust", 0.95, 1) == 0.95
    assert confirm_confidence("ci", 0.95, 5) == 0.95  # the guard before: no correction


# ---- cliff edges -----------------------------------------------------------------------------

def _space():
    from pipelines.tune.space import SearchSpace

    return SearchSpace.model_validate({
        "name": "t", "exit_thresholds": {"type": "uniform", "low": 0.2, "high": 1.0,
                                         "step": 0.1},
        "merge_thresholds": {"type": "uniform", "low": 0.0, "high": 1.0, "step": 0.1},
        "top_k": {"type": "choice", "values": [1, 5]},
        "exit_policy": {"type": "fixed", "value": "confidence"}})


def test_aggressive_neighbours_step_down_each_ordered_dimension():
    p = {"exit_threshold": 0.3, "merge_threshold": 0.0, "top_k": 5,
         "exit_policy": "confidence"}
    near = aggressive_neighbours(p, _space().dims)
    assert near == [{**p, "exit_threshold": 0.2}, {**p, "top_k": 1}]  # merge 0.0: the floor


def test_cliff_step_counts_only_neighbours_beyond_the_limit():
    t = {"drop": -1.0}
    assert cliff_step(t, [{"drop": 1.5}], 2.0) == (0.0, None)  # a gain to a feasible loss
    step, which = cliff_step(t, [{"drop": 2.4}, {"drop": 6.0, "id": "x"}], 2.0)
    assert step == pytest.approx(7.0) and which["id"] == "x"


class _Ctx:
    baseline = {"miou": 0.5}
    max_drop = 2.0
    drop_mode = "points"


def _trial(exit_t, merge, gflops, miou, top_k=5):
    return {"trial_id": f"{exit_t}-{merge}-{top_k}", "gflops": gflops, "miou": miou,
            "params": {"exit_threshold": exit_t, "merge_threshold": merge, "top_k": top_k,
                       "exit_policy": "confidence"}}


def test_screen_skips_a_cliff_edge_and_measures_missing_neighbours():
    """The cheapest feasible point (exit 0.3) has unmeasured neighbours, one of which (exit
    0.2) collapses: they are evaluated, the point is marked a cliff edge, and the guard
    picks the next point, whose neighbours keep a gentle slope."""
    from pipelines.tune.cliff import screen

    trials = [_trial(0.3, 0.5, 3.0, 0.49, top_k=1), _trial(0.4, 0.5, 3.5, 0.488, top_k=1),
              _trial(0.4, 0.4, 3.2, 0.47, top_k=1)]
    measured = {0.2: 0.40}  # exit 0.2: a 10-point drop
    calls = []

    def evaluate(params):
        calls.append(params)
        return {"trial_id": "n", "params": params, "gflops": 2.5,
                "miou": measured.get(params["exit_threshold"], 0.475)}

    guard = GuardConfig(tail=None, groups=None)
    out = screen(trials, _space(), _Ctx(), guard, want=1, echo=lambda line: None,
                 evaluate=evaluate)
    by_id = {t["trial_id"]: t for t in out}
    # exit 0.3's two unmeasured neighbours, one step down in exit and in merge threshold
    assert [(c["exit_threshold"], c["merge_threshold"]) for c in calls] == [(0.2, 0.5),
                                                                             (0.3, 0.4)]
    assert by_id["0.3-0.5-1"]["cliff_step"] == pytest.approx(9.0)
    # its measured neighbours: exit 0.3 keeps the limit, (0.4, 0.4) drops 3.0: +1.8
    assert by_id["0.4-0.5-1"]["cliff_step"] == pytest.approx(1.8)
    assert len(out) == len(trials) + 2 and {t.get("source") for t in out} == {None,
                                                                              "neighbour"}
    sel = select(out, 0.5, 2.0, "points", guard)
    assert sel.best["trial_id"] == "0.4-0.5-1"
    assert sel.plain["trial_id"] == "0.3-0.5-1"

    capped = screen(trials, _space(), _Ctx(), guard.model_copy(update={
        "cliff": guard.cliff.model_copy(update={"max_evaluations": 0})}), want=1,
        echo=lambda line: None, evaluate=evaluate)
    # nothing could be checked: no point is chosen rather than an unchecked one
    assert select(capped, 0.5, 2.0, "points", guard).best is None


# ---- held-out groups on real shards -----------------------------------------------------------

MODEL = {"backbone": "vit_tiny_patch16_384", "num_classes": 7, "decoder": "linear",
         "policy": {"mode": "threshold", "pretrained": False, "levels": [2, 4, 8]},
         "exits": {"blocks": [4, 8], "thresholds": [0.9]}}
BY_SCENE = {"pattern": "^([^_]+)_"}  # the session's shards: <scene>_<variant>


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random-init STEP checkpoint and a plain ViT one (no sharing, no exits)."""
    import torch

    from pipelines.common.checkpoint import save_checkpoint
    from pipelines.common.model import build_model

    root = tmp_path_factory.mktemp("groups")
    out = {}
    for name, cfg in (("step", MODEL), ("vit", {**MODEL, "policy": {"mode": "none"},
                                                 "exits": {"blocks": []}})):
        torch.manual_seed(0)
        out[name] = str(save_checkpoint(root / name, build_model(cfg)))
    return out


def test_held_out_groups_leave_the_search_and_the_training(tiny_shards):
    from pipelines.common.data import eval_loader, holdout_keys
    from pipelines.train.config import TrainConfig
    from pipelines.train.data import excluded_keys, train_loader

    holdout = {"groups": ["0"], "group_by": BY_SCENE, "from_training": True}

    def keys_of(uri, **kw):
        return [k for b in eval_loader(uri, num_workers=0, with_keys=True, **kw) for k in b[2]]

    assert keys_of(tiny_shards["val"], holdout=holdout) == ["1_0", "2_0"]
    assert keys_of(tiny_shards["val"], holdout=holdout, part="holdout") == ["0_0"]
    assert keys_of(tiny_shards["train"], holdout=holdout, part="groups") == [
        "0_0", "0_1", "0_2", "0_3"]
    searched, held = holdout_keys(tiny_shards["val"], {**holdout, "fraction": 0.54})
    assert held == {"0_0"} and searched == {"1_0", "2_0"}  # 0_0 is also the hash's pick

    cfg = TrainConfig.model_validate({
        "model": MODEL, "data": {"train": tiny_shards["train"], "batch_size": 1,
                                 "crop_size": 64, "num_workers": 0, "groups": BY_SCENE,
                                 "exclude_groups": ["0"]},
        "train": {"steps": 1}})
    assert excluded_keys(cfg) == {"0_0", "0_1", "0_2", "0_3"}
    loader = train_loader(cfg, epoch=0)
    loader.dataset.with_keys = True
    seen = {k for *_, ks in loader for k in ks}
    assert seen and not {k for k in seen if k.startswith("0_")}
    typo = cfg.model_copy(update={"data": cfg.data.model_copy(update={"exclude_groups": ["9"]})})
    with pytest.raises(ValueError, match=r"exclude_groups: \['9'\] not in the training split"):
        excluded_keys(typo)


def test_evaluation_per_group_against_both_baselines_and_the_held_out_group(tiny_shards,
                                                                             models):
    """The evaluate step's figures on real evaluations: the per-group mIoUs are those of
    the groups' own images, the drop against the plain ViT is there, and the held-out check
    counts the held-out group's training images plus the held-out validation image."""
    from pipelines.workflow.evaluation import evaluate_all
    from pipelines.workflow.holdout import holdout_line

    tuned = {"exit_thresholds": [0.2, 0.2], "merge_thresholds": {2: 0.0, 4: 0.0, 8: 0.0}}
    holdout = {"groups": ["0"], "group_by": BY_SCENE, "from_training": True}
    doc = evaluate_all(models["step"], tiny_shards["val"], tuned, max_samples=None,
                       device="cpu", plain_vit=models["vit"], groups=BY_SCENE, samples=100,
                       min_images=1, holdout={
                           "data": tiny_shards["val"], "train_data": tiny_shards["train"],
                           "holdout": holdout, "max_drop": 2.0, "drop_mode": "points",
                           "samples": 100, "plain": None})
    assert doc["baseline"]["num_images"] == 3 and doc["plain_vit"]["num_images"] == 3
    vs = doc["vs_unshared"]
    assert set(vs["groups"]) == {"0", "1", "2"} and vs["worst_group"] in vs["groups"]
    assert vs["worst_group_drop"] == max(g["drop"] for g in vs["groups"].values())
    assert doc["vs_plain_vit"]["reference_miou"] == pytest.approx(doc["plain_vit"]["miou"])
    assert doc["groups"]["tuned"]["0"]["images"] == 1
    check = doc["holdout"]
    assert check["images"] == 5  # 0_0 of val + 0_0 .. 0_3 of train
    assert set(check["groups"]) == {"0"} and check["groups"]["0"]["images"] == 5
    assert check["vs_plain_vit"]["baseline"]["num_images"] == 5
    assert check["limit_broken"] == (check["drop"] > 2.0 or check["worst_group_drop"] > 2.0)
    line = holdout_line(check)
    assert "worst group 0" in line and "against the plain ViT trained on its own" in line


def test_robust_search_reports_groups_tail_cliff_and_a_corrected_confirmation(
        tiny_shards, models, tmp_path, capsys):
    """``step tune`` with the default guard on real evaluations: every trial carries its
    tail and group figures, the cheapest candidates are screened for cliffs, the
    confirmation's intervals are at the Bonferroni level, and the answer says which checks
    it passed. The held-out group never reaches a trial."""
    from pipelines.cli import main

    space = tmp_path / "space.yaml"
    space.write_text("name: two\nexit_thresholds: {type: choice, values: [0.3, 0.9]}\n"
                     "merge_thresholds: {type: choice, values: [0.0]}\n")
    out, uri = tmp_path / "tune.json", f"sqlite:///{tmp_path / 'm.db'}"
    rc = main(["tune", "--checkpoint", models["step"], "--data", tiny_shards["val"],
               "--space", str(space), "--max-drop", "100", "--search", "grid",
               "--max-samples", "1", "--confirm-top", "2", "--bootstrap-samples", "200",
               "--set", f"groups.pattern={BY_SCENE['pattern']}", "--set", "holdout.groups=['0']",
               "--set", "guard.groups.min_images=1", "--set", "guard.tail={min_images: 1}",
               "--tracking-uri", uri,
               "--register-name", "", "--storage-path", str(tmp_path / "ray"),
               "--json", str(out)])
    captured = capsys.readouterr()
    printed = captured.out
    assert rc == 0, captured.err
    import json

    doc = json.loads(out.read_text())
    # strict (robust and the tail), with groups and tails of one image checked (the shards
    # hold one image per scene)
    assert doc["guard"] == "custom" and doc["guard_config"]["groups"]["min_images"] == 1
    assert doc["guard_config"]["tail"] and doc["holdout"]["groups"] == ["0"]
    conf = doc["confirmation"]
    assert conf["images"] == 2  # scenes 1 and 2; scene 0 is held out
    n = len(conf["candidates"])
    best = doc["best"]
    assert best["confirm_confidence"] == pytest.approx(1 - 0.05 / n)
    assert set(best["groups"]) == {"1", "2"} and best["tail_drop"] is not None
    assert best["cliff_step"] is not None  # screened: its neighbours were measured
    assert [c["name"] for c in doc["guard_verdict"]] == ["interval", "tail", "worst_group",
                                                         "cliff"]
    assert all(c["ok"] for c in doc["guard_verdict"])
    assert "cliff: " in printed and "Bonferroni over" in printed


def test_step_eval_gives_mIoU_per_group_and_the_drop_against_the_reference(tiny_shards, models,
                                                                           tmp_path, capsys):
    import json

    from pipelines.cli import main

    out = tmp_path / "eval.json"
    rc = main(["eval", "--checkpoint", models["step"], "--data", tiny_shards["val"],
               "--thresholds", "0.3", "--merge-thresholds", "0.0",
               "--set", f"groups.pattern={BY_SCENE['pattern']}", "--set", "reference=true",
               "--no-mlflow", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())["result"]
    assert set(res["groups"]) == {"0", "1", "2"}
    assert all(g["images"] == 1 for g in res["groups"].values())
    d = res["drop"]
    assert d["drop"] == pytest.approx(100 * (d["reference_miou"] - res["miou"]), abs=1e-9)
    assert d["worst_group_drop"] == max(g["drop"] for g in d["groups"].values())
    assert d["tail"]["images"] == 1  # ceil(0.2 x 3)
    assert "drop against the unpruned reference" in capsys.readouterr().out


def test_cliff_neighbours_run_with_the_searchs_own_settings(tiny_shards, models):
    """A neighbour is evaluated like a trial: the search's starting settings
    (``tune.inference``, here halting off) with the neighbour's thresholds, not the
    checkpoint's own settings (which halt at exit 0.0)."""
    from pipelines.common.checkpoint import resolve_checkpoint_dir
    from pipelines.common.oracle import checkpoint_inference
    from pipelines.tune.cliff import _evaluate
    from pipelines.tune.space import SearchSpace
    from pipelines.tune.trial import TrialContext

    space = SearchSpace.model_validate({
        "name": "t", "exit_thresholds": {"type": "choice", "values": [0.0, 0.5]},
        "merge_thresholds": {"type": "choice", "values": [0.5]}})
    halted = {}
    for halting in (True, False):
        base = checkpoint_inference(resolve_checkpoint_dir(models["step"]),
                                    {"halting": halting, "top_k": 0}).to_dict()
        ctx = TrialContext(space=space.model_dump(mode="json"), base=base, num_exits=2,
                           checkpoint=models["step"], data=tiny_shards["val"],
                           baseline={"miou": 0.5, "gflops": 10.0}, max_drop=2.0,
                           drop_mode="points", max_samples=2)
        rec = _evaluate(space, ctx, {"exit_threshold": 0.0, "merge_threshold": 0.5})
        halted[halting] = rec["halted_fraction"]
        assert rec["num_images"] == 2
    assert halted[True] > 0.5 and halted[False] == 0.0
