"""The MLflow UI as the review tool.

On the tiny pipeline that tests/test_workflow_e2e.py runs (session fixture ``tiny_pipeline``,
a real ``mlflow server``): the experiment's kind tag, every run's description, the datasets
as run inputs, the parent run's self-contained review page. Without a pipeline: the kind
tag on an existing experiment, analysis figures on the page, ``step ui`` for a remote server.
"""

from __future__ import annotations

import base64
import json
import re

import pytest

from helpers import free_port

pytestmark = pytest.mark.timeout(420)

KIND = ("mlflow.experimentKind", "custom_model_development")
NOTE = "mlflow.note.content"
PNG = base64.b64decode(  # a 1 x 1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


VIEW = "workflowType=machine_learning"  # the UI's "Model training" view (docs/mlflow.md)


def _all_in_training_view(text: str) -> None:
    """Every UI address in ``text`` names the model-training view."""
    addresses = re.findall(r"#/experiments/[^\s\"'<>)]*", text)
    assert addresses
    assert all(a.endswith(f"?{VIEW}") for a in addresses), addresses


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _tree(client, exp_id: str, run_id: str) -> list:
    kids = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{run_id}'",
                              max_results=1000)
    return [r for k in kids for r in (k, *_tree(client, exp_id, k.info.run_id))]


def _report(client, run_id: str) -> str:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, "report.html", tmp)).read_text()


# ---- the tiny pipeline --------------------------------------------------------------------

def test_experiment_opens_in_the_model_training_view(tiny_pipeline):
    client = _client(tiny_pipeline["tracking_uri"])
    exp = client.get_experiment(client.get_run(tiny_pipeline["doc2"]["parent_run_id"])
                                .info.experiment_id)
    assert exp.tags.get(KIND[0]) == KIND[1]


def test_every_run_says_what_it_is(tiny_pipeline):
    doc = tiny_pipeline["doc2"]
    client = _client(tiny_pipeline["tracking_uri"])
    parent = client.get_run(doc["parent_run_id"])
    runs = _tree(client, parent.info.experiment_id, parent.info.run_id)
    kinds = {r.data.tags.get("step.kind") for r in runs}
    assert {"workflow-step", "train-policy", "train-step", "tune-trial"} <= kinds
    for r in [parent, *runs]:
        assert r.data.tags.get(NOTE), (r.info.run_name, r.data.tags.get("step.kind"))
    by_kind = {r.data.tags["step.kind"]: r.data.tags[NOTE] for r in runs}
    assert "Stage 2 training" in by_kind["train-step"]
    assert "Ray Tune trial" in by_kind["tune-trial"]
    steps = {r.info.run_id: r.data.tags[NOTE] for r in runs
             if r.data.tags.get("step.kind") == "workflow-step"}
    assert "re-evaluates" in steps[doc["steps"]["evaluate"]["run_id"]]
    # a skipped step points at the run it reuses; the parent links every step
    skipped = steps[doc["steps"]["prepare"]["run_id"]]
    assert "Skipped" in skipped and doc["steps"]["prepare"]["reused_run_id"] in skipped
    note = parent.data.tags[NOTE]
    assert "report.html" in note
    for name, step in doc["steps"].items():
        assert f"#/experiments/{parent.info.experiment_id}/runs/{step['run_id']}" \
            f"?{VIEW}" in note, name
    _all_in_training_view(note)


def test_printed_addresses_open_the_model_training_view(tiny_pipeline):
    """`step run`'s closing line: the parent run's address on the server, in that view."""
    doc = tiny_pipeline["doc2"]
    client = _client(tiny_pipeline["tracking_uri"])
    exp_id = client.get_run(doc["parent_run_id"]).info.experiment_id
    base = tiny_pipeline["tracking_uri"].rstrip("/")
    assert (f"MLflow: pipeline run {doc['parent_run_id']}: {base}/#/experiments/{exp_id}/runs/"
            f"{doc['parent_run_id']}?{VIEW}") in tiny_pipeline["stdout2"]
    _all_in_training_view(tiny_pipeline["stdout2"] + tiny_pipeline["stdout3"])


def test_datasets_are_inputs_of_trainings_and_evaluation(tiny_pipeline):
    from data_prep.info import read_dataset_info
    from pipelines.tracking.datasets import manifest_digest

    doc = tiny_pipeline["doc2"]
    client = _client(tiny_pipeline["tracking_uri"])
    prep = doc["steps"]["prepare"]["outputs"]
    train = client.get_run(doc["steps"]["train_step"]["outputs"]["train_run_id"])
    evaluate = client.get_run(doc["steps"]["evaluate"]["run_id"])
    for run, wanted in ((train, {"training": "train", "validation": "val"}),
                        (evaluate, {"evaluation": "val"})):
        inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
                  for d in run.inputs.dataset_inputs}
        assert set(inputs) == set(wanted), run.info.run_name
        for context, role in wanted.items():
            ds, info = inputs[context], read_dataset_info(prep[role])
            split = info.splits[0]
            assert ds.digest == manifest_digest(prep[role], split)
            assert prep[role] in ds.source and ds.name == f"{info.name}-{split}"
            profile = json.loads(ds.profile)
            assert profile["split"] == split
            assert profile["num_samples"] == prep[f"{role}_samples"] > 0


@pytest.mark.parametrize("which", ["doc2", "doc3"])  # doc3: every step skipped
def test_parent_run_holds_the_review_page(tiny_pipeline, which):
    doc = tiny_pipeline[which]
    client = _client(tiny_pipeline["tracking_uri"])
    parent = client.get_run(doc["parent_run_id"])
    page = _report(client, parent.info.run_id)
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "| tuned STEP |" not in page and "<td>tuned STEP</td>" in page  # a real table
    for section in ("Baseline vs tuned", "Pareto front", "Token maps", "Per-class halting"):
        assert f"<h2>{section}</h2>" in page
    # self-contained: the Pareto plot and the token map inline, nothing fetched
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 2 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    assert not re.search(r'src="(?!data:)', page)
    for r in _tree(client, parent.info.experiment_id, parent.info.run_id):
        assert f"runs/{r.info.run_id}?{VIEW}" in page, r.info.run_name
    _all_in_training_view(page)
    if which == "doc3":  # skipped steps: their artifacts come from the runs they reuse
        assert doc["steps"]["report"]["reused_run_id"] in page


# ---- without a pipeline --------------------------------------------------------------------

def test_existing_experiments_get_the_kind_unless_chosen(mlflow_server):
    from pipelines.tracking.runs import get_or_create_experiment

    client = _client(mlflow_server)
    bare = client.create_experiment(f"bare-{free_port()}")
    guessed = client.create_experiment(f"guessed-{free_port()}",
                                       tags={KIND[0]: "genai_development_inferred"})
    chosen = client.create_experiment(f"chosen-{free_port()}",
                                      tags={KIND[0]: "genai_development"})
    for exp_id, want in ((bare, KIND[1]), (guessed, KIND[1]), (chosen, "genai_development")):
        assert get_or_create_experiment(mlflow_server, client.get_experiment(exp_id).name) \
            == exp_id
        assert client.get_experiment(exp_id).tags[KIND[0]] == want
    new = get_or_create_experiment(mlflow_server, f"new-{free_port()}")
    assert client.get_experiment(new).tags[KIND[0]] == KIND[1]


def test_review_embeds_analysis_figures_and_survives_missing_parts(mlflow_server, tmp_path):
    from pipelines.tracking.pipeline import PipelineRuns
    from pipelines.workflow.review import REVIEW_FILE, log_review

    runs = PipelineRuns(mlflow_server, f"review-{free_port()}")
    parent = runs.create("p", {"step.kind": "pipeline", "step.workflow": "p"})
    step = runs.create("analyze", {"mlflow.parentRunId": parent, "step.kind": "workflow-step",
                                   "step.workflow": "p", "step.name": "analyze"})
    nested = runs.create("analyze", {"mlflow.parentRunId": step, "step.kind": "analyze",
                                     "step.checkpoint": "/ckpt"})
    (tmp_path / "purity.png").write_bytes(PNG)
    (tmp_path / "purity.csv").write_text("a,b\n1,2\n")
    runs.client.log_artifact(nested, str(tmp_path / "purity.png"), "analysis/figs")
    runs.client.log_artifact(nested, str(tmp_path / "purity.csv"), "analysis")
    lines: list[str] = []
    # no report step, no summary: the page says so and still shows what there is
    assert log_review(runs, parent, {}, echo=lines.append) == REVIEW_FILE, lines
    page = _report(runs.client, parent)
    assert "analysis/figs/purity.png" in page and base64.b64encode(PNG).decode() in page
    assert "analysis/purity.csv" in page
    assert f"runs/{step}" in page and f"runs/{nested}" in page
    _all_in_training_view(page)
    _all_in_training_view(runs.client.get_run(parent).data.tags[NOTE])
    assert "no summary" in page
    assert "`step analyze`" in runs.client.get_run(nested).data.tags[NOTE]
    # a parent that does not exist: one warning line, no exception
    assert log_review(runs, "0" * 32, {}, echo=lines.append) is None
    assert lines and "report.html" in lines[-1]


def test_run_locations_name_the_view_on_a_server_and_for_a_local_store(tmp_path):
    from pipelines.tracking.links import run_location
    from pipelines.tracking.runs import create_run

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    rid = create_run(uri, "links", run_name="r", tags={"step.kind": "eval"})
    exp = _client(uri).get_run(rid).info.experiment_id
    assert run_location(uri, rid) == (f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{rid}"
                                      f"?{VIEW} once `step ui` serves {uri}")
    # no credentials in an address
    assert run_location("https://me:pw@host:8443/mlflow", "r1", "7") == \
        f"https://host:8443/mlflow/#/experiments/7/runs/r1?{VIEW}"
    assert run_location(uri, "0" * 32) == f"run {'0' * 32} at {uri}"  # no such run


def test_step_ui_prints_a_remote_server_and_its_forward(mlflow_server, capsys, monkeypatch):
    from pipelines.cli.app import main
    from pipelines.tracking.runs import get_or_create_experiment

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = f"ui-{free_port()}"
    exp_id = get_or_create_experiment(mlflow_server, name)
    host_port = mlflow_server.split("://", 1)[1].rstrip("/")
    assert main(["ui", "--tracking-uri", f"http://user:secret@{host_port}"]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0] == f"MLflow UI: http://{host_port}/" and "warning" not in out.err
    # each experiment's runs in the model-training view (the UI's default is GenAI)
    assert f"  {name}: http://{host_port}/#/experiments/{exp_id}/runs?workflowType=" \
        "machine_learning" in lines
    assert "secret" not in out.out + out.err
    assert main(["ui", "--tracking-uri", "http://127.0.0.1:5005", "--forward", "me@gateway",
                 "--port", "8080", "--print-command"]) == 0
    assert capsys.readouterr().out.strip() == (
        "ssh -N -o ExitOnForwardFailure=yes -L 127.0.0.1:8080:127.0.0.1:5005 me@gateway")
    # from the environment too, when no local store is asked for
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert main(["ui"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"MLflow UI: http://{host_port}/"
    for argv, field in ((["--tracking-uri", "sqlite:///x.db"], "tracking_uri"),
                        (["--tracking-uri", mlflow_server, "--forward=-oProxyCommand=x"],
                         "forward")):
        assert main(["ui", *argv]) == 2
        assert f"{field}:" in capsys.readouterr().err
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["ui", "--forward", "me@gateway"]) == 2
    assert "forward: needs --tracking-uri" in capsys.readouterr().err
