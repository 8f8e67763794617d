"""A new pipeline needs no change to forgeline/: the convention alone makes one.

In a throw-away copy of the repo the test adds a pipeline `tiny` exactly as the README's "Pipelines"
section says, touching nothing under forgeline/ or tasks/: flows/tiny.py, three DVC stages that run
the generic ingest, validate and chunk modules with their own configs (configs/tiny_*.yaml ->
data/tiny_*/), and a deployment in prefect.yaml. It then runs under Prefect (ephemeral), is cached by
DVC and is tracked in its own MLflow experiment, forgeline-tiny.
"""
from __future__ import annotations

import sys

import pandas as pd
import pytest
import yaml

from tests import conftest
from tests.conftest import run_in

STAGES = ["tiny_ingest", "tiny_validate", "tiny_chunk"]
GIT = ["git", "-c", "user.name=forgeline-test", "-c", "user.email=test@localhost"]

FLOW = '''"""The tiny pipeline: the generic ingest, validate and chunk modules, each with its own config.

    python -m flows.tiny [stage.key=value ...] [--no-push]      # or: forgeline run tiny
"""
from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from forgeline.config import pipeline_params
from forgeline.pipelines import flow_main
from forgeline.workspace import pipeline_run, push
from tasks.chunk import ChunkConfig, chunk_task
from tasks.ingest import IngestConfig, ingest_task
from tasks.validate import ValidateConfig, ValidationFailed, validate_task

STAGES = {"tiny_ingest": IngestConfig, "tiny_validate": ValidateConfig, "tiny_chunk": ChunkConfig}
TinyParams = pipeline_params("TinyParams", STAGES)


@flow(name="tiny", log_prints=True)
def tiny(params: TinyParams = TinyParams()) -> list[dict]:
    with pipeline_run("tiny", STAGES, params.overrides(), params.wait_s, str(flow_run.id or "")) as run:
        results = [
            ingest_task(run, "tiny_ingest"),
            validate_task(run, "tiny_validate"),
            chunk_task(run, "tiny_chunk"),
        ]
        if params.push:
            push()
    return results


def main(argv: list[str] | None = None) -> None:
    flow_main("tiny", tiny, TinyParams, argv, failures=(ValidationFailed,))


if __name__ == "__main__":
    main()
'''

CONFIGS = {
    "tiny_ingest": {"source": "data/tiny_raw", "out_dir": "data/tiny_ingest", "ocr_workers": 1},
    "tiny_validate": {"documents": "data/tiny_ingest/documents.parquet", "out_dir": "data/tiny_validate"},
    "tiny_chunk": {"documents": "data/tiny_ingest/documents.parquet",
                   "validation": "data/tiny_validate/result.json",  # the gate: tiny_validate's verdict
                   "out_dir": "data/tiny_chunk", "chunk_size": 200, "chunk_overlap": 20},
}

TEXTS = {
    "a.txt": "The river rose in the night and by morning the lower fields were under water. " * 6,
    "b.txt": "A lighthouse keeper counts the ships that pass, and writes each name in a ledger. " * 6,
    "c.md": "# Notes\n\nSmall pipelines are easy to read. Each stage does one thing and hands on a path.\n" * 5,
}


def add_tiny_pipeline(ws) -> list[str]:
    """Write the tiny pipeline into the workspace by the convention alone; commit; return the paths."""
    raw = ws / "data" / "tiny_raw"
    raw.mkdir(parents=True)
    for name, text in TEXTS.items():
        (raw / name).write_text(text)
    for stage, values in CONFIGS.items():
        (ws / "configs" / f"{stage}.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    (ws / "flows" / "tiny.py").write_text(FLOW)
    # each stage: its generic module with config=, that module's code deps (as dvc.yaml lists them for
    # the module's own stage), its inputs, its config as params, data/<stage>/ as its out
    dvc_yaml = yaml.safe_load((ws / "dvc.yaml").read_text())
    code = {module: [d for d in dvc_yaml["stages"][module]["deps"] if not d.startswith("data/")]
            for module in ("ingest", "validate", "chunk")}
    inputs = {"tiny_ingest": ["data/tiny_raw"], "tiny_validate": ["data/tiny_ingest/documents.parquet"],
              "tiny_chunk": ["data/tiny_ingest/documents.parquet", "data/tiny_validate/result.json"]}
    lines = []
    for stage, module in zip(STAGES, ("ingest", "validate", "chunk")):
        lines += [f"  {stage}:", f"    cmd: python -m tasks.{module} config=configs/{stage}.yaml", "    deps:",
                  *[f"      - {d}" for d in code[module] + inputs[stage]],
                  "    params:", f"      - configs/{stage}.yaml:", "    outs:", f"      - data/{stage}"]
    assert list(dvc_yaml)[-1] == "stages"  # appended lines land in the stages mapping
    (ws / "dvc.yaml").write_text((ws / "dvc.yaml").read_text().rstrip("\n") + "\n" + "\n".join(lines) + "\n")
    prefect = yaml.safe_load((ws / "prefect.yaml").read_text())
    llm = next(d for d in prefect["deployments"] if d["entrypoint"] == "flows/llm.py:llm")
    prefect["deployments"].append({**llm, "name": "nightly", "description": "tiny pipeline",
                                   "entrypoint": "flows/tiny.py:tiny", "tags": ["tiny"]})
    (ws / "prefect.yaml").write_text(yaml.safe_dump(prefect, sort_keys=False))
    run_in(ws, *GIT, "add", "-A")
    run_in(ws, *GIT, "commit", "-qm", "the tiny pipeline")
    return run_in(ws, "git", "show", "--name-only", "--format=", "HEAD").stdout.split()


def mlflow_runs(ws, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{ws}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    runs = [] if exp is None else client.search_runs(
        [exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=500)
    return client, runs


def stage_lines(out: str) -> dict[str, str]:
    return conftest.stage_lines(out, STAGES)


@pytest.mark.slow
def test_a_pipeline_made_by_the_convention_alone(workspace):
    ws = workspace
    changed = add_tiny_pipeline(ws)
    assert not [p for p in changed if p.startswith(("forgeline/", "tasks/"))], changed

    listing = run_in(ws, "-m", "forgeline", "run", "--list").stdout
    assert "tiny: tiny_ingest -> tiny_validate -> tiny_chunk" in listing.splitlines(), listing
    assert "llm: ingest -> validate -> chunk" in listing
    plan = run_in(ws, "-m", "forgeline", "plan", "tiny").stdout
    assert plan.count("never run (not in dvc.lock)") == 3 and "3 of 3 stages would run" in plan, plan

    first = run_in(ws, "-m", "forgeline", "run", "tiny", "--no-push")
    assert stage_lines(first.stdout) == {s: "ran" for s in STAGES}, first.stdout[-3000:] + first.stderr[-3000:]
    docs = pd.read_parquet(ws / "data" / "tiny_ingest" / "documents.parquet")
    assert len(docs) == len(TEXTS)
    assert (ws / "data" / "tiny_validate" / "result.json").exists()
    chunks = pd.read_parquet(ws / "data" / "tiny_chunk" / "chunks.parquet")
    assert set(chunks["doc_id"]) == set(docs["doc_id"]) and (chunks["n_chars"] <= 200).all()
    assert not (ws / "data" / "ingest").exists()  # the llm pipeline's folders stay untouched

    client, runs = mlflow_runs(ws, "forgeline-tiny")
    (parent,) = [r for r in runs if r.data.tags.get("forgeline.pipeline") == "tiny"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == sorted(STAGES)
    ids = {stage: r.info.run_id for stage, r in children.items()}
    for stage, r in children.items():
        assert r.info.status == "FINISHED" and r.data.tags["forgeline.stage"] == stage
        assert r.data.tags["dvc.skipped"] == "false"
        # the stage's own process logged its resolved config into this run: that config is its own
        assert r.data.params["out_dir"] == f"data/{stage}"
    assert children["tiny_validate"].data.tags["lineage.upstream.tiny_ingest"] == ids["tiny_ingest"]
    assert children["tiny_chunk"].data.tags["lineage.upstream.tiny_ingest"] == ids["tiny_ingest"]
    assert children["tiny_chunk"].data.tags["lineage.upstream.tiny_validate"] == ids["tiny_validate"]

    # nothing changed: DVC skips every stage, each still gets a child run pointing at its producer
    second = run_in(ws, "-m", "forgeline", "run", "tiny", "--no-push")
    assert stage_lines(second.stdout) == {s: "skipped" for s in STAGES}, second.stdout[-3000:]
    _, runs = mlflow_runs(ws, "forgeline-tiny")
    parents = [r for r in runs if r.data.tags.get("forgeline.pipeline") == "tiny"]
    assert len(parents) == 2
    again = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[1].info.run_id}
    assert sorted(again) == sorted(STAGES)
    for stage, r in again.items():
        assert r.data.tags["dvc.skipped"] == "true"
        assert r.data.tags["forgeline.reused_run_id"] == ids[stage]
    assert "nothing would run" in run_in(ws, "-m", "forgeline", "plan", "tiny").stdout

    # a stage run by hand logs to the experiment of the pipeline whose flow lists it
    run_in(ws, "-m", "tasks.chunk", "config=configs/tiny_chunk.yaml")
    _, runs = mlflow_runs(ws, "forgeline-tiny")
    by_hand = [r for r in runs if r.info.run_name == "tiny_chunk" and "mlflow.parentRunId" not in r.data.tags]
    assert len(by_hand) == 1 and by_hand[0].data.params["validation"] == "data/tiny_validate/result.json"

    # the llm pipeline's experiment got nothing from any of it
    assert mlflow_runs(ws, "forgeline-llm")[1] == []
    # and the deployment entry resolves to the flow
    deployed = run_in(ws, sys.executable, "-c", "import yaml; from prefect.flows import load_flow_from_entrypoint; "
                      "(d,) = [d for d in yaml.safe_load(open('prefect.yaml'))['deployments'] if 'tiny' in d['tags']]; "
                      "print(load_flow_from_entrypoint(d['entrypoint']).name)")
    assert deployed.stdout.strip().endswith("tiny")


def test_pipelines_are_read_from_the_flows_and_name_their_experiment(tmp_path, monkeypatch):
    """Fast: the discovery `forgeline run --list`, `forgeline plan` and a stage run by hand rely on."""
    import mlflow

    from forgeline import pipelines
    from forgeline.tracking import stage_run

    assert pipelines.pipelines()["llm"][:3] == ["ingest", "validate", "chunk"]
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "__init__.py").write_text("")
    (flows / "tiny.py").write_text(FLOW)
    (flows / "helpers.py").write_text("X = 1\n")  # no STAGES: no pipeline
    assert pipelines.pipelines(flows) == {"tiny": STAGES}
    assert pipelines.pipeline_of("tiny_chunk", flows) == "tiny" and pipelines.pipeline_of("chunk", flows) is None

    # by hand, a stage logs to its pipeline's experiment; one no flow lists yet to forgeline-adhoc
    import mlflow.tracking._tracking_service.utils as uri_state
    import mlflow.tracking.fluent as fluent

    # MLflow keeps the store and the active experiment in globals (and env vars): put them back afterwards
    monkeypatch.setattr(uri_state, "_tracking_uri", uri_state._tracking_uri)
    monkeypatch.setattr(fluent, "_active_experiment_id", fluent._active_experiment_id)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("FORGELINE_RUN_ID", raising=False)
    for stage in ("chunk", "brand_new_stage"):
        with stage_run(stage, {"out_dir": f"data/{stage}"}):
            pass
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for experiment, stage in (("forgeline-llm", "chunk"), ("forgeline-adhoc", "brand_new_stage")):
        (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert run.info.run_name == stage and run.data.params["out_dir"] == f"data/{stage}"
