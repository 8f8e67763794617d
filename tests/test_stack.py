"""The local stack for real: `forgeline up` in a throw-away copy of the repo starts a Prefect server,
a process worker and an MLflow server on 127.0.0.1, deploys prefect.yaml; two runs of the LLM
deployment triggered at once run one after the other; the model is registered with lineage tags.

The stack and its first two runs are shared by test_stack, test_lineage, test_faults and test_ui
(one start-up, one full pipeline run per session): `shared_stack()` below.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ALIGNMENT_FAST, cli_overrides, commit_settings, make_workspace, run_in, workspace_env

pytestmark = pytest.mark.slow

# a short pretraining, a short evaluation; every other stage setting stays as configs/ say
FAST = {"pretrain": {"max_steps": 6, "eval_interval": 3, "ckpt_interval": 3, "log_interval": 3, "batch_size": 8},
        "evaluate": {"max_eval_tokens": 20000, "n_samples": 2, "max_new_tokens": 8}, **ALIGNMENT_FAST}
DEPLOYMENT = "llm/nightly"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Stack:
    ws: Path
    state: dict[str, Any]
    runs: dict[str, str] = field(default_factory=dict)  # name -> flow run id, shared between modules

    def cli(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        return run_in(self.ws, "-m", "forgeline", *args, check=check, timeout=timeout)

    def env(self) -> dict[str, str]:
        env = workspace_env()
        env.update(PREFECT_API_URL=self.state["prefect_api_url"], MLFLOW_TRACKING_URI=self.state["mlflow_url"])
        return env

    def client(self):
        """A sync Prefect client of this stack (use in a `with`)."""
        return _client(self.state["prefect_api_url"])

    def trigger(self, params: dict, deployment: str = DEPLOYMENT) -> str:
        with self.client() as client:
            dep = client.read_deployment_by_name(deployment)
            return str(client.create_flow_run_from_deployment(dep.id, parameters={"params": params}).id)

    def flow_run(self, run_id: str):
        from uuid import UUID

        with self.client() as client:
            return client.read_flow_run(UUID(run_id))

    def wait(self, run_id: str, until=TERMINAL, timeout: float = 600) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            run = self.flow_run(run_id)
            if run.state_type and run.state_type.value in until:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"flow run {run.name} still {run.state_name} after {timeout:.0f}s\n"
                                     f"{self.log_tail()}")
            time.sleep(1)

    def log_tail(self, n: int = 4000) -> str:
        return (self.ws / ".forgeline" / "stack" / "worker.log").read_text(errors="replace")[-n:]

    def mlflow(self):
        import mlflow

        return mlflow.MlflowClient(self.state["mlflow_url"])


def _client(api_url: str):
    import contextlib

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    @contextlib.contextmanager
    def scoped():
        with temporary_settings({PREFECT_API_URL: api_url}):
            with get_client(sync_client=True) as client:
                yield client
    return scoped()


_SHARED: dict[str, Stack] = {}


def trim_sample(ws: Path) -> None:
    """Drop the PDFs from the workspace's sample (OCR is the slowest part of ingest) and commit."""
    for sub in ("pdf", "scanned"):
        subprocess.run(["git", "rm", "-rq", f"data/raw/{sub}"], cwd=ws, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "text-only sample"],
                   cwd=ws, check=True)


def shared_stack(request, tmp_path_factory) -> Stack:
    """The session's stack, up with paused schedules; its first two runs ('first', 'second') were
    triggered at once with the same parameters. Stopped (`forgeline down`) at the end of the session."""
    if "stack" in _SHARED:
        return _SHARED["stack"]
    ws = make_workspace(tmp_path_factory.mktemp("stack"))
    trim_sample(ws)
    # a run's overrides apply to that run only: the short settings every run here uses (the UI's
    # custom run included, which overrides one value) are the workspace's committed configs
    commit_settings(ws, cli_overrides(FAST))
    t0 = time.perf_counter()
    request.config.add_cleanup(lambda: run_in(ws, "-m", "forgeline", "down", check=False))
    proc = run_in(ws, "-m", "forgeline", "up", "--paused-schedules", timeout=600)
    stack = Stack(ws, json.loads((ws / ".forgeline" / "stack" / "stack.json").read_text()))
    print(f"forgeline up: {time.perf_counter() - t0:.0f}s\n{proc.stdout}")
    stack.runs["first"] = stack.trigger(FAST)
    stack.runs["second"] = stack.trigger(FAST)
    _SHARED["stack"] = stack
    return stack


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory) -> Stack:
    return shared_stack(request, tmp_path_factory)


def listening(pids: list[int]) -> set[str]:
    """'ip:port' of every TCP socket these processes listen on (from /proc/net/tcp{,6})."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = fd.readlink().as_posix()
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                addr, port = cols[1].split(":")
                raw = bytes.fromhex(addr)
                if len(raw) == 4:
                    ip = ".".join(str(b) for b in raw[::-1])
                else:
                    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
                    ip = ":".join(w.hex() for w in words)
                found.add(f"{ip}:{int(port, 16)}")
    return found


def test_up_serves_on_loopback_only(stack):
    from forgeline.stack import descendants

    st = json.loads(stack.cli("status", "--json").stdout)
    assert all(s["running"] and s["healthy"] for s in st["services"].values()), st["services"]
    pids = [s["pid"] for s in st["services"].values()]
    pids += [d for p in pids for d in descendants(p)]
    addrs = listening(pids)
    assert addrs, "no listening sockets found"
    assert all(a.startswith("127.0.0.1:") for a in addrs), addrs
    assert f"127.0.0.1:{stack.state['prefect_port']}" in addrs and f"127.0.0.1:{stack.state['mlflow_port']}" in addrs
    # project-local state
    assert str(stack.ws) in st["stores"]["prefect_db"] and str(stack.ws) in st["stores"]["mlflow_backend"]
    assert (stack.ws / ".prefect" / "server.db").exists()


def test_deployment_has_schedule_pool_and_typed_parameters(stack):
    st = json.loads(stack.cli("status", "--json").stdout)
    assert st["pool"]["type"] == "process" and st["pool"]["concurrency_limit"] == 1 and st["pool"]["workers"]
    (dep,) = [d for d in st["deployments"] if d["name"] == DEPLOYMENT]
    assert dep["schedules"] == [{"cron": "0 2 * * *", "active": False}]  # paused by --paused-schedules
    assert dep["concurrency_limit"] == 1
    with stack.client() as client:
        d = client.read_deployment_by_name(DEPLOYMENT)
        schema = d.parameter_openapi_schema
        assert d.enforce_parameter_schema
        defs = schema["definitions"]
        # one typed section per stage: the UI renders it as a form
        assert defs["PretrainConfigOverrides"]["properties"]["max_steps"]["anyOf"][0]["type"] == "integer"
        # a wrongly typed parameter is refused before any run exists
        from prefect.exceptions import PrefectHTTPStatusError

        with pytest.raises(PrefectHTTPStatusError, match="422|max_steps"):
            client.create_flow_run_from_deployment(d.id, parameters={"params": {"pretrain": {"max_steps": "many"}}})


def test_two_runs_triggered_at_once_run_one_after_the_other(stack):
    first = stack.wait(stack.runs["first"], timeout=900)
    assert first.state_type.value == "COMPLETED", f"{first.state}\n{stack.log_tail()}"
    second = stack.wait(stack.runs["second"], timeout=300)
    assert second.state_type.value == "COMPLETED", f"{second.state}\n{stack.log_tail()}"
    assert second.start_time >= first.end_time, (first.end_time, second.start_time)
    with stack.client() as client:
        states = [s.name for s in client.read_flow_run_states(second.id)]
    # it waited in the pool's queue (Scheduled/Late) or for the deployment's slot, then ran
    assert states[0] == "Scheduled" and "Running" in states, states
    # dvc.lock and the cache are intact: every file of every output in dvc.lock is in the cache
    # with the bytes its md5 names, and on the remote (later tests in the session may have changed
    # the workspace itself, so `dvc status` against it is not the question here)
    cache = stack.ws / ".dvc" / "cache" / "files" / "md5"
    lock = yaml.safe_load((stack.ws / "dvc.lock").read_text())["stages"]
    checked = 0
    for stage in lock.values():
        for out in stage["outs"]:
            md5 = out["md5"]
            entries = json.loads((cache / md5[:2] / md5[2:]).read_text()) if md5.endswith(".dir") else \
                [{"md5": md5, "relpath": out["path"]}]
            for entry in entries:
                data = (cache / entry["md5"][:2] / entry["md5"][2:]).read_bytes()
                assert hashlib.md5(data).hexdigest() == entry["md5"], (out["path"], entry["relpath"])
                checked += 1
    assert checked > 10
    assert "in sync" in run_in(stack.ws, sys.executable, "-m", "dvc", "status", "--cloud").stdout


def test_model_registered_with_lineage_tags(stack):
    first = stack.wait(stack.runs["first"], timeout=900)
    client = stack.mlflow()
    (version,) = client.search_model_versions(f"name='forgeline-llm' and tags.`prefect.flow_run_id` = '{first.id}'")
    assert version.tags["git.commit"] != "unknown" and version.tags["forgeline.stage"] == "rlhf"
    run = client.get_run(version.run_id)
    assert run.data.tags["forgeline.stage"] == "rlhf" and run.data.tags["prefect.flow_run_id"] == str(first.id)
    assert version.tags["dvc.out.data/rlhf"] == run.data.tags["dvc.out.data/rlhf"]
    assert version.tags["lineage.upstream.sft"] == run.data.tags["lineage.upstream.sft"]
    # the second run reused the model: same version, alias still on it
    second = stack.wait(stack.runs["second"], timeout=300)
    assert not client.search_model_versions(f"name='forgeline-llm' and tags.`prefect.flow_run_id` = '{second.id}'")
    # it loads back as a GPT from safetensors + config.json (no pickle)
    proc = subprocess.run(
        [sys.executable, "-c", "from forgeline.registry import load_model; import torch; "
         "m = load_model('models:/forgeline-llm@candidate'); "
         "print(type(m).__name__, m(torch.zeros(1, 4, dtype=torch.long))[0].shape)"],
        cwd=stack.ws, env=stack.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("GPT torch.Size([1, "), proc.stdout


def test_status_says_what_runs_where(stack):
    out = stack.cli("status").stdout
    for needle in ("prefect-server", "mlflow-server", "worker", stack.state["prefect_ui_url"],
                   stack.state["mlflow_url"], "deployment llm/nightly", "0 2 * * * (paused)", "forgeline-llm/"):
        assert needle in out, out
    env = stack.cli("env").stdout
    assert f"PREFECT_API_URL={stack.state['prefect_api_url']}" in env


def test_up_again_is_idempotent(stack):
    def pids():
        state = json.loads((stack.ws / ".forgeline" / "stack" / "stack.json").read_text())
        return {k: v["pid"] for k, v in state["services"].items()}
    before = pids()
    stack.cli("up", "--paused-schedules", "--no-deploy")
    assert pids() == before
