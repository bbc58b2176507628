"""The held-out check of ``step run``: does the chosen configuration keep the drop limit on
images the search never saw (``data.holdout``)?

The reference (unpruned) and the tuned model are evaluated on every held-out image, with
per-image confusion matrices, and the drop gets its paired-bootstrap interval
(:mod:`pipelines.evaluate.bootstrap`). The limit counts as broken when the point drop
exceeds it; the interval says how sure that verdict is.
"""

from __future__ import annotations

from typing import Any


def holdout_check(checkpoint: str, data: str, holdout: dict[str, Any],
                  tuned: dict[str, Any] | None, *, max_drop: float, drop_mode: str,
                  device: str, samples: int = 1000, confidence: float = 0.95,
                  seed: int = 0, plain: dict[str, Any] | None = None) -> dict[str, Any]:
    """Figures on the held-out images of ``data`` (the validation shards for a held-out
    fraction, the held-out split's shards for a split); ``tuned`` = the chosen inference
    settings (an InferenceConfig's dict; None: no tuned model, reference figures only); the
    reference is the unpruned model with ``tuned``'s other settings; ``plain`` =
    the point-estimate rule's answer, given when it is another trial (its held-out drop,
    under ``plain``: what the guard saved, or cost)."""
    from pipelines.common.holdout import Holdout
    from pipelines.evaluate.bootstrap import paired_bootstrap
    from pipelines.tune.pareto import is_feasible
    from pipelines.tune.trial import evaluate_images, reference_inference

    h = Holdout.model_validate(holdout)

    def run(inference):
        return evaluate_images(checkpoint, data, inference, max_samples=None, device=device,
                               holdout=holdout, part="holdout")

    ref, ref_images = run(reference_inference(tuned))
    out: dict[str, Any] = {"holdout": h.describe(), "images": len(ref_images),
                           "max_drop": max_drop, "drop_mode": drop_mode,
                           "baseline": _headline(ref), "tuned": None}
    if tuned is None or not len(ref_images):
        return out
    def drop(inference) -> tuple[dict[str, Any], dict[str, Any]]:
        after, images = run(inference)
        iv = paired_bootstrap(ref_images, images, mode=drop_mode,  # type: ignore[arg-type]
                              samples=samples, confidence=confidence, seed=seed)
        return after, {"drop": iv.drop, "drop_lo": iv.lo, "drop_hi": iv.hi,
                       "within_limit": is_feasible(iv.drop, max_drop)}

    after, figures = drop(tuned)
    out.update(tuned=_headline(after), confidence=confidence,
               limit_broken=not figures["within_limit"], **figures)
    if plain is not None:
        after, figures = drop(plain)
        out["plain"] = {**_headline(after), **figures}
    return out


def _headline(m: dict[str, Any]) -> dict[str, float]:
    return {k: float(m[k]) for k in ("miou", "gflops", "tokens_mean", "num_images")
            if isinstance(m.get(k), (int, float))}


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
    if check["limit_broken"]:
        line = f"WARNING: the drop limit is broken {head} > the limit {check['max_drop']:g}"
    else:
        line = f"held-out check passed {head} <= the limit {check['max_drop']:g}"
    p = check.get("plain")
    if p:
        line += (f"; the plain (unguarded) choice would drop {p['drop']:.2f} "
                 f"[{p['drop_lo']:.2f}, {p['drop_hi']:.2f}] at {p['gflops']:.3f} GFLOPs "
                 f"(guarded: {check['tuned']['gflops']:.3f})")
    return line


def holdout_tags(check: dict[str, Any] | None) -> dict[str, str]:
    """Tags for the pipeline's parent run: whether the limit broke on the held-out images."""
    if not check or check.get("drop") is None:
        return {}
    return {"holdout.limit_broken": str(bool(check["limit_broken"])).lower(),
            "holdout.drop": f"{check['drop']:.4f}",
            "holdout.interval": f"[{check['drop_lo']:.4f}, {check['drop_hi']:.4f}]",
            "holdout.images": str(check["images"])}
