"""The scale-out profile (docs/scale-out.md), what of it runs here: `forgeline up` with Prefect and
MLflow on PostgreSQL (the Debian package, a throw-away cluster on 127.0.0.1) and MLflow artifacts
on S3 (moto), then `forgeline down` stops exactly what `up` started; and the deploy/ files for
Kubernetes, Docker and multi-node Accelerate parse and agree with prefect.yaml.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from forgeline.stack import descendants, free_port
from tests.conftest import make_workspace, workspace_env
from tests.test_s3 import CREDS, client, s3  # noqa: F401  (s3: the moto server fixture)

ROOT = Path(__file__).resolve().parents[1]

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1:] or [None]
PG_BIN = PG_BIN[0]


def as_db_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its server tools as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster on a free loopback port with databases `prefect` and `mlflow`."""
    if PG_BIN is None:
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (scripts/install.sh does)")
    base = Path(tempfile.mkdtemp(prefix="forgeline-pg-"))
    base.chmod(0o755)
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    port = free_port()
    subprocess.run(as_db_user([f"{PG_BIN}/initdb", "-D", str(data), "-U", "forgeline", "--auth=trust", "-E", "UTF8"]),
                   check=True, capture_output=True)
    server = subprocess.Popen(as_db_user([f"{PG_BIN}/postgres", "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
                                          "-k", str(sock)]),
                              stdout=open(base / "postgres.log", "wb"), stderr=subprocess.STDOUT)
    psql = ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "forgeline", "-v", "ON_ERROR_STOP=1", "-tA"]
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([f"{PG_BIN}/pg_isready", "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and server.poll() is None, (base / "postgres.log").read_text()
            time.sleep(0.3)
        for db in ("prefect", "mlflow"):
            subprocess.run(psql + ["-d", "postgres", "-c", f"CREATE DATABASE {db}"], check=True, capture_output=True)
        yield {"url": f"127.0.0.1:{port}", "psql": psql}
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_stack(postgres, s3, tmp_path_factory):  # noqa: F811
    ws = make_workspace(tmp_path_factory.mktemp("pgws"))
    client(s3).create_bucket(Bucket="mlflow")
    env = {**workspace_env(), **CREDS, "MLFLOW_S3_ENDPOINT_URL": s3,
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://forgeline@{postgres['url']}/prefect",
           "FORGELINE_MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg2://forgeline@{postgres['url']}/mlflow",
           "FORGELINE_MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow/artifacts"}
    t0 = time.perf_counter()
    try:
        up = subprocess.run([sys.executable, "-m", "forgeline", "up", "--paused-schedules"], cwd=ws, env=env,
                            capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        print(f"forgeline up on PostgreSQL: {time.perf_counter() - t0:.0f}s")
        yield ws, env, json.loads((ws / ".forgeline" / "stack" / "stack.json").read_text())
    finally:  # also after a failed `up`: whatever it started
        subprocess.run([sys.executable, "-m", "forgeline", "down"], cwd=ws, env=env, capture_output=True, timeout=120)


@pytest.mark.slow
def test_prefect_and_mlflow_on_postgres_with_artifacts_on_s3(pg_stack, postgres, s3):  # noqa: F811
    ws, env, state = pg_stack
    assert state["prefect_db"].startswith("postgresql+asyncpg://") and state["mlflow_backend"].startswith("postgresql+psycopg2://")
    # Prefect's deployment lives in PostgreSQL
    rows = subprocess.run(postgres["psql"] + ["-d", "prefect", "-c", "SELECT name FROM deployment"],
                          capture_output=True, text=True, check=True).stdout.split()
    import yaml

    local = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert sorted(rows) == sorted(d["name"] for d in local)   # one `nightly` per pipeline
    # MLflow: runs and registered models in PostgreSQL, artifacts proxied by the server into S3
    import mlflow

    probe = subprocess.run([sys.executable, "-c", f"""
import mlflow, pathlib
mlflow.set_tracking_uri({state['mlflow_url']!r})
mlflow.set_experiment("pg-probe")
pathlib.Path("probe.txt").write_text("on s3")
with mlflow.start_run() as run:
    mlflow.log_artifact("probe.txt", "model")
client = mlflow.MlflowClient()
client.create_registered_model("pg-probe")
client.create_model_version("pg-probe", f"runs:/{{run.info.run_id}}/model", run_id=run.info.run_id)
print(run.info.run_id)
"""], cwd=ws, env={k: v for k, v in env.items() if not k.startswith("AWS_") and k != "MLFLOW_S3_ENDPOINT_URL"},
        capture_output=True, text=True, timeout=300)  # the client has no S3 credentials: the server writes
    assert probe.returncode == 0, probe.stderr[-3000:]
    run_id = probe.stdout.split()[-1]
    keys = [o["Key"] for o in client(s3).list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(k.endswith(f"{run_id}/artifacts/model/probe.txt") for k in keys), keys
    count = subprocess.run(postgres["psql"] + ["-d", "mlflow", "-c",
                                             f"SELECT count(*) FROM runs WHERE run_uuid = '{run_id}'"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert count == "1"
    assert mlflow.MlflowClient(state["mlflow_url"]).search_model_versions("name='pg-probe'")


@pytest.mark.slow
def test_down_stops_exactly_what_up_started(pg_stack):
    ws, env, state = pg_stack
    services = state["services"]
    tree = {name: [rec["pid"], *descendants(rec["pid"])] for name, rec in services.items()}
    ports = [state["prefect_port"], state["mlflow_port"]]
    out = subprocess.run([sys.executable, "-m", "forgeline", "down"], cwd=ws, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "worker, mlflow-server, prefect-server" in out.stdout, out.stdout + out.stderr

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
        except OSError:
            return True
    assert all(gone(p) for pids in tree.values() for p in pids), tree
    for port in ports:  # nothing listens any more
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    status = json.loads(subprocess.run([sys.executable, "-m", "forgeline", "status", "--json"], cwd=ws, env=env,
                                       capture_output=True, text=True, check=True).stdout)
    assert not any(s["running"] for s in status["services"].values())


def test_scale_out_files_are_consistent():
    import re

    import yaml

    import importlib
    import typing

    from forgeline.pipelines import pipelines

    local = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    k8s = yaml.safe_load((ROOT / "deploy/k8s/prefect.yaml").read_text())["deployments"]
    # one local deployment per pipeline; the GPU deployment is the LLM flow's
    assert sorted(d["entrypoint"] for d in local) == sorted(f"flows/{p}.py:{p}" for p in pipelines())
    assert {d["entrypoint"] for d in k8s} == {"flows/llm.py:llm"}
    for d in local + k8s:  # the deployments' parameters are valid parameters of their flow
        path, name = d["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        params_cls = typing.get_type_hints(flow.fn)["params"]
        params = params_cls.model_validate(d["parameters"]["params"])
        if hasattr(params, "pretrain"):
            launch = params.pretrain.launch or "cpu"
            assert (ROOT / "configs" / "accelerate" / f"{launch}.yaml").exists(), launch
        assert d["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
        assert len(d["schedules"]) == 1
    # one nightly slot per pipeline (they share the workspace's one run at a time); the GPU LLM as the local one
    crons = {d["entrypoint"]: d["schedules"][0]["cron"] for d in local}
    assert len(set(crons.values())) == len(local)
    assert all(d["schedules"][0]["cron"] == crons[d["entrypoint"]] for d in k8s)
    for name in ("deploy/k8s/base-job-template.json", "deploy/compose/docker-job-template.json"):
        template = json.loads((ROOT / name).read_text())
        used = set(re.findall(r"{{ (\w+) }}", json.dumps(template["job_configuration"])))
        assert used <= set(template["variables"]["properties"]), (name, used - set(template["variables"]["properties"]))
    acc = yaml.safe_load((ROOT / "deploy/accelerate/multi_node.yaml").read_text())
    assert acc["num_machines"] > 1 and acc["num_processes"] % acc["num_machines"] == 0
    jobs = list(yaml.safe_load_all((ROOT / "deploy/k8s/multi-node-job.yaml").read_text()))
    (job,) = [j for j in jobs if j["kind"] == "Job"]
    assert job["spec"]["completions"] == acc["num_machines"]
    compose = yaml.safe_load((ROOT / "deploy/compose/docker-compose.yaml").read_text())["services"]
    assert {"postgres", "prefect-server", "mlflow-server", "worker"} <= set(compose)
    assert all(p.startswith("127.0.0.1:") for svc in compose.values() for p in svc.get("ports", []))
