"""Every shipped search space loads and validates; bad spaces fail naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

import tune_spaces
from pipelines.common.settings import ConfigError
from pipelines.tune.space import load_space
from step_model.config import InferenceConfig


@pytest.mark.parametrize("name", tune_spaces.names())
def test_shipped_space_loads(name):
    space = load_space(name)
    assert space.name == name and space.searched
    # every shipped space is discretised, so Optuna and the exhaustive grid share it
    assert space.grid_size() and space.grid_size() > 1
    params = {n: (d.grid()[len(d.grid()) // 2]) for n, d in space.dims.items()}
    kwargs = space.to_inference(params, num_exits=2).given()
    if "exit_thresholds" in kwargs:  # one per exit, or one for every exit
        assert len(kwargs["exit_thresholds"]) in (1, 2)
        assert all(0.0 <= t <= 1.0 for t in kwargs["exit_thresholds"])
        InferenceConfig().apply(kwargs).check_exits(2)
    if "merge_thresholds" in kwargs:
        assert set(kwargs["merge_thresholds"]) <= {2, 4, 8, 16}
    grid = space.tune_param_space("grid")
    assert set(grid) == set(space.dims)


def test_to_inference_maps_flat_params():
    space = load_space("joint")
    params = {"exit_threshold_1": 0.9000000001, "exit_threshold_2": 0.8,
              "merge_threshold_2": 0.5, "merge_threshold_4": 0.6, "merge_threshold_8": 0.7,
              "merge_threshold_16": 0.8, "top_k": 5.0, "exit_policy": "confidence"}
    kw = space.to_inference(params, num_exits=2).given()
    assert kw == {"exit_thresholds": [0.9, 0.8],
                  "merge_thresholds": {2: 0.5, 4: 0.6, 8: 0.7, 16: 0.8},
                  "top_k": 5, "exit_policy": "confidence"}
    with pytest.raises(ConfigError, match="2 thresholds but the model has 3"):
        space.to_inference(params, num_exits=3)


BAD = {
    "threshold above 1": ("exit_thresholds: {type: uniform, low: 0.5, high: 1.5}",
                          "exit_threshold: 1.5 is not a valid exit_thresholds"),
    "low >= high": ("exit_thresholds: {type: uniform, low: 0.9, high: 0.5}", "low (0.9) must be"),
    "step does not divide": ("exit_thresholds: {type: uniform, low: 0.5, high: 1.0, step: 0.3}",
                             "not a multiple of step"),
    "merge and budget": ("merge_thresholds: {type: fixed, value: 0.5}\n"
                         "budget: {type: uniform, low: 0.2, high: 1.0}", "exclude each other"),
    "bad level": ("merge_thresholds: {3: {type: fixed, value: 0.5}}\ntop_k: {type: choice, values: [1, 2]}",
                  "merge_thresholds"),
    "bad policy": ("exit_policy: {type: choice, values: [confidence, greedy]}", "exit_policy"),
    "nothing varies": ("top_k: {type: fixed, value: 5}", "varies nothing"),
    "budget above 1": ("budget: {type: choice, values: [0.5, 64]}",
                       "budget: 64 is not a valid budget"),
    "fractional top_k": ("top_k: {type: uniform, low: 0, high: 4}", "top_k: takes no fractions"),
    "bad varlen": ("varlen: {type: choice, values: [auto, jagged]}", "varlen: 'jagged'"),
    "unknown key": ("exit_tresholds: {type: fixed, value: 0.5}", "exit_tresholds: unknown key"),
    "unknown dim type": ("top_k: {type: normal, values: [1]}", "top_k"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_space_is_reported(tmp_path: Path, case):
    body, expected = BAD[case]
    f = tmp_path / "space.yaml"
    f.write_text(f"name: bad\n{body}\n")
    with pytest.raises(ConfigError) as err:
        load_space(f)
    assert expected in str(err.value) and str(f) in str(err.value)


def test_grid_needs_steps(tmp_path: Path):
    f = tmp_path / "cont.yaml"
    f.write_text("name: cont\nexit_thresholds: {type: uniform, low: 0.5, high: 1.0}\n")
    space = load_space(f)
    assert space.grid_size() is None
    with pytest.raises(ConfigError, match="give it a `step`"):
        space.tune_param_space("grid")


def test_unknown_space_name_lists_shipped():
    with pytest.raises(ConfigError, match="shipped: exits_only"):
        load_space("no_such_space")


@pytest.mark.parametrize("name", tune_spaces.names())
def test_shipped_space_survives_json(name):
    """Trials get the space through JSON, where the YAML's integer level keys (``2:``)
    become strings: the model reads them back as the same levels."""
    import json

    from pipelines.tune.space import SearchSpace

    space = load_space(name)
    back = SearchSpace.model_validate(json.loads(json.dumps(space.model_dump(mode="json"))))
    assert back == space
    if isinstance(space.merge_thresholds, dict):
        assert set(back.merge_thresholds) <= {2, 4, 8, 16}
        params = {n: d.grid()[0] for n, d in back.dims.items()}
        assert set(back.to_inference(params, num_exits=2).merge_thresholds) == set(
            space.merge_thresholds)


def test_string_level_keys_are_levels_and_bad_ones_still_fail(tmp_path: Path):
    from pipelines.tune.space import SearchSpace

    space = SearchSpace.model_validate(
        {"name": "s", "merge_thresholds": {"2": {"type": "choice", "values": [0.5, 0.9]},
                                           "16": {"type": "fixed", "value": 0.7}}})
    assert sorted(space.merge_thresholds) == [2, 16]
    f = tmp_path / "space.yaml"
    f.write_text("name: bad\nmerge_thresholds: {'3': {type: choice, values: [0.5, 0.9]}}\n")
    with pytest.raises(ConfigError, match="merge_thresholds"):
        load_space(f)


def test_any_inference_setting_is_a_dimension(tmp_path: Path):
    """The space's fields come from InferenceConfig: settings with no code of their own in
    the search (halting, upsample, exit_seed ...) are searchable, typed by the config."""
    f = tmp_path / "space.yaml"
    f.write_text("name: more\nhalting: {type: choice, values: [true, false]}\n"
                 "upsample: {type: choice, values: [probs, logits]}\n"
                 "exit_seed: {type: uniform, low: 0, high: 2, step: 1}\n")
    space = load_space(f)
    assert space.searched == ["exit_seed", "halting", "upsample"]
    assert space.grid_size() == 3 * 2 * 2
    changes = space.to_inference({"halting": False, "upsample": "logits", "exit_seed": 2.0})
    assert changes.given() == {"halting": False, "upsample": "logits", "exit_seed": 2}
