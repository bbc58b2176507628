"""Perturbed copies for the exit temperatures' fit under domain drift
(pipelines/evaluate/perturb.py, ``step eval --fit-exit-temperature --perturb-levels``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.evaluate.perturb import KINDS, perturb, perturbed_copies

from helpers import tiny

STREET = sorted((Path(__file__).parent / "data" / "cityscapes_mini" / "leftImg8bit")
                .rglob("*.png"))[0]


@pytest.fixture(scope="module")
def street() -> torch.Tensor:
    """A real street scene (Cityscapes), downscaled, as a (1, 3, H, W) batch in [0, 1]."""
    img = Image.open(STREET).convert("RGB").resize((256, 128))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255


def _detail(x: torch.Tensor) -> float:
    """Mean absolute difference of horizontal neighbours: what blur removes."""
    return float((x[..., 1:] - x[..., :-1]).abs().mean())


def test_each_kind_degrades_the_image_the_way_it_says(street):
    out = {k: perturb(street, k, 1.0, seed=3) for k in KINDS}
    for k, x in out.items():
        assert x.shape == street.shape and x.dtype == street.dtype, k
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0, k
        assert not torch.equal(x, street), k
    assert out["low_light"].mean() < 0.6 * street.mean()
    # darker, and the shadows more so than the highlights (the gamma)
    dark, bright = street < 0.3, street > 0.7
    assert (out["low_light"][dark] / street[dark].clamp_min(1e-3)).mean() < \
        (out["low_light"][bright] / street[bright]).mean()
    assert out["contrast"].std() < 0.5 * street.std()
    assert out["contrast"].mean() == pytest.approx(float(street.mean()), abs=0.02)
    assert _detail(out["blur"]) < 0.7 * _detail(street)
    assert _detail(out["noise"]) > 1.5 * _detail(street)
    # a stronger perturbation moves the image further
    for k in KINDS:
        half = perturb(street, k, 0.5, seed=3)
        assert (half - street).abs().mean() < (out[k] - street).abs().mean(), k


def test_perturbations_are_deterministic_and_strength_zero_is_the_image(street):
    for k in KINDS:
        assert perturb(street, k, 0.0) is street
        assert torch.equal(perturb(street, k, 0.7, seed=5), perturb(street, k, 0.7, seed=5))
    assert not torch.equal(perturb(street, "noise", 0.7, seed=5),
                           perturb(street, "noise", 0.7, seed=6))
    with pytest.raises(ValueError, match="one of low_light, contrast, noise, blur"):
        perturb(street, "fog", 0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        perturb(street, "noise", 1.5)


def test_copies_are_the_clean_batch_then_one_kind_at_each_strength(street):
    for index in range(len(KINDS) + 1):
        copies = perturbed_copies(street, index, 4)
        assert [c[0] for c in copies] == ["clean"] + [KINDS[index % len(KINDS)]] * 4
        assert [c[1] for c in copies] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert copies[0][2] is street
    assert len(perturbed_copies(street, 0, 0)) == 1


def test_the_fit_on_perturbed_copies_sees_every_copy_and_reports_the_clean_ones(street):
    """With ``perturb_levels`` the fit sees (1 + levels) copies of every labelled token at
    every exit and reports the clean tokens' ECE apart; the copies' logits are not the
    clean ones."""
    from pipelines.evaluate.temperature import fit_exit_temperatures

    torch.manual_seed(0)
    model = tiny("none", exits=[2, 4], inference={"exit_thresholds": [0.5], "top_k": 0})
    images = (street[:, :, :64, :96] * 255).to(torch.uint8).repeat(2, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (2, 64, 96), generator=gen)
    batches = [(images[:1], labels[:1]), (images[1:], labels[1:])]
    clean = fit_exit_temperatures(model, batches)
    pert = fit_exit_temperatures(model, batches, perturb_levels=3)
    assert "perturbation" not in clean and "clean" not in clean["exits"][0]
    assert pert["perturbation"]["copies_per_image"] == 4
    assert pert["perturbation"]["strengths"] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert pert["images"] == clean["images"] == 2
    for c, p in zip(clean["exits"], pert["exits"], strict=True):
        assert p["tokens"] == 4 * c["tokens"] and p["clean"]["tokens"] == c["tokens"]
        assert p["clean"]["ece_before"] == pytest.approx(c["ece_before"], abs=1e-9)
        assert p["nll_before"] != pytest.approx(c["nll_before"], rel=1e-4)


def test_perturb_levels_only_with_the_temperature_fit(capsys):
    from pipelines.cli import main

    assert main(["eval", "--checkpoint", "c", "--data", "d", "--perturb-levels", "2",
                 "--no-mlflow"]) == 2
    assert "--perturb-levels: only with --fit-exit-temperature" in capsys.readouterr().err
