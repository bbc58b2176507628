"""The guard against noisy searches: the drop limit must hold beyond the images the
search saw.

Known inputs first (the bootstrap interval against a direct loop, the guarded rule, the
confirmation's candidates, the hash split), then real evaluations on real shards: the
held-out images never reach a trial, and one small search confirms its answer on every
searchable image and registers the full-split drop with its interval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines.common.holdout import Holdout, is_held_out, key_unit
from pipelines.evaluate.bootstrap import (
    ImageConfusions,
    bootstrap_drops,
    paired_bootstrap,
    resample_indices,
)
from pipelines.evaluate.metrics import confusion_matrix, per_image_confusion, scores_from_confusion
from pipelines.tune.pareto import select

# ---- the interval --------------------------------------------------------------------------


def _pair(n: int = 30, c: int = 4, seed: int = 0) -> tuple[ImageConfusions, ImageConfusions]:
    """A reference and a candidate that confuses class 0 with 1 on some images."""
    rng = np.random.default_rng(seed)
    ref = rng.integers(0, 40, size=(n, c, c)) + np.eye(c, dtype=np.int64) * 200
    cand = ref.copy()
    moved = np.minimum(cand[:, 0, 0], rng.integers(0, 120, n))
    cand[:, 0, 0] -= moved
    cand[:, 0, 1] += moved
    keys = tuple(f"img{i:03d}" for i in range(n))
    return ImageConfusions(keys, ref), ImageConfusions(keys, cand)


@pytest.mark.parametrize("mode", ["points", "relative"])
def test_interval_equals_a_direct_bootstrap_loop(mode):
    """Same seed -> same draws: the vectorised resamples equal a plain loop that sums the
    drawn images' matrices and scores them with the evaluator's own mIoU."""
    ref, cand = _pair()
    samples, seed = 300, 7
    fast = bootstrap_drops(ref, cand, mode=mode, samples=samples, seed=seed)
    direct = []
    for draw in resample_indices(len(ref), samples, seed):
        r = scores_from_confusion(torch.from_numpy(ref.matrices[draw].sum(0))).miou
        k = scores_from_confusion(torch.from_numpy(cand.matrices[draw].sum(0))).miou
        direct.append(100 * (r - k) / (r if mode == "relative" else 1.0))
    np.testing.assert_allclose(fast, direct, rtol=0, atol=1e-9)

    iv = paired_bootstrap(ref, cand, mode=mode, samples=samples, seed=seed)
    lo, hi = np.percentile(direct, [2.5, 97.5])
    assert (iv.lo, iv.hi) == pytest.approx((lo, hi), abs=1e-9)
    whole_r = scores_from_confusion(torch.from_numpy(ref.matrices.sum(0))).miou
    whole_k = scores_from_confusion(torch.from_numpy(cand.matrices.sum(0))).miou
    assert iv.drop == pytest.approx(100 * (whole_r - whole_k) / (
        whole_r if mode == "relative" else 1.0), abs=1e-9)
    assert iv.lo < iv.drop < iv.hi and iv.images == 30


def test_interval_is_paired_and_refuses_other_images():
    """Pairing: a candidate equal to the reference has a zero-width interval at 0, however
    much the images differ; evaluations of other images (keys) are refused."""
    ref, cand = _pair()
    same = paired_bootstrap(ref, ref, samples=200)
    assert same.drop == same.lo == same.hi == 0.0
    shuffled = ImageConfusions(tuple(reversed(cand.keys)), cand.matrices[::-1].copy())
    with pytest.raises(ValueError, match="other images than the reference"):
        paired_bootstrap(ref, shuffled)
    with pytest.raises(ValueError, match="not the same evaluation set"):
        paired_bootstrap(ref, ImageConfusions(cand.keys[:-1], cand.matrices[:-1]))


def test_block_resamples_are_runs_of_consecutive_images_in_key_order():
    """Each block resample is ceil(n / L) runs of L consecutive indices (wrapping round), cut
    to n; ``auto`` is round(n ** (1/3)); block 1 keeps the one-by-one draws."""
    from pipelines.evaluate.bootstrap import block_length

    n, L = 23, 4
    draws = resample_indices(n, 50, seed=3, block=L)
    assert draws.shape == (50, n)
    for row in draws:
        for start in range(0, n, L):
            run = row[start:start + L]
            assert all((b - a) % n == 1 for a, b in zip(run[:-1], run[1:], strict=True))
    np.testing.assert_array_equal(resample_indices(n, 50, seed=3, block=1),
                                  resample_indices(n, 50, seed=3))
    assert [block_length("auto", k) for k in (8, 50, 76, 101)] == [2, 4, 4, 5]
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        block_length(0, 10)


def test_a_block_bootstrap_widens_the_interval_of_correlated_frames():
    """Frames in runs that share their loss (a scene seen for 8 frames): resampling them one
    by one counts each run 8 times as evidence; runs of 8 frames do not. On independent
    frames both intervals agree. Keys, not the evaluation's order, set the runs."""
    rng = np.random.default_rng(1)
    n, run, c = 96, 8, 4
    keys = [f"rec_{i:04d}" for i in range(n)]
    order = rng.permutation(n)  # evaluated in another order than the frames'

    def frames(loss: np.ndarray) -> tuple[ImageConfusions, ImageConfusions]:
        ref = rng.integers(0, 30, size=(n, c, c)) + np.eye(c, dtype=np.int64) * 300
        cand = ref.copy()
        moved = np.minimum(cand[:, 0, 0], loss)
        cand[:, 0, 0] -= moved
        cand[:, 0, 1] += moved
        ordered = tuple(keys[i] for i in order)
        return ImageConfusions(ordered, ref[order]), ImageConfusions(ordered, cand[order])

    r, k = frames(np.repeat(rng.integers(0, 250, n // run), run))  # a loss per scene
    iid = paired_bootstrap(r, k, samples=2000, block=1)
    blocks = paired_bootstrap(r, k, samples=2000, block=run)
    assert blocks.block == run and iid.block == 1 and blocks.drop == iid.drop
    assert (blocks.hi - blocks.lo) > 1.5 * (iid.hi - iid.lo)
    r, k = frames(rng.integers(0, 250, n))  # a loss per frame
    a = paired_bootstrap(r, k, samples=2000, block=1)
    b = paired_bootstrap(r, k, samples=2000, block=run)
    assert (b.hi - b.lo) < 1.35 * (a.hi - a.lo)
    with pytest.raises(ValueError, match="key order"):
        paired_bootstrap(ImageConfusions(None, r.matrices), ImageConfusions(None, k.matrices),
                         block=2)


def test_per_image_matrices_sum_to_the_batch_matrix():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (3, 6, 7), generator=g)
    target = torch.randint(0, 5, (3, 6, 7), generator=g)
    target[1, :2] = 255  # ignored pixels
    per = per_image_confusion(pred, target, 5)
    assert per.shape == (3, 5, 5) and per.dtype == torch.int64
    for i in range(3):
        assert torch.equal(per[i], confusion_matrix(pred[i], target[i], 5))
    assert torch.equal(per.sum(0), confusion_matrix(pred, target, 5))


# ---- the guarded rule ----------------------------------------------------------------------

# baseline 0.50, limit 2 points. "risky": cheapest, point drop 1.5 but upper end 2.6;
# "safe": dearer, drop 0.5 [-0.3, 1.4]; "bad": infeasible either way.
GUARD_TRIALS = [
    {"trial_id": "risky", "miou": 0.485, "gflops": 3.0, "drop_lo": 0.4, "drop_hi": 2.6,
     "params": {}},
    {"trial_id": "safe", "miou": 0.495, "gflops": 5.0, "drop_lo": -0.3, "drop_hi": 1.4,
     "params": {}},
    {"trial_id": "bad", "miou": 0.47, "gflops": 1.0, "drop_lo": 2.2, "drop_hi": 3.9,
     "params": {}},
]


def test_guard_ci_rejects_a_trial_whose_interval_crosses_the_limit():
    ci = select(GUARD_TRIALS, 0.50, 2.0, "points", guard="ci")
    plain = select(GUARD_TRIALS, 0.50, 2.0, "points", guard="none")
    assert plain.best["trial_id"] == "risky" and plain.n_feasible == 2
    assert ci.best["trial_id"] == "safe" and ci.n_feasible == 1
    # both answers are kept whatever the guard, with their GFLOPs
    for sel in (ci, plain):
        assert sel.plain["trial_id"] == "risky" and sel.guarded["trial_id"] == "safe"
    assert "guarded (interval's upper end): 5.000 GFLOPs" in ci.choices()
    assert "<- chosen" in ci.choices().splitlines()[1]
    assert "[-0.30, 1.40]" in ci.message()
    # nothing within the limit under ci: the closest is judged by the upper end too
    none = select(GUARD_TRIALS, 0.50, 1.0, "points", guard="ci")
    assert none.best is None and none.closest["trial_id"] == "safe"


def test_trial_metrics_follow_the_guard():
    """What a trial reports (feasible, the searcher's objective) uses the guarded drop."""
    from pipelines.evaluate.bootstrap import DropInterval
    from pipelines.tune.trial import trial_metrics

    base = {"miou": 0.50, "gflops": 10.0}
    m = {"miou": 0.485, "gflops": 3.0}
    iv = DropInterval(drop=1.5, lo=0.4, hi=2.6, confidence=0.95, samples=1000, images=50)
    ci = trial_metrics(m, base, 2.0, "points", interval=iv, guard="ci")
    plain = trial_metrics(m, base, 2.0, "points", interval=iv, guard="none")
    assert ci["drop_lo"] == 0.4 and ci["drop_hi"] == 2.6
    assert ci["feasible"] == 0.0 and plain["feasible"] == 1.0
    assert plain["objective"] == pytest.approx(0.3) and ci["objective"] > 10


def test_confirmation_candidates_cover_both_rules():
    from pipelines.tune.confirm import candidates

    more = [*GUARD_TRIALS,
            {"trial_id": "risky2", "miou": 0.482, "gflops": 3.5, "drop_lo": 0.5,
             "drop_hi": 3.0, "params": {}}]
    got = [t["trial_id"] for t in candidates(more, 0.50, 2.0, "points", top=1)]
    assert got == ["risky", "safe"]  # cheapest under each rule, cheapest first
    got = [t["trial_id"] for t in candidates(more, 0.50, 2.0, "points", top=2)]
    assert got == ["risky", "risky2", "safe"]


def test_confirmation_takes_each_operating_point_once():
    """Optuna proposed exit 0.6 / merge 0.2 three times in one CamVid search: the three
    cheapest candidates must be three different points."""
    from pipelines.tune.confirm import candidates

    point = {"exit_threshold": 0.6, "merge_threshold": 0.2, "top_k": 1}
    trials = [{"trial_id": f"same{i}", "miou": 0.49, "gflops": 3.0, "drop_lo": 0.5,
               "drop_hi": 1.5, "params": dict(point)} for i in range(3)]
    trials += [{"trial_id": f"other{i}", "miou": 0.49, "gflops": 3.5 + i, "drop_lo": 0.5,
                "drop_hi": 1.5, "params": {**point, "merge_threshold": 0.3 + i / 10}}
               for i in range(2)]
    got = [t["trial_id"] for t in candidates(trials, 0.50, 2.0, "points", top=3)]
    assert got == ["same0", "other0", "other1"]


# ---- the hash split ------------------------------------------------------------------------


def test_hash_split_is_deterministic_stable_and_sized():
    keys = [f"scene{i:04d}" for i in range(4000)]
    held = {k for k in keys if is_held_out(k, 0.3)}
    assert abs(len(held) / len(keys) - 0.3) < 0.03
    # pinned: a change of hash or byte order would silently move images between parts
    assert key_unit("scene0000") == pytest.approx(
        int.from_bytes(__import__("hashlib").sha256(b"scene0000").digest()[:8], "big") / 2**64)
    assert [is_held_out(k, 0.3) for k in ("a", "b", "c", "d")] == [
        key_unit(k) < 0.3 for k in ("a", "b", "c", "d")]
    # stable: other keys, their order, and a larger fraction never un-hold an image
    assert {k for k in reversed(keys[:1000]) if is_held_out(k, 0.3)} == {
        k for k in held if k in set(keys[:1000])}
    assert held <= {k for k in keys if is_held_out(k, 0.5)}


def test_holdout_settings_name_the_field():
    from pipelines.common.settings import ConfigError, validate
    from pipelines.tune.search import TuneSettings

    assert Holdout(fraction=0.3).describe().startswith("0.3 of the validation images")
    for bad, why in (({"fraction": 1.5}, "holdout.fraction"),
                     ({"split": "test", "fraction": 0.2}, "not both"),
                     ({}, "give split .* fraction .* or groups"),
                     ({"fraction": 0.2, "from_training": True}, "from_training: needs groups"),
                     ({"groups": ["a"]}, "holdout.groups: needs groups")):
        with pytest.raises(ConfigError, match=why):
            validate(TuneSettings, {"holdout": bad})
    with pytest.raises(ConfigError, match="guard"):
        validate(TuneSettings, {"guard": "maybe"})


# ---- the pipeline's warning ------------------------------------------------------------------

CHECK = {"holdout": "0.3 of the validation images, by key hash", "images": 25,
         "max_drop": 2.0, "drop_mode": "points", "confidence": 0.95,
         "baseline": {"miou": 0.3242}, "tuned": {"miou": 0.2934, "gflops": 4.94},
         "drop": 3.08, "drop_lo": 1.2, "drop_hi": 4.9, "within_limit": False,
         "limit_broken": True}


def test_a_broken_limit_is_said_plainly_in_the_report_and_tags():
    from pipelines.tracking.registry import holdout_tags
    from pipelines.workflow.holdout import holdout_line
    from pipelines.workflow.report import choices_lines, summary_table

    line = holdout_line(CHECK)
    assert line.startswith("WARNING: the drop limit is broken on 25 held-out images")
    assert "drop 3.08 points (95% interval [1.20, 4.90])" in line and "> the limit 2" in line
    assert holdout_tags(CHECK)["holdout.limit_broken"] == "true"
    ok = {**CHECK, "drop": 0.5, "limit_broken": False, "within_limit": True}
    assert holdout_line(ok).startswith("held-out check passed")
    assert holdout_tags(ok)["holdout.limit_broken"] == "false"
    table = summary_table({"baseline": {"miou": 0.33, "gflops": 11.9},
                           "tuned": {"miou": 0.32, "gflops": 4.9}, "holdout": CHECK})
    assert table.splitlines()[-1] == line
    doc = {"guard": "ci", "best": {"trial_id": "s"},
           "plain": {"trial_id": "r", "gflops": 3.0, "miou": 0.485, "drop": 1.5,
                     "drop_lo": 0.4, "drop_hi": 2.6, "num_images": 71},
           "guarded": {"trial_id": "s", "gflops": 5.0, "miou": 0.495, "drop": 0.5}}
    lines = choices_lines(doc)
    assert lines[0] == ("- plain choice (point drop within the limit): 3.000 GFLOPs, mIoU "
                        "48.50, drop 1.50 [0.40, 2.60] on 71 images")
    assert lines[1].endswith("(chosen)")


def test_pipeline_holdout_config():
    from pipelines.workflow.config import DataSection

    assert DataSection(src="x", holdout={"split": "test"}).holdout.split == "test"
    with pytest.raises(ValueError, match="must differ from train_split and val_split"):
        DataSection(src="x", holdout={"split": "val"})
    with pytest.raises(ValueError, match="hold out a fraction"):
        DataSection(src="x", tile={"size": 128}, holdout={"split": "test"})


# ---- real evaluations on real shards ----------------------------------------------------------

MODEL = {"backbone": "vit_tiny_patch16_384", "num_classes": 7, "decoder": "linear",
         "policy": {"pretrained": False, "levels": [2, 4, 8]}, "exits": {"blocks": [4, 8]}}
INFERENCE = {"policy_mode": "threshold", "exit_thresholds": [0.9]}


@pytest.fixture(scope="module")
def case(tmp_path_factory, tiny_shards):
    """A tiny random-init STEP checkpoint over the session's LoveDA shards (val: 3 scenes
    at 256 px, 1 per shard); a held-out fraction that holds out exactly one of them."""
    from pipelines.common.checkpoint import save_checkpoint
    from pipelines.common.data import holdout_keys
    from pipelines.common.model import build_model

    root = tmp_path_factory.mktemp("guard")
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "ckpt", build_model(MODEL, INFERENCE))
    # the keys 0_0, 1_0, 2_0 hash to 0.528, 0.570, 0.545: 0.54 holds out 0_0 alone
    holdout = {"fraction": 0.54}
    searched, held = holdout_keys(tiny_shards["val"], holdout)
    assert len(held) == 1 and len(searched) == 2, (searched, held)
    return {"ckpt": str(ckpt), "val": tiny_shards["val"], "holdout": holdout,
            "searched": searched, "held": held, "root": root}


def test_held_out_images_never_reach_a_trial(case):
    """What the trials' loader yields, and what a trial's evaluation covers, is disjoint
    from the held-out keys; the held-out part yields exactly those."""
    from pipelines.common.data import eval_loader
    from pipelines.tune.trial import evaluate_images, reference_inference

    def keys_of(**kw):
        return [k for batch in eval_loader(case["val"], num_workers=0, with_keys=True, **kw)
                for k in batch[2]]

    searched = keys_of(holdout=case["holdout"])
    assert set(searched) == case["searched"] and not set(searched) & case["held"]
    assert keys_of(holdout=case["holdout"], part="holdout") == sorted(case["held"])
    assert len(keys_of(holdout=case["holdout"], max_samples=1)) == 1
    assert len(keys_of()) == 3  # without a holdout: every image

    m, images = evaluate_images(case["ckpt"], case["val"], reference_inference(),
                                max_samples=None, device="cpu", holdout=case["holdout"])
    assert set(images.keys) == case["searched"] and m["num_images"] == 2
    # the per-image matrices are the evaluation's own confusion matrix, split by image
    assert images.miou() == pytest.approx(m["miou"], abs=1e-12)

    with pytest.raises(ValueError, match="held out from the search"):
        eval_loader(case["val"], holdout={"split": "val"})


def test_holdout_check_evaluates_the_held_out_images(case):
    """The evaluate step's check: reference and tuned model on the one held-out image, the
    drop with its interval, and the verdict against the limit."""
    from pipelines.workflow.holdout import holdout_check, holdout_line

    tuned = {"exit_thresholds": [0.2, 0.2], "merge_thresholds": {2: 0.0, 4: 0.0, 8: 0.0}}
    check = holdout_check(case["ckpt"], case["val"], case["holdout"], tuned, max_drop=0.0,
                          drop_mode="points", device="cpu", samples=100)
    assert check["images"] == 1 and check["baseline"]["num_images"] == 1
    assert check["tuned"]["gflops"] < check["baseline"]["gflops"]
    assert check["drop_lo"] <= check["drop"] <= check["drop_hi"]
    assert check["limit_broken"] == (check["drop"] > 1e-9)
    assert holdout_line(check).startswith("WARNING" if check["limit_broken"] else "held-out")


def test_search_confirms_on_every_searchable_image_and_registers_the_interval(case, tmp_path,
                                                                              capsys):
    """``step tune`` on 1 image per trial with a held-out fraction: each trial's MLflow run
    has its interval, the candidates are re-evaluated on both searchable images (never the
    held-out one), and the registry tags carry the full-split drop and interval."""
    from mlflow.tracking import MlflowClient

    from pipelines.cli import main

    space = tmp_path / "space.yaml"
    space.write_text("name: two\nexit_thresholds: {type: choice, values: [0.2, 1.0]}\n"
                     "merge_thresholds: {type: choice, values: [0.0]}\n")
    out, uri = tmp_path / "tune.json", f"sqlite:///{tmp_path / 'm.db'}"
    rc = main(["tune", "--checkpoint", case["ckpt"], "--data", case["val"], "--space",
               str(space), "--max-drop", "100", "--search", "grid", "--max-samples", "1",
               "--confirm-top", "1", "--bootstrap-samples", "200", "--guard", "ci",
               "--set", "holdout.fraction=0.54", "--tracking-uri", uri,
               "--register-name", "guard-model", "--storage-path", str(tmp_path / "ray"),
               "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    doc = json.loads(out.read_text())
    assert doc["guard"] == "ci" and doc["baseline"]["num_images"] == 1
    conf = doc["confirmation"]
    assert conf["images"] == 2 and 1 <= len(conf["candidates"]) <= 2
    assert doc["evaluations"] == 2 + 1 + len(conf["candidates"]) + 1
    best = doc["best"]
    assert best["num_images"] == 2 and best["search"]["num_images"] == 1
    assert best["drop_lo"] <= best["drop_hi"] and doc["plain"] and doc["guarded"]
    assert "confirm: the reference on all" in printed and "guarded (interval's upper end)" in printed

    client = MlflowClient(uri)
    kids = client.search_runs(
        [client.get_run(doc["parent_run_id"]).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{doc['parent_run_id']}'")
    assert len(kids) == 2 and all({"drop_lo", "drop_hi"} <= set(k.data.metrics) for k in kids)
    reg = doc["registered_model"]
    tags = client.get_model_version(reg["name"], reg["version"]).tags
    assert float(tags["miou_drop"]) == pytest.approx(best["drop"])
    assert float(tags["miou_drop_hi"]) == pytest.approx(best["drop_hi"])
    assert tags["eval_images"] == "2" and tags["guard"] == "ci"


def test_confirmation_goes_on_to_the_next_candidates_when_none_passes(monkeypatch):
    """Round 1 confirms the cheapest point, which fails on the whole split; round 2 the next,
    which passes and is chosen; intervals of both at the level for two candidates. (The
    evaluation is replaced by figures per point: what is tested is the rounds' logic.)"""
    from pipelines.evaluate.bootstrap import DropInterval
    from pipelines.tune import confirm as confirm_module
    from pipelines.tune.space import SearchSpace
    from pipelines.tune.trial import TrialContext

    full_split = {0.2: (0.470, 2.2, 3.5), 0.5: (0.490, 1.0, 1.8), 0.8: (0.495, 0.5, 1.2)}

    def evaluate(checkpoint, data, inference, **kw):
        t = (inference.exit_thresholds or [1.0])[0]
        miou, lo, hi = full_split.get(t, (0.5, 0.0, 0.0))
        return {"miou": miou, "gflops": 10 * t if t < 1 else 10.0, "num_images": 3}, (lo, hi)

    levels = []

    def interval(ctx, images):
        levels.append(ctx.confidence)
        lo, hi = images
        return DropInterval(drop=(lo + hi) / 2, lo=lo, hi=hi, confidence=ctx.confidence,
                            samples=100, images=3)

    monkeypatch.setattr(confirm_module, "evaluate_images", evaluate)
    monkeypatch.setattr(confirm_module, "drop_interval", interval)
    monkeypatch.setattr(confirm_module, "slice_figures", lambda ctx, images: {})
    space = SearchSpace.model_validate(
        {"name": "t", "exit_thresholds": {"type": "choice", "values": [0.2, 0.5, 0.8]}})
    trials = [{"trial_id": f"e{t}", "params": {"exit_threshold": t}, "miou": 0.49,
               "gflops": 10 * t, "drop": 1.0, "drop_lo": 0.0, "drop_hi": 1.5}
              for t in (0.2, 0.5, 0.8)]
    from pipelines.tune.guard import as_guard

    # the interval with Bonferroni at the confirmation (no tail, group or cliff figures here)
    guard = as_guard({"interval": True, "tail": None, "groups": None, "cliff": None,
                      "multiplicity": "bonferroni"})
    ctx = TrialContext(space={}, base={}, num_exits=1, checkpoint="c", data="d",
                       baseline={"miou": 0.5, "num_images": 1}, max_drop=2.0,
                       drop_mode="points", max_samples=1, guard=guard)
    lines: list[str] = []

    def cands(top):
        return confirm_module.candidates(trials, 0.5, 2.0, "points", top, "ci")

    got = confirm_module.confirm(ctx, space, cands, top=1, rounds=3, echo=lines.append)
    assert [t["trial_id"] for t in got.trials] == ["e0.2", "e0.5"]  # round 3 not needed
    assert got.selection.best["trial_id"] == "e0.5"
    assert any("round 2: the next 1" in line for line in lines)
    # round 2 recomputed both intervals at the level for two candidates (Bonferroni)
    assert levels[-2:] == [pytest.approx(1 - 0.05 / 2)] * 2
    assert got.trials[0]["confirm_confidence"] == pytest.approx(1 - 0.05 / 2)
    # one round only: the search ends without a choice, as before
    one = confirm_module.confirm(ctx, space, cands, top=1, rounds=1, echo=lines.append)
    assert one.selection.best is None and len(one.trials) == 1
