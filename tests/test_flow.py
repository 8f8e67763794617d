"""The LLM flow end to end on the shipped sample, in a throw-away copy of the repo.

Real Prefect (ephemeral), real DVC, real MLflow (sqlite): a first run, a no-op rerun that skips
every stage, a chunk change that reruns from chunk on, lineage in MLflow, the workspace lock,
and the validation gate stopping the flow.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from tests import conftest
from tests.conftest import ALIGNMENT_FAST, cli_overrides, commit_settings, run_in, workspace_env

pytestmark = pytest.mark.slow

STAGES = ["ingest", "validate", "chunk", "tokenizer", "pretrain", "evaluate", "chat_data", "sft", "reward", "rlhf",
          "safety", "deploy"]
# keep the pretraining in the smoke test short; the demo trains the full tiny preset
FAST = ["pretrain.max_steps=12", "pretrain.eval_interval=6", "pretrain.ckpt_interval=6",
        "pretrain.log_interval=6", "pretrain.batch_size=8", "evaluate.max_eval_tokens=20000",
        "evaluate.n_samples=2", "evaluate.max_new_tokens=8", *cli_overrides(ALIGNMENT_FAST)]


def stage_lines(out: str) -> dict[str, str]:
    return conftest.stage_lines(out, STAGES)


def mlflow_runs(ws):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{ws}/mlflow.db")
    exp = client.get_experiment_by_name("forgeline-llm")
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"],
                                      max_results=500)


@pytest.fixture(scope="module")
def first_run(workspace):
    # FAST is the workspace's own configs: a run's overrides apply to that run only, and the later
    # plain runs here must find nothing changed
    commit_settings(workspace, FAST)
    proc = run_in(workspace, "-m", "flows.llm")  # pushes to the default remote at the end
    return workspace, proc


def test_first_run_runs_every_stage(first_run):
    ws, proc = first_run
    assert stage_lines(proc.stdout) == {s: "ran" for s in STAGES}, proc.stdout[-3000:]
    docs = json.loads((ws / "data" / "ingest" / "summary.json").read_text())
    assert docs["documents"] >= 8 and docs["ocr_pages"] >= 1
    meta = json.loads((ws / "data" / "tokenizer" / "meta.json").read_text())
    assert meta["n_tokens"]["train"] > 100_000
    metrics = json.loads((ws / "data" / "evaluate" / "metrics.json").read_text())
    assert 0 < metrics["val_bits_per_byte"] < 8
    # everything was pushed to the default (local directory) remote
    assert any((ws / ".dvcstore").rglob("*"))
    assert "in sync" in run_in(ws, sys.executable, "-m", "dvc", "status", "--cloud").stdout



def test_console_shows_each_dvc_line_once(first_run):
    """DVC's logger prints its lines to stdout; Prefect's root console handler used to print each again
    (stderr), with DVC's `git add` hint after every stage."""
    _, proc = first_run
    out = proc.stdout + proc.stderr
    for stage in STAGES:
        assert out.count(f"Running stage '{stage}'") == 1, stage
    assert "To track the changes with git" not in out
    # a start line per stage, and the training stages' own progress lines, once each
    assert all(out.count(f"[{stage}] dvc repro --single-item {stage} ") == 1 for stage in STAGES)
    steps = [line.strip() for line in proc.stdout.splitlines() if line.lstrip().startswith("step ")]
    assert steps and not any(line in proc.stderr for line in steps)

def test_lineage_in_mlflow(first_run):
    ws, _ = first_run
    client, runs = mlflow_runs(ws)
    parents = [r for r in runs if r.data.tags.get("forgeline.pipeline") == "llm"]
    assert len(parents) == 1
    parent = parents[0]
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    assert flow_run_id and parent.data.tags["git.commit"] != "unknown"
    children = {r.data.tags["forgeline.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == sorted(STAGES)
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    for stage, run in children.items():
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        assert tags["prefect.flow_run_id"] == flow_run_id
        assert tags["dvc.skipped"] == "false"
        for out in lock[stage]["outs"]:
            assert tags[f"dvc.out.{out['path']}"] == out["md5"]
        for dep in lock[stage]["deps"]:
            assert tags[f"dvc.dep.{dep['path']}"] == dep["md5"]
        assert run.data.params, f"{stage} logged no params"
        outputs = [d for d in run.inputs.dataset_inputs
                   if any(t.key == "mlflow.data.context" and t.value == "output" for t in d.tags)]
        assert {d.dataset.name for d in outputs} == {o["path"] for o in lock[stage]["outs"]}
        assert {d.dataset.digest for d in outputs} == {o["md5"][:36] for o in lock[stage]["outs"]}
    # each stage names the runs that produced the data it read
    ids = {stage: run.info.run_id for stage, run in children.items()}
    assert children["pretrain"].data.tags["lineage.upstream.tokenizer"] == ids["tokenizer"]
    assert children["tokenizer"].data.tags["lineage.upstream.chunk"] == ids["chunk"]
    assert children["chunk"].data.tags["lineage.upstream.validate"] == ids["validate"]
    assert children["evaluate"].data.tags["lineage.upstream.pretrain"] == ids["pretrain"]
    assert "lineage.upstream.ingest" not in children["ingest"].data.tags
    # alignment: SFT from the base model, the reward model from SFT, RLHF from both
    assert children["sft"].data.tags["lineage.upstream.pretrain"] == ids["pretrain"]
    assert children["sft"].data.tags["lineage.upstream.chat_data"] == ids["chat_data"]
    assert children["reward"].data.tags["lineage.upstream.sft"] == ids["sft"]
    assert children["rlhf"].data.tags["lineage.upstream.sft"] == ids["sft"]
    assert children["rlhf"].data.tags["lineage.upstream.reward"] == ids["reward"]
    assert children["rlhf"].data.params["algorithm"] == "ppo"
    assert {"win_rate", "kl_to_reference", "sampled_win_rate"} <= set(children["rlhf"].data.metrics)
    # the registered model is the aligned one: the rlhf run's model/ artifacts
    version = client.get_model_version_by_alias("forgeline-llm", "candidate")
    assert version.run_id == ids["rlhf"] and version.tags["forgeline.stage"] == "rlhf"
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer.json"} <= {
        a.path for a in client.list_artifacts(ids["rlhf"], "model")}
    assert children["chunk"].data.params["splitter"]
    assert "pretrain.loss" not in children["pretrain"].data.metrics
    assert children["pretrain"].data.metrics["val_loss"] > 0
    assert "loss_curve.png" in {a.path for a in client.list_artifacts(children["pretrain"].info.run_id)}


def test_rerun_with_nothing_changed_skips_everything(first_run):
    ws, _ = first_run
    t0 = time.perf_counter()
    proc = run_in(ws, "-m", "flows.llm", "--no-push")
    assert stage_lines(proc.stdout) == {s: "skipped" for s in STAGES}, proc.stdout[-3000:]
    print(f"no-op rerun of the flow: {time.perf_counter() - t0:.1f}s")
    client, runs = mlflow_runs(ws)
    skipped = [r for r in runs if r.data.tags.get("dvc.skipped") == "true"]
    assert len(skipped) == len(STAGES)
    # a skipped stage points at the run that produced its (unchanged) outputs
    produced = {r.info.run_id for r in runs if r.data.tags.get("dvc.skipped") == "false"}
    assert all(r.data.tags["forgeline.reused_run_id"] in produced for r in skipped)
    # and plain `dvc repro` agrees that nothing of this pipeline is stale (the other pipelines never ran here)
    status = run_in(ws, sys.executable, "-m", "dvc", "status", *STAGES)
    assert "up to date" in status.stdout


def test_changing_a_chunk_parameter_reruns_from_chunk(first_run):
    ws, _ = first_run
    size = yaml.safe_load((ws / "configs" / "chunk.yaml").read_text())["chunk_size"]
    proc = run_in(ws, "-m", "flows.llm", f"chunk.chunk_size={size + 100}", "--no-push")
    lines = stage_lines(proc.stdout)
    assert lines["ingest"] == lines["validate"] == "skipped"
    assert lines["chunk"] == lines["tokenizer"] == "ran"
    # pretrain/evaluate depend on the tokenizer's outputs, which changed with the chunks, and so
    # does everything trained from the base model; the chat data does not
    assert lines["pretrain"] == lines["evaluate"] == lines["sft"] == lines["reward"] == lines["rlhf"] == "ran"
    assert lines["chat_data"] == "skipped"
    # the one-off value is what DVC recorded the outputs with; the file is back as committed
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert lock["chunk"]["params"]["configs/chunk.yaml"]["chunk_size"] == size + 100
    assert run_in(ws, "git", "status", "--porcelain", "--untracked-files=no").stdout == ""


def test_plain_run_after_a_one_off_run_uses_the_files_value(first_run):
    """The chunk run above overrode chunk_size: the next plain run makes chunk's outputs with the file's
    value again (DVC restores them from its run cache: the first run made exactly these)."""
    ws, _ = first_run
    size = yaml.safe_load((ws / "configs" / "chunk.yaml").read_text())["chunk_size"]
    proc = run_in(ws, "-m", "flows.llm", "--no-push")
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert lock["chunk"]["params"]["configs/chunk.yaml"]["chunk_size"] == size, proc.stdout[-3000:]
    client, runs = mlflow_runs(ws)
    parent = [r for r in runs if r.data.tags.get("forgeline.pipeline") == "llm"][-1]
    (chunk,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                and r.data.tags["forgeline.stage"] == "chunk"]
    made_by = client.get_run(chunk.data.tags.get("forgeline.reused_run_id") or chunk.info.run_id)
    assert made_by.data.params["chunk_size"] == str(size)
    assert made_by.data.tags["dvc.out.data/chunk"] == chunk.data.tags["dvc.out.data/chunk"]


def test_unknown_config_key_fails_before_any_work(first_run):
    ws, _ = first_run
    lock_before = (ws / "dvc.lock").read_text()
    _, runs_before = mlflow_runs(ws)
    proc = run_in(ws, "-m", "flows.llm", "chunk.chunk_sizes=5", "--no-push", check=False)
    assert proc.returncode != 0
    assert "chunk_sizes" in proc.stdout + proc.stderr
    assert (ws / "dvc.lock").read_text() == lock_before
    _, runs_after = mlflow_runs(ws)
    assert len(runs_after) == len(runs_before)


def test_second_pipeline_run_fails_clearly_while_workspace_is_held(first_run):
    ws, _ = first_run
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl,sys,time; f=open('.forgeline/pipeline.lock','a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.write('held by test'); f.flush(); print('held', flush=True); "
         "time.sleep(120)"],
        cwd=ws, env=workspace_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_in(ws, "-m", "flows.llm", "--no-push", "--wait-s", "2", check=False)
        assert proc.returncode != 0
        assert "held by another pipeline run" in proc.stdout + proc.stderr
    finally:
        holder.kill()
        holder.wait()


def test_failed_validation_stops_the_flow_before_chunk(first_run):
    ws, _ = first_run
    proc = run_in(ws, "-m", "flows.llm", "validate.min_chars=10000000", "--no-push", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "expect_column_value_lengths_to_be_between(text)" in out and "unexpected" in out
    client, runs = mlflow_runs(ws)
    last_parent = [r for r in runs if r.data.tags.get("forgeline.pipeline") == "llm"][-1]
    stages = {r.data.tags["forgeline.stage"] for r in runs
              if r.data.tags.get("mlflow.parentRunId") == last_parent.info.run_id}
    assert stages == {"ingest", "validate"}
    assert (ws / "data" / "validate" / "data_docs" / "index.html").exists()
