"""Faults the stack survives, for real on the session's stack (tests/test_stack.py):

- the flow process killed with SIGKILL mid-training: the run ends Crashed, the waiting run gets the
  slot and resumes training from the last complete checkpoint;
- the worker killed with SIGKILL: its run ends Crashed (not Running forever), `forgeline up`
  brings a worker back;
- the MLflow server down for a while: the run's MLflow calls are retried and it completes;
- a validation failure: the run fails once, the validate task is not retried.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from forgeline.checkpoint import complete_checkpoints
from tests.test_stack import FAST, shared_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory):
    stack = shared_stack(request, tmp_path_factory)
    for name in ("first", "second"):  # the workspace holds a tokenizer by now: training starts at once
        assert stack.wait(stack.runs[name], timeout=900).state_type.value == "COMPLETED", stack.log_tail()
    return stack


def training(max_steps: int) -> dict:
    """FAST, but long enough to be killed in the middle, with a checkpoint every 2 steps."""
    return {**FAST, "pretrain": {**FAST["pretrain"], "max_steps": max_steps, "ckpt_interval": 2, "eval_interval": 4}}


def wait_for_checkpoint(stack, run_id: str, before: set[Path], timeout: float = 600) -> Path:
    """The first complete checkpoint of a new trajectory (a folder not in `before`)."""
    root = stack.ws / "checkpoints" / "pretrain"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for traj in set(root.glob("*")) - before if root.exists() else []:
            if complete_checkpoints(traj):
                return traj
        run = stack.flow_run(run_id)
        assert run.state_type.value not in {"COMPLETED", "FAILED", "CRASHED"}, (run.state, stack.log_tail())
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint after {timeout}s\n{stack.log_tail()}")


def holder(stack) -> dict:
    """Who holds the workspace: the flow process writes its pid and flow run id into the lock file."""
    return json.loads((stack.ws / ".forgeline" / "pipeline.lock").read_text())


def stack_state(stack) -> dict:
    return json.loads((stack.ws / ".forgeline" / "stack" / "stack.json").read_text())


def test_sigkill_mid_training_crashes_run_and_next_run_resumes(stack):
    before = set((stack.ws / "checkpoints" / "pretrain").glob("*"))
    killed = stack.trigger(training(12))
    waiting = stack.trigger(training(12))  # queued behind it: one run per workspace
    traj = wait_for_checkpoint(stack, killed, before)
    owner = holder(stack)
    assert owner["flow_run_id"] == killed
    pid = owner["pid"]
    assert os.getpgid(pid) == pid  # the worker starts each flow run in a process group of its own
    os.killpg(pid, signal.SIGKILL)  # the flow process and the training under it
    last = complete_checkpoints(traj)[-1]
    assert stack.flow_run(waiting).state_type.value == "SCHEDULED"

    crashed = stack.wait(killed, timeout=120)
    assert crashed.state_type.value == "CRASHED", crashed.state
    resumed = stack.wait(waiting, timeout=600)
    assert resumed.state_type.value == "COMPLETED", (resumed.state, stack.log_tail())
    assert resumed.start_time >= crashed.end_time
    step = int(last.name.split("_")[1])
    assert f"pretrain: resumed from checkpoints/pretrain/{traj.name}/step_{step:08d} at step {step}" in stack.log_tail(200_000)
    client = stack.mlflow()
    (version,) = client.search_model_versions(f"name='forgeline-llm' and tags.`prefect.flow_run_id` = '{waiting}'")
    summary = json.loads((stack.ws / "data" / "pretrain" / "summary.json").read_text())
    assert summary["steps"] == 12


def test_sigkill_of_worker_crashes_its_run_and_up_restarts_it(stack):
    before = set((stack.ws / "checkpoints" / "pretrain").glob("*"))
    run = stack.trigger(training(14))
    wait_for_checkpoint(stack, run, before)
    worker = stack_state(stack)["services"]["worker"]
    flow_pid = holder(stack)["pid"]
    os.kill(worker["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    crashed = stack.wait(run, timeout=240)  # the orphaned run aborts itself, or its heartbeats stop
    assert crashed.state_type.value == "CRASHED", crashed.state
    print(f"run Crashed {time.monotonic() - t0:.0f}s after its worker was killed: {crashed.state.message}")
    deadline = time.monotonic() + 120
    while Path(f"/proc/{flow_pid}").exists() and time.monotonic() < deadline:
        time.sleep(1)
    assert not Path(f"/proc/{flow_pid}").exists() or "Z" in Path(f"/proc/{flow_pid}/stat").read_text().split(")")[1][:3]
    status = json.loads(stack.cli("status", "--json").stdout)
    assert not status["services"]["worker"]["running"]
    stack.cli("up", "--paused-schedules", "--no-deploy")
    status = json.loads(stack.cli("status", "--json").stdout)
    assert status["services"]["worker"]["running"] and status["services"]["worker"]["pid"] != worker["pid"]


def test_mlflow_server_briefly_down_is_retried(stack):
    from forgeline.stack import stop_process

    state = stack_state(stack)
    stop_process(state["services"]["mlflow-server"])
    run = stack.trigger(FAST)  # every stage up to date: the run is mostly MLflow calls
    stack.wait(run, until={"RUNNING", "COMPLETED", "FAILED", "CRASHED"}, timeout=300)
    time.sleep(10)  # it has met the refused connections by now
    assert stack.flow_run(run).state_type.value == "RUNNING", stack.log_tail()
    stack.cli("up", "--paused-schedules", "--no-deploy")  # same port, same store
    assert stack_state(stack)["mlflow_port"] == state["mlflow_port"]
    done = stack.wait(run, timeout=600)
    assert done.state_type.value == "COMPLETED", (done.state, stack.log_tail())
    parents = stack.mlflow().search_runs(
        [stack.mlflow().get_experiment_by_name("forgeline-llm").experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{run}' and tags.`forgeline.pipeline` = 'llm'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def test_validation_failure_is_not_retried(stack):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    try:
        run = stack.trigger({**FAST, "validate": {"min_chars": 10_000_000}})
        failed = stack.wait(run, timeout=300)
    finally:  # the override went into the workspace's configs/validate.yaml: put it back
        subprocess.run(["git", "checkout", "configs/validate.yaml"], cwd=stack.ws, check=True)
    assert failed.state_type.value == "FAILED", failed.state
    assert failed.run_count == 1
    with stack.client() as client:
        tasks = {t.name.rsplit("-", 1)[0]: t for t in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[failed.id])))}
    assert tasks["validate"].state_type.value == "FAILED" and tasks["validate"].run_count == 1
    assert "chunk" not in tasks and "register" not in tasks
