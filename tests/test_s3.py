"""S3 for real, against moto's S3-compatible server on 127.0.0.1: raw documents read from s3://,
the DVC remote on S3 (an interrupted push completed by the next one, a pull into a fresh clone
byte-identical), and lineage finding an object on the S3 remote when the cache lacks it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forgeline.stack import free_port
from tests.conftest import make_workspace, run_in, workspace_env

pytestmark = pytest.mark.slow

CREDS = {"AWS_ACCESS_KEY_ID": "forgeline-test", "AWS_SECRET_ACCESS_KEY": "forgeline-test",
         "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free loopback port; yields its endpoint URL."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**workspace_env(), **CREDS})
    url = f"http://127.0.0.1:{port}"
    try:
        boto = client(url)
        deadline = time.monotonic() + 60
        while True:
            try:
                boto.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.3)
        for bucket in ("raw", "dvc"):
            boto.create_bucket(Bucket=bucket)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def client(url: str):
    import boto3

    return boto3.client("s3", endpoint_url=url, **{k.lower(): v for k, v in CREDS.items() if k != "AWS_DEFAULT_REGION"},
                        region_name=CREDS["AWS_DEFAULT_REGION"])


def env() -> dict[str, str]:
    return {**workspace_env(), **CREDS}


def run(ws: Path, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *args] if args[0] == "-m" else list(args)
    proc = subprocess.run(cmd, cwd=ws, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ingest_reads_raw_documents_from_s3(s3, workspace):
    boto = client(s3)
    raw = workspace / "data" / "raw"
    files = sorted((raw / "sotu").glob("*.gz")) + [raw / "austen" / "persuasion.txt.gz"]
    for f in files:
        boto.upload_file(str(f), "raw", f"docs/{f.relative_to(raw)}")
    out = "data/ingest_s3"
    run(workspace, "-m", "tasks.ingest", "source=s3://raw/docs", f"out_dir={out}",
        f"storage_options={{endpoint_url: {s3}}}")
    import pandas as pd

    docs = pd.read_parquet(workspace / out / "documents.parquet")
    assert sorted(docs["source"]) == sorted(str(f.relative_to(raw)) for f in files)
    assert dict(zip(docs["source"], docs["sha256"])) == {str(f.relative_to(raw)): sha256(f) for f in files}
    assert json.loads((workspace / out / "summary.json").read_text())["quarantined"] == 0


@pytest.fixture(scope="module")
def tracked(s3, workspace):
    """A DVC-tracked folder of 120 files and an S3 default remote, committed."""
    blobs = workspace / "data" / "blobs"
    blobs.mkdir(parents=True)
    rng = __import__("random").Random(0)
    for i in range(120):
        (blobs / f"part-{i:03d}.bin").write_bytes(rng.randbytes(48_000 + i))
    run(workspace, "-m", "dvc", "remote", "add", "-d", "s3", "s3://dvc/store")
    run(workspace, "-m", "dvc", "remote", "modify", "s3", "endpointurl", s3)
    run(workspace, "-m", "dvc", "add", "data/blobs")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run(["git", "add", "data/blobs.dvc", "data/.gitignore", ".dvc/config"], cwd=workspace, check=True)
    subprocess.run(git + ["commit", "-qm", "blobs on s3"], cwd=workspace, check=True)
    return blobs


def remote_objects(s3: str) -> list[str]:
    pages = client(s3).get_paginator("list_objects_v2").paginate(Bucket="dvc", Prefix="store/")
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_interrupted_push_is_completed_by_the_next_push(s3, workspace, tracked):
    push = subprocess.Popen([sys.executable, "-m", "dvc", "push", "-j", "1", "data/blobs.dvc"], cwd=workspace, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(remote_objects(s3)) < 5 and push.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(push.pid, signal.SIGKILL)
    push.wait()
    partial = len(remote_objects(s3))
    assert 0 < partial < 121, f"push was not interrupted midway ({partial} objects)"
    assert "in sync" not in run(workspace, "-m", "dvc", "status", "--cloud", "data/blobs.dvc", check=False).stdout
    out = run(workspace, "-m", "dvc", "push", "data/blobs.dvc").stdout
    assert f"{121 - partial} file" in out or "pushed" in out, out
    assert len(remote_objects(s3)) == 121  # 120 files + the directory manifest
    assert "in sync" in run(workspace, "-m", "dvc", "status", "--cloud", "data/blobs.dvc").stdout


def test_pull_into_a_fresh_clone_gives_identical_bytes(s3, workspace, tracked, tmp_path):
    assert len(remote_objects(s3)) == 121
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(workspace), str(clone)], check=True)
    run(clone, "-m", "dvc", "pull", "data/blobs.dvc")
    want = {p.name: sha256(p) for p in tracked.iterdir()}
    got = {p.name: sha256(p) for p in (clone / "data" / "blobs").iterdir()}
    assert got == want


def test_lineage_finds_an_object_on_the_s3_remote(s3, workspace, tracked, monkeypatch):
    from forgeline.lineage import DvcObjects

    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    md5 = __import__("yaml").safe_load((workspace / "data" / "blobs.dvc").read_text())["outs"][0]["md5"]
    cached = workspace / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    aside = workspace / "manifest.aside"
    shutil.move(cached, aside)
    objects = DvcObjects(workspace)
    try:
        assert objects.where(md5) == "remote s3"
        assert len(objects.manifest(md5)) == 120  # read from S3
        assert objects.where("0" * 32) is None
    finally:
        objects.close()
        shutil.move(aside, cached)
