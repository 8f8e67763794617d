"""The local stack: Prefect server, a process worker and an MLflow tracking server, on 127.0.0.1 only.

    forgeline up [--paused-schedules]   # start what is not running, create the pool, deploy prefect.yaml
    forgeline status [--json]
    forgeline env                       # export lines pointing a shell at the stack
    forgeline down                      # stop exactly what `up` started

Everything is project-local: .forgeline/stack/ holds stack.json (ports, pids, stores) and one log
per service; Prefect's home is .prefect/ (its server database .prefect/server.db, apart from the
ephemeral database of server-less runs); MLflow keeps the sqlite store ./mlflow.db and the
artifacts ./mlartifacts/ that server-less runs use too. Each service is started in a session of
its own, so stopping it stops its children; a pid is trusted only while its start time matches.

Other stores (scale-out, docs/scale-out.md): PREFECT_SERVER_DATABASE_CONNECTION_URL,
FORGELINE_MLFLOW_BACKEND_STORE_URI (e.g. postgresql+psycopg2://...), FORGELINE_MLFLOW_ARTIFACTS_DESTINATION
(e.g. s3://bucket/mlflow) in the environment of `forgeline up`.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from forgeline.paths import ROOT, STATE
from forgeline.tracking import file_lock

STACK = STATE / "stack"
POOL = "forgeline"
HOST = "127.0.0.1"
HEARTBEAT_S = 30  # flow-run heartbeats; a run silent for 3 of them is marked Crashed
ZOMBIE_AUTOMATION = "forgeline: crash flow runs without heartbeat"
SERVICES = ("prefect-server", "mlflow-server", "worker")  # start order; stopped in reverse


class StackError(RuntimeError):
    """A service did not come up (the message names its log)."""


# ---- processes: started in their own session, known by pid + kernel start time

def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None if gone or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] == "Z" else int(fields[19])


def alive(rec: dict | None) -> bool:
    return bool(rec) and _start_ticks(rec["pid"]) == rec["start_ticks"]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int(d.joinpath("stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(d.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _spawn(name: str, cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    log = STACK / f"{name}.log"
    with open(log, "ab") as fh:
        fh.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    ticks = None
    for _ in range(50):  # /proc/<pid> appears with the fork
        ticks = _start_ticks(proc.pid)
        if ticks is not None:
            break
        time.sleep(0.01)
    return {"pid": proc.pid, "start_ticks": ticks, "cmd": cmd, "log": str(log.relative_to(ROOT))}


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_process(rec: dict, timeout_s: float = 20.0) -> bool:
    """SIGTERM the service's process group (and any descendant that left it), SIGKILL after
    `timeout_s`. Returns False if it was not running."""
    if not alive(rec):
        return False
    pid = rec["pid"]
    # descendants that left the group, e.g. flow runs the worker started in sessions of their own
    strays = [(p, _start_ticks(p)) for p in descendants(pid) if _pgid(p) not in (pid, None)]
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive(rec) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal_group(pid, signal.SIGKILL)
    for p, ticks in strays:
        if ticks is not None and _start_ticks(p) == ticks:
            if _pgid(p) == p:
                _signal_group(p, signal.SIGKILL)
            else:
                _kill(p)
    while alive(rec) and time.monotonic() < deadline + 5:
        time.sleep(0.1)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    """Free to listen on (as the servers do, with SO_REUSEADDR: a just-stopped server's port is)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


def _get(url: str, timeout: float = 2.0) -> str | None:
    try:
        with _DIRECT.open(url, timeout=timeout) as r:
            return r.read().decode()
    except OSError:
        return None


def _wait(name: str, rec: dict, ready, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        if not alive(rec):
            raise StackError(f"{name} exited during start-up; see {rec['log']}:\n{_tail(rec['log'])}")
        time.sleep(0.5)
    raise StackError(f"{name} not ready after {timeout_s:.0f}s; see {rec['log']}:\n{_tail(rec['log'])}")


def _tail(log: str, n: int = 3000) -> str:
    try:
        return (ROOT / log).read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ---- the stack's record and environment

def load() -> dict[str, Any]:
    path = STACK / "stack.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save(state: dict[str, Any]) -> None:
    path = STACK / "stack.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def client_env(state: dict[str, Any]) -> dict[str, str]:
    """What a client of this stack needs: the two servers' URLs and Prefect's home."""
    return {"PREFECT_HOME": str(ROOT / ".prefect"), "PREFECT_API_URL": state["prefect_api_url"],
            "MLFLOW_TRACKING_URI": state["mlflow_url"]}


def _base_env(state: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "MLFLOW_TRACKING_"))}
    env.update(client_env(state))
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1", NO_PROXY="127.0.0.1,localhost",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


def _prefect_client(state: dict[str, Any]):
    """A sync Prefect client for this stack's API (settings scoped to the `with` block)."""
    import contextlib

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    @contextlib.contextmanager
    def scoped():
        with temporary_settings({PREFECT_API_URL: state["prefect_api_url"]}):
            with get_client(sync_client=True) as client:
                yield client
    return scoped()


# ---- services

def _start_prefect(state: dict[str, Any]) -> dict:
    env = _base_env(state)
    env.update(PREFECT_SERVER_API_HOST=HOST, PREFECT_SERVER_API_PORT=str(state["prefect_port"]),
               PREFECT_UI_API_URL=state["prefect_api_url"], PREFECT_SERVER_DATABASE_CONNECTION_URL=state["prefect_db"],
               # a server on 2 busy cores migrates its database slowly on first start
               PREFECT_SERVER_DATABASE_TIMEOUT="60", PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT="30")
    rec = _spawn("prefect-server", [_bin("prefect"), "server", "start", "--host", HOST,
                                    "--port", str(state["prefect_port"])], env)
    _wait("prefect-server", rec, lambda: _get(state["prefect_api_url"] + "/health") == "true", 240)
    return rec


def init_mlflow_store(uri: str) -> None:
    """Create the schema of a new sqlite store once, under the lock the pipeline takes for the same
    job (two processes creating one sqlite file at once can corrupt it). An existing file is left
    to the server, which checks its schema version; a database server serialises on its own."""
    import mlflow

    path = Path(uri.removeprefix("sqlite:///"))
    if not uri.startswith("sqlite:///") or path.exists():
        return
    with file_lock(STATE / "mlflow-init.lock"):
        mlflow.MlflowClient(uri).search_experiments(max_results=1)


def _start_mlflow(state: dict[str, Any]) -> dict:
    init_mlflow_store(state["mlflow_backend"])
    env = _base_env(state)
    env.pop("MLFLOW_TRACKING_URI")
    env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job runner processes: saves ~300 MB
    rec = _spawn("mlflow-server", [
        _bin("mlflow"), "server", "--host", HOST, "--port", str(state["mlflow_port"]),
        "--backend-store-uri", state["mlflow_backend"],
        "--artifacts-destination", state["mlflow_artifacts"], "--workers", "1"], env)
    _wait("mlflow-server", rec, lambda: _get(state["mlflow_url"] + "/health") == "OK", 180)
    return rec


def _start_worker(state: dict[str, Any]) -> dict:
    env = _base_env(state)
    env.update(PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_S))
    name = f"{POOL}-{state['prefect_port']}"
    rec = _spawn("worker", [_bin("prefect"), "worker", "start", "--pool", POOL, "--type", "process",
                            "--name", name], env)

    def online() -> bool:
        with _prefect_client(state) as client:
            return any(w.name == name and str(w.status).upper().endswith("ONLINE")
                       for w in client.read_workers_for_work_pool(POOL))
    _wait("worker", rec, online, 120)
    return rec


def ensure_pool(state: dict[str, Any]) -> None:
    """The process work pool, one flow run at a time (a workspace runs one pipeline at a time)."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    with _prefect_client(state) as client:
        try:
            pool = client.read_work_pool(POOL)
            if pool.concurrency_limit != 1:
                client.update_work_pool(POOL, WorkPoolUpdate(concurrency_limit=1))
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process", concurrency_limit=1))


def ensure_zombie_automation(state: dict[str, Any]) -> None:
    """Mark a flow run Crashed when its heartbeats stop (its process and its worker both died)."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    with _prefect_client(state) as client:
        if client.read_automations_by_name(ZOMBIE_AUTOMATION):
            return
        client.create_automation(AutomationCore(
            name=ZOMBIE_AUTOMATION,
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                        "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
                match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                within=timedelta(seconds=3 * HEARTBEAT_S)),
            actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                        message=f"no heartbeat for {3 * HEARTBEAT_S}s: its process died")]))


def deploy(state: dict[str, Any]) -> str:
    """`prefect deploy --all` of prefect.yaml, from the repo root."""
    proc = subprocess.run([_bin("prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", "prefect.yaml"],
                          cwd=ROOT, env=_base_env(state), capture_output=True, text=True)
    if proc.returncode != 0:
        raise StackError(f"prefect deploy failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def set_schedules(state: dict[str, Any], active: bool) -> int:
    """(De)activate every schedule of every deployment; returns how many."""
    n = 0
    with _prefect_client(state) as client:
        for dep in client.read_deployments():
            for sched in dep.schedules:
                client.update_deployment_schedule(dep.id, sched.id, active=active)
                n += 1
    return n


def up(paused_schedules: bool = False, deploy_flows: bool = True) -> dict[str, Any]:
    """Start whatever part of the stack is not running, then deploy. Idempotent."""
    STACK.mkdir(parents=True, exist_ok=True)
    with file_lock(STATE / "stack.lock"):
        state = load()
        services = state.get("services", {})
        for key, name in (("prefect_port", "prefect-server"), ("mlflow_port", "mlflow-server")):
            if not alive(services.get(name)) and not (state.get(key) and _port_free(state[key])):
                state[key] = free_port()
        state.update(
            prefect_api_url=f"http://{HOST}:{state['prefect_port']}/api",
            prefect_ui_url=f"http://{HOST}:{state['prefect_port']}",
            mlflow_url=f"http://{HOST}:{state['mlflow_port']}")
        if not alive(services.get("prefect-server")):
            state["prefect_db"] = os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL") or \
                f"sqlite+aiosqlite:///{ROOT / '.prefect' / 'server.db'}"
        if not alive(services.get("mlflow-server")):
            state["mlflow_backend"] = os.environ.get("FORGELINE_MLFLOW_BACKEND_STORE_URI") or \
                f"sqlite:///{ROOT / 'mlflow.db'}"
            state["mlflow_artifacts"] = os.environ.get("FORGELINE_MLFLOW_ARTIFACTS_DESTINATION") or \
                str(ROOT / "mlartifacts")
        state["services"] = services
        urls = (state.get("worker_env_urls") or [None, None])
        if alive(services.get("worker")) and urls != [state["prefect_api_url"], state["mlflow_url"]]:
            stop_process(services.pop("worker"))  # its environment names the old URLs
        try:
            for name, start in (("prefect-server", _start_prefect), ("mlflow-server", _start_mlflow)):
                if not alive(services.get(name)):
                    services[name] = start(state)
                    _save(state)
            ensure_pool(state)
            ensure_zombie_automation(state)
            if deploy_flows:
                deploy(state)
                if paused_schedules:
                    set_schedules(state, active=False)
            if not alive(services.get("worker")):
                services["worker"] = _start_worker(state)
                state["worker_env_urls"] = [state["prefect_api_url"], state["mlflow_url"]]
        finally:
            _save(state)
        return state


def _cancel_runs(state: dict[str, Any], timeout_s: float = 30.0) -> list[str]:
    """Ask the worker to cancel in-flight flow runs (it kills their processes); wait a while."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelling

    busy = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
        any_=[StateType.RUNNING, StateType.PENDING])))
    with _prefect_client(state) as client:
        runs = client.read_flow_runs(flow_run_filter=busy)
        for run in runs:
            client.set_flow_run_state(run.id, Cancelling(message="forgeline down"), force=True)
        deadline = time.monotonic() + timeout_s
        while runs and time.monotonic() < deadline and client.read_flow_runs(flow_run_filter=busy):
            time.sleep(1)
    return [r.name for r in runs]


def down() -> list[str]:
    """Stop the services `up` started (their process groups and descendants); keep stores and logs."""
    with file_lock(STATE / "stack.lock"):
        state = load()
        services = state.get("services", {})
        if alive(services.get("worker")) and alive(services.get("prefect-server")):
            try:
                _cancel_runs(state)
            except Exception as e:  # the API may be unhealthy: the processes are stopped anyway
                print(f"down: could not cancel in-flight runs: {e}", file=sys.stderr)
        stopped = [name for name in reversed(SERVICES) if name in services and stop_process(services[name])]
        state["services"] = {}
        if state:
            _save(state)
        return stopped


def status() -> dict[str, Any]:
    """What runs where: services (pid, url, health), the pool, deployments, recent flow runs, models."""
    state = load()
    services = state.get("services", {})
    urls = {"prefect-server": state.get("prefect_ui_url"), "mlflow-server": state.get("mlflow_url"),
            "worker": f"pool {POOL}"}
    health = {"prefect-server": lambda: _get(state["prefect_api_url"] + "/health") == "true",
              "mlflow-server": lambda: _get(state["mlflow_url"] + "/health") == "OK", "worker": lambda: True}
    out: dict[str, Any] = {"root": str(ROOT), "services": {}}
    for name in SERVICES:
        rec = services.get(name)
        running = alive(rec)
        out["services"][name] = {"running": running, "pid": rec["pid"] if rec else None, "where": urls[name],
                                 "healthy": running and health[name](), "log": rec["log"] if rec else None}
    if state:
        out["stores"] = {"prefect_db": state.get("prefect_db"), "mlflow_backend": state.get("mlflow_backend"),
                         "mlflow_artifacts": state.get("mlflow_artifacts")}
    if out["services"]["prefect-server"]["healthy"]:
        with _prefect_client(state) as client:
            pool = client.read_work_pool(POOL) if any(p.name == POOL for p in client.read_work_pools()) else None
            out["pool"] = pool and {"name": pool.name, "type": pool.type, "concurrency_limit": pool.concurrency_limit,
                                    "workers": [w.name for w in client.read_workers_for_work_pool(POOL)
                                                if str(w.status).upper().endswith("ONLINE")]}
            flows = {f.id: f.name for f in client.read_flows()}
            deps = client.read_deployments()
            out["deployments"] = [{"name": f"{flows.get(d.flow_id, '?')}/{d.name}", "pool": d.work_pool_name,
                                   "schedules": [{"cron": getattr(s.schedule, "cron", None) or str(s.schedule),
                                                  "active": s.active} for s in d.schedules],
                                   "concurrency_limit": d.global_concurrency_limit and d.global_concurrency_limit.limit}
                                  for d in deps]
            names = {d.id: f"{flows.get(d.flow_id, '?')}/{d.name}" for d in deps}
            from prefect.client.schemas.sorting import FlowRunSort

            runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=5)
            out["flow_runs"] = [{"id": str(r.id), "name": r.name, "deployment": names.get(r.deployment_id),
                                 "state": r.state_name, "start": r.start_time and r.start_time.isoformat()}
                                for r in runs]
    if out["services"]["mlflow-server"]["healthy"]:
        from forgeline.registry import MODEL_NAME

        import mlflow

        client = mlflow.MlflowClient(state["mlflow_url"])
        versions = client.search_model_versions(f"name='{MODEL_NAME}'", max_results=5, order_by=["version_number DESC"])
        aliases = client.get_registered_model(MODEL_NAME).aliases if versions else {}
        out["models"] = [{"model": f"{v.name}/{v.version}", "run_id": v.run_id,
                          "aliases": [a for a, n in aliases.items() if str(n) == str(v.version)],
                          "flow_run": v.tags.get("prefect.flow_run_id")} for v in versions]
    return out


def format_status(st: dict[str, Any]) -> str:
    lines = [f"workspace {st['root']}"]
    for name, s in st["services"].items():
        state = ("up" if s["healthy"] else "starting/unhealthy") if s["running"] else "down"
        lines.append(f"  {name:<15} {state:<8} pid {s['pid'] or '-':<8} {s['where'] or ''}"
                     f"{'   log ' + s['log'] if s['log'] else ''}")
    if "stores" in st:
        lines.append("stores: " + ", ".join(f"{k}={v}" for k, v in st["stores"].items()))
    if st.get("pool"):
        p = st["pool"]
        lines.append(f"work pool {p['name']} ({p['type']}, concurrency {p['concurrency_limit']}), "
                     f"workers online: {', '.join(p['workers']) or 'none'}")
    for d in st.get("deployments", []):
        sched = ", ".join(f"{s['cron']}{'' if s['active'] else ' (paused)'}" for s in d["schedules"]) or "no schedule"
        lines.append(f"deployment {d['name']}: {sched}; concurrency {d['concurrency_limit']}")
    for r in st.get("flow_runs", []):
        lines.append(f"  flow run {r['name']} ({r['deployment'] or 'no deployment'}): {r['state']} {r['start'] or ''}")
    for m in st.get("models", []):
        lines.append(f"model {m['model']} {'@' + ','.join(m['aliases']) if m['aliases'] else ''} "
                     f"run {m['run_id']} flow run {m['flow_run']}")
    return "\n".join(lines)
