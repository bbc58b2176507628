"""Perturbed copies of images, for fitting exit temperatures that hold under domain drift.

A temperature fitted on clean validation images calibrates the exit heads for images
like those. Under a change of conditions (dusk, another camera, weather) the heads stay as
confident while their accuracy falls: on CamVid's held-out dusk recording the tokens
halted at exit 4 are 0.89 confident and 64 % right (docs/camvid.md). Tomani et al. (CVPR
2021, "Post-hoc uncertainty calibration for domain drift scenarios") fit the temperature
on the validation images perturbed at a range of strengths instead, so that one
temperature is right from no drift to a strong one.

Design choices:

* **Generic corruptions, not the drift we test on.** Four kinds of the common-corruptions
  families (Hendrycks and Dietterich, 2019): low light (darker, shadows crushed by a
  gamma), lower contrast, sensor noise, defocus blur. Photometric only: every pixel keeps
  its place, so the labels stay right.
* **Strengths** ``k / levels`` for k = 1..levels, the strongest one chosen to lose a large
  share of the heads' accuracy, not to look like any recording; the clean image is always
  among the copies, so ``levels = 0`` is the plain fit.
* **One kind per image**, cycling with the image's index (every kind equally often, at
  every strength): ``1 + levels`` forwards per image instead of ``1 + 4 levels``.
* Deterministic: the noise of image ``i`` at strength ``s`` comes from a generator
  seeded with ``(i, s)``, the same on every machine and rank.
"""

from __future__ import annotations

import torch
import torchvision.transforms.functional as TF

KINDS = ("low_light", "contrast", "noise", "blur")

# the strongest perturbation of each kind (strength 1.0)
MAX_GAMMA = 2.0  # x ** (1 + MAX_GAMMA * s)
MAX_DIM = 0.6  # brightness times 1 - MAX_DIM * s
MAX_FLATTEN = 0.75  # contrast times 1 - MAX_FLATTEN * s
MAX_NOISE = 0.12  # Gaussian sensor noise, std in [0, 1] pixel units
MAX_BLUR = 3.0  # Gaussian blur sigma in pixels


def perturb(images: torch.Tensor, kind: str, strength: float, *, seed: int = 0) -> torch.Tensor:
    """``images`` (B, 3, H, W) in [0, 1] perturbed by ``kind`` at ``strength`` in [0, 1]."""
    if kind not in KINDS:
        raise ValueError(f"perturbation kind {kind!r}: one of {', '.join(KINDS)}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"perturbation strength {strength}: between 0 and 1")
    if strength == 0.0:
        return images
    x = images.float()
    if kind == "low_light":
        x = x.clamp(0, 1).pow(1 + MAX_GAMMA * strength) * (1 - MAX_DIM * strength)
    elif kind == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = mean + (x - mean) * (1 - MAX_FLATTEN * strength)
    elif kind == "noise":
        g = torch.Generator().manual_seed(seed)
        x = x + MAX_NOISE * strength * torch.randn(x.shape, generator=g).to(x.device)
    else:
        sigma = MAX_BLUR * strength
        size = 2 * int(3 * sigma) + 1
        x = TF.gaussian_blur(x, kernel_size=[size, size], sigma=[sigma, sigma])
    return x.clamp(0, 1).to(images.dtype)


def strengths(levels: int) -> list[float]:
    """The strengths of ``levels`` perturbed copies: ``k / levels``, k = 1..levels."""
    return [k / levels for k in range(1, levels + 1)]


def perturbed_copies(images: torch.Tensor, index: int, levels: int
                     ) -> list[tuple[str, float, torch.Tensor]]:
    """(kind, strength, images) of the batch starting at image ``index``: the clean batch,
    then one kind (cycling with ``index``) at each of :func:`strengths`."""
    kind = KINDS[index % len(KINDS)]
    return [("clean", 0.0, images)] + [
        (kind, s, perturb(images, kind, s, seed=index * 1000 + k))
        for k, s in enumerate(strengths(levels), start=1)]
