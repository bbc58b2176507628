"""YAML + --set overrides + validation errors that name the field."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import Field

from pipelines.common.settings import ConfigError, StrictModel, dump_config, flatten, load_config


class Optim(StrictModel):
    lr: float = Field(1e-4, gt=0)
    schedule: Literal["poly", "cosine"] = "poly"


class Cfg(StrictModel):
    name: str = "run"
    optim: Optim = Optim()
    exits: list[int] = [6, 8]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: a\noptim:\n  lr: 0.001\n")
    cfg = load_config(Cfg, path, ["optim.schedule=cosine", "exits=[4, 8]", "name=b"])
    assert cfg.name == "b" and cfg.optim.lr == 1e-3 and cfg.optim.schedule == "cosine"
    assert cfg.exits == [4, 8]


def test_wrong_value_names_field_and_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, None, ["optim.schedule=linear"])
    msg = str(e.value)
    assert "optim.schedule" in msg and "'poly'" in msg and "'cosine'" in msg and "linear" in msg


def test_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key"):
        load_config(Cfg, path)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Cfg, None, ["optim.lr"])
    with pytest.raises(ConfigError, match="name: Input should be a valid string"):
        load_config(Cfg, None, ["name.x=1"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(Cfg, None, ["name=a", "name.x=1"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(Cfg, None, ["optim.lr=0.5"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(Cfg, path) == cfg
    assert flatten(cfg)["optim.lr"] == 0.5


def test_shared_field_types_reject_unsafe_names_and_partial_patches():
    from pipelines.common.settings import PatchMultiple, RunName

    class Named(StrictModel):
        name: RunName = "run"
        crop: PatchMultiple = 512

    assert Named(name="tiny-step_1.0", crop=256).crop == 256
    with pytest.raises(ConfigError, match=r"name: .*names a folder"):
        load_config(Named, None, ["name=../escape"])
    with pytest.raises(ConfigError, match=r"crop: .*multiple of the 16-pixel patch"):
        load_config(Named, None, ["crop=100"])
