"""The evaluate step's evaluations: the chosen model against both baselines, per group.

On every validation image (``evaluate.max_samples``: the first ones), each evaluated once
with per-image confusion matrices and sample keys:

* ``baseline``: the STEP network run unshared (no merging, no halting): the reference the
  search measured every drop against;
* ``tuned``: the chosen configuration;
* ``plain_vit``: the plain ViT trained on its own with the same recipe (``baseline`` of the
  pipeline config), when there is one: what the STEP papers compare against.

From the matrices, without another forward: the drop of the tuned model against each
baseline with its paired-bootstrap interval, its drop on the worst fraction of the images
(:mod:`pipelines.evaluate.tail`), mIoU and drop per group with the worst group
(:mod:`pipelines.evaluate.groups`), and the held-out check
(:mod:`pipelines.workflow.holdout`), which reuses the validation images' matrices.
"""

from __future__ import annotations

from typing import Any


def evaluate_all(checkpoint: str, data: str, tuned: dict[str, Any] | None, *,
                 max_samples: int | None, device: str, plain_vit: str | None = None,
                 groups: dict[str, Any] | None = None, drop_mode: str = "points",
                 max_drop: float = 2.0, samples: int = 1000, confidence: float = 0.95,
                 seed: int = 0, tail_fraction: float = 0.2, min_images: int = 10,
                 holdout: dict[str, Any] | None = None, block: int | str = 1
                 ) -> dict[str, Any]:
    """The evaluation document (see the module docstring); ``holdout``: the keyword
    arguments of :func:`pipelines.workflow.holdout.holdout_check` besides the models."""
    from pipelines.evaluate.compare import comparison
    from pipelines.tune.trial import evaluate_images, reference_inference

    def run(ckpt: str, inference):
        return evaluate_images(ckpt, data, inference, max_samples=max_samples, device=device)

    # the unpruned model with the tuned settings' others (upsampling ...), as tune measured
    ref, ref_images = run(checkpoint, reference_inference(tuned))
    after = after_images = vit = vit_images = None
    if tuned is not None:
        after, after_images = run(checkpoint, tuned)
    if plain_vit is not None:
        vit, vit_images = run(plain_vit, reference_inference(tuned))
    out: dict[str, Any] = {"baseline": ref, "tuned": after, "plain_vit": vit}
    grouper = None
    if groups is not None:
        from pipelines.common.data import resolve_data_uri
        from pipelines.common.groups import key_grouper
        from pipelines.evaluate.groups import group_miou

        grouper = key_grouper(resolve_data_uri(data)[0], groups)
        out["groups"] = {name: group_miou(images, grouper) for name, images in
                         (("baseline", ref_images), ("tuned", after_images),
                          ("plain_vit", vit_images)) if images is not None}
    compare = dict(grouper=grouper, drop_mode=drop_mode, max_drop=max_drop, samples=samples,
                   confidence=confidence, seed=seed, tail_fraction=tail_fraction,
                   min_images=min_images, block=block)
    if after_images is not None:
        out["vs_unshared"] = comparison(ref_images, after_images, **compare)
        if vit_images is not None:
            out["vs_plain_vit"] = comparison(vit_images, after_images, **compare)
    if vit_images is not None:
        # how far the STEP network run unshared is from the plain ViT (positive: below it)
        out["unshared_vs_plain_vit"] = comparison(vit_images, ref_images, **compare)
    if holdout is not None:
        from pipelines.workflow.holdout import holdout_check

        reuse = None
        if max_samples is None:  # every validation image measured: take them from here
            reuse = {"reference": (ref, ref_images)}
            if after_images is not None:
                reuse["tuned"] = (after, after_images)
            if vit_images is not None:
                reuse["plain_vit"] = (vit, vit_images)
        out["holdout"] = holdout_check(checkpoint, device=device, tuned=tuned,
                                       plain_vit=plain_vit, groups=groups,
                                       min_images=min_images, tail_fraction=tail_fraction,
                                       evaluated=reuse, **holdout)
    return out
