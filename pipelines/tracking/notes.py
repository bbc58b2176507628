"""What each run is, in words: the description (``mlflow.note.content``) the MLflow UI shows.

Derived in one place from the ``step.kind`` tag (and a few others) that every run of the
project carries, so a run is described the same way wherever it is created: a workflow step,
a training started by ``step train`` or by the pipeline, a Tune trial, ``step eval``. The UI
renders the note as Markdown on the run's overview page.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipelines.tracking.links import run_link

NOTE_TAG = "mlflow.note.content"

STEPS = {
    "prepare": "shards the source images into WebDataset tars (`step prep`): the training "
               "and validation inputs of every later step",
    "train_policy": "stage 1: trains the EfficientNet-Lite0 policy that picks the superpatch "
                    "size of every image region; its Ray Train run is nested below",
    "train_step": "stage 2: trains the STEP ViT (supertokens + early exits) with the policy "
                  "frozen; its Ray Train run is nested below",
    "tune": "Ray Tune search over the merge and exit thresholds: one nested run per trial; "
            "the Pareto front and the chosen thresholds as artifacts; registers the tuned model",
    "evaluate": "re-evaluates the unpruned baseline and the tuned thresholds on the "
                "validation set (its dataset is this run's input)",
    "report": "the summary table, Pareto plot, token maps and per-class halting, as "
              "artifacts under `report/`",
    "analyze": "analysis figures and tables of the tuned model, as artifacts under "
               "`analysis/`",
}

KINDS = {
    "tune": "Threshold search (`step tune`, Ray Tune): one nested run per trial; the Pareto "
            "front (`pareto/`) and the chosen thresholds.",
    "eval": "Evaluation (`step eval`) of `{step.checkpoint}`: mIoU, GFLOPs, tokens, halting "
            "and latency; the full result in `eval.json`, the dataset as this run's input.",
    "analyze": "Analysis (`step analyze`) of `{step.checkpoint}`: figures and tables under "
               "`analysis/`.",
}


def describe(tags: Mapping[str, str], experiment_id: str | None = None) -> str | None:
    """The description of a run with these tags; None for a run this project did not make."""
    kind = tags.get("step.kind")
    if kind == "pipeline":
        return (f"Pipeline `{tags.get('step.workflow', '?')}` (`step run`): the parent of one "
                "run per step. **Open `report.html` under Artifacts** for the review: "
                "baseline vs tuned, Pareto front, token maps, per-class halting, links to "
                "every run.")
    if kind == "workflow-step":
        name = tags.get("step.name", "?")
        what = STEPS.get(name, "a step of the pipeline")
        text = f"Step `{name}` of pipeline `{tags.get('step.workflow', '?')}`: {what}."
        reused = tags.get("step.reused_run_id")
        if tags.get("step.skipped") == "true" and reused:
            target = (f"[{reused}]({run_link(experiment_id, reused)})" if experiment_id
                      else f"`{reused}`")
            text += (f"\n\n**Skipped**: unchanged inputs and settings (same fingerprint); "
                     f"it reuses the outputs of run {target}.")
        return text
    if kind in ("train-policy", "train-step"):
        stage = ("Stage 1 training: the policy network (EfficientNet-Lite0)"
                 if kind == "train-policy" else
                 "Stage 2 training: the STEP ViT (supertokens + early exits)")
        return (f"{stage}, Ray Train run `{tags.get('ray.run_name', '?')}` (checkpoints in "
                f"`{tags.get('ray.storage_path', '?')}`). Metrics `train/*` per logged step, "
                "`val/*` per evaluation; the resolved config in `config.yaml`, the final "
                "model under `model`; its datasets are this run's inputs.")
    if kind == "tune-trial":
        return (f"One Ray Tune trial (`{tags.get('ray.trial_id', '?')}`) of the threshold "
                "search: its thresholds as params; mIoU, its drop from the unpruned "
                "reference, GFLOPs, tokens, halting and latency as metrics.")
    if kind in KINDS:
        return KINDS[kind].replace("{step.checkpoint}", tags.get("step.checkpoint", "?"))
    return None


def with_note(tags: Mapping[str, str], experiment_id: str | None = None) -> dict[str, str]:
    """``tags`` plus the description, unless they already carry one."""
    out = dict(tags)
    if NOTE_TAG not in out:
        note = describe(out, experiment_id)
        if note:
            out[NOTE_TAG] = note
    return out
