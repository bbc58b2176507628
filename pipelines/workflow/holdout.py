"""The held-out check of ``step run``: does the chosen configuration keep the drop limit on
images the search never saw (``data.holdout``)?

The held-out images are the held-out keys of the validation split (a fraction by hash,
and any held-out group's validation images), or a held-out split; with ``from_training``,
also the held-out groups' images of the *training* split, which no training saw either
(CamVid's dusk recording lives there). The reference (the STEP network unpruned), the
tuned model, the plain rule's answer and the plain ViT trained on its own are evaluated on
them with per-image confusion matrices; validation images the evaluate step already
measured are reused, not evaluated again. The drop gets its paired-bootstrap interval
(:mod:`pipelines.evaluate.bootstrap`), and figures per group
(:mod:`pipelines.evaluate.groups`): a held-out group is a change of conditions, and its
drop is the figure the limit has to hold on.

The limit counts as broken when the point drop over all held-out images, or the worst
held-out group's drop (groups of at least ``min_images`` images), exceeds it; the interval
says how sure that verdict is.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def holdout_check(checkpoint: str, data: str, holdout: dict[str, Any],
                  tuned: dict[str, Any] | None, *, max_drop: float, drop_mode: str,
                  device: str, samples: int = 1000, confidence: float = 0.95,
                  seed: int = 0, plain: dict[str, Any] | None = None,
                  train_data: str | None = None, plain_vit: str | None = None,
                  groups: dict[str, Any] | None = None, min_images: int = 10,
                  tail_fraction: float = 0.2, block: int | str = 1,
                  evaluated: dict[str, tuple[dict[str, Any], Any]] | None = None
                  ) -> dict[str, Any]:
    """Figures on the held-out images (see the module docstring). ``data``: the validation
    shards for held-out keys, the held-out split's shards for a split; ``train_data``: the
    training shards, measured for ``from_training`` groups; ``tuned`` = the chosen
    ``set_inference`` kwargs (None: reference figures only); ``plain`` = the point-estimate
    rule's answer, when it is another trial (under ``plain``: what the guard saved, or
    cost); ``plain_vit`` = the separately trained plain ViT's checkpoint (its drop under
    ``vs_plain_vit``); ``groups``: how keys fall into groups (figures per group);
    ``evaluated``: {"reference" | "tuned" | "plain_vit": (evaluation dict, per-image
    matrices)} over every image of ``data`` (the evaluate step's), reused here; the drops
    are :func:`pipelines.workflow.evaluation.comparison`'s (``tail_fraction``,
    ``min_images``)."""
    from pipelines.common.holdout import Holdout
    from pipelines.tune.trial import reference_inference

    h = Holdout.model_validate(holdout)
    parts = [(data, "holdout")]
    if h.from_training and train_data is not None:
        parts.append((train_data, "groups"))
    reuse = evaluated or {}

    def run(name: str, ckpt: str, inference):
        return _held_out(ckpt, inference, parts, holdout, device,
                         reuse.get(name) if h.split is None else None)

    ref, ref_images = run("reference", checkpoint, reference_inference(tuned))
    out: dict[str, Any] = {"holdout": h.describe(), "images": len(ref_images),
                           "max_drop": max_drop, "drop_mode": drop_mode,
                           "baseline": ref, "tuned": None}
    grouper = _grouper(data, groups)
    if tuned is None or not len(ref_images):
        return out

    def drop(reference_images, images) -> dict[str, Any]:
        from pipelines.evaluate.compare import comparison

        return comparison(reference_images, images, grouper=grouper, drop_mode=drop_mode,
                          max_drop=max_drop, samples=samples, confidence=confidence,
                          seed=seed, tail_fraction=tail_fraction, min_images=min_images,
                          block=block)

    after, images = run("tuned", checkpoint, tuned)
    figures = drop(ref_images, images)
    broken = not figures["within_limit"] or (
        figures.get("worst_group_drop") is not None
        and figures["worst_group_drop"] > max_drop + 1e-9)
    out.update(tuned=after, limit_broken=broken, **figures)
    if plain is not None:
        p_after, p_images = run("plain", checkpoint, plain)
        out["plain"] = {**p_after, **drop(ref_images, p_images)}
    if plain_vit is not None:
        vit, vit_images = run("plain_vit", plain_vit, reference_inference(tuned))
        out["vs_plain_vit"] = {"baseline": vit, **drop(vit_images, images)}
    return out


def _held_out(checkpoint: str, inference, parts: list[tuple[str, str]],
              holdout: dict[str, Any], device: str, reused):
    """(headline, per-image matrices) of one model over every held-out part, the
    validation part taken from ``reused`` (dict, matrices over all of ``data``) when
    given."""
    from pipelines.common.data import key_filter, resolve_data_uri
    from pipelines.evaluate.bootstrap import ImageConfusions
    from pipelines.tune.trial import evaluate_images

    dicts, mats = [], []
    for i, (uri, part) in enumerate(parts):
        if i == 0 and reused is not None:
            m, all_images = reused
            keep = key_filter(resolve_data_uri(uri)[0], holdout, part)
            images = all_images.subset(keep) if keep is not None else all_images
        else:
            m, images = evaluate_images(checkpoint, uri, inference, max_samples=None,
                                        device=device, holdout=holdout, part=part)
        dicts.append((m, len(images)))
        mats.append(images)
    keys = tuple(k for im in mats for k in (im.keys or ()))
    matrices = np.concatenate([im.matrices for im in mats]) if mats else np.zeros((0, 1, 1))
    images = ImageConfusions(keys if len(keys) == len(matrices) else None, matrices)
    return _headline(dicts, images), images


def _headline(dicts: list[tuple[dict[str, Any], int]], images) -> dict[str, float]:
    """mIoU of the pooled matrices; GFLOPs and tokens per image, weighted by each part's
    images (a reused part: its evaluation's means over the whole split)."""
    n = sum(k for _, k in dicts)
    out: dict[str, float] = {"num_images": float(n)}
    if n:
        out["miou"] = float(images.miou())
    for key in ("gflops", "tokens_mean", "halted_fraction"):
        vals = [(float(m[key]), k) for m, k in dicts if isinstance(m.get(key), (int, float))]
        if vals and n:
            out[key] = sum(v * k for v, k in vals) / sum(k for _, k in vals)
    return out


def _grouper(data: str, groups: dict[str, Any] | None):
    if groups is None:
        return None
    from pipelines.common.data import resolve_data_uri
    from pipelines.common.groups import key_grouper

    return key_grouper(resolve_data_uri(data)[0], groups)


def holdout_line(check: dict[str, Any] | None) -> str | None:
    """One plain line on the held-out drop (the CLI, the report); None without a check."""
    if not check:
        return None
    unit = "points" if check["drop_mode"] == "points" else "% of the reference"
    if check.get("drop") is None:
        why = "no held-out images" if not check.get("images") else "no tuned model"
        return f"held-out check ({check['holdout']}): {why}, no drop to show"
    head = (f"on {check['images']} held-out images ({check['holdout']}), never seen by the "
            f"search: mIoU {100 * check['baseline']['miou']:.2f} -> "
            f"{100 * check['tuned']['miou']:.2f}, drop {check['drop']:.2f} {unit} "
            f"({100 * check.get('confidence', 0.95):g}% interval [{check['drop_lo']:.2f}, "
            f"{check['drop_hi']:.2f}])")
    worst = check.get("worst_group")
    if worst is not None:
        head += f"; worst group {worst}: drop {check['worst_group_drop']:.2f}"
    if check["limit_broken"]:
        line = f"WARNING: the drop limit is broken {head} > the limit {check['max_drop']:g}"
    else:
        line = f"held-out check passed {head} <= the limit {check['max_drop']:g}"
    p = check.get("plain")
    if p:
        line += (f"; the plain (unguarded) choice would drop {p['drop']:.2f} "
                 f"[{p['drop_lo']:.2f}, {p['drop_hi']:.2f}] at {p['gflops']:.3f} GFLOPs "
                 f"(guarded: {check['tuned']['gflops']:.3f})"
                 + (f", its worst group {p['worst_group']} {p['worst_group_drop']:.2f}"
                    if p.get("worst_group") is not None else ""))
    v = check.get("vs_plain_vit")
    if v:
        line += (f"; against the plain ViT trained on its own "
                 f"({100 * v['baseline']['miou']:.2f}): drop {v['drop']:.2f} "
                 f"[{v['drop_lo']:.2f}, {v['drop_hi']:.2f}]")
    return line
