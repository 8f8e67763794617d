"""serve/: the one FastAPI app every pipeline's endpoints mount into."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from fastapi import APIRouter
from fastapi.testclient import TestClient

from serve.app import ROUTERS, create_app
from tests.conftest import ROOT, workspace_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_forgeline_serve_answers_health_on_loopback():
    """`forgeline serve` for real: uvicorn on 127.0.0.1, a free port, GET /health, stopped by its PID."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "forgeline", "serve", "--port", str(port)], cwd=ROOT,
                            env={**workspace_env(), "NO_PROXY": "127.0.0.1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, body = time.monotonic() + 60, None
        while body is None and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    body = json.loads(resp.read())
            except OSError:
                time.sleep(0.2)
        assert body == {"status": "ok", "pipelines": [name for name, _ in ROUTERS]}
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # forgeline serve exec'd uvicorn: the same PID
        proc.wait(timeout=30)
    assert f"Uvicorn running on http://127.0.0.1:{port}" in proc.stdout.read()


def toy_router(path: str) -> APIRouter:
    router = APIRouter()

    @router.get(path)
    def echo(text: str) -> dict[str, str]:
        return {"text": text}

    return router


def test_a_listed_router_is_mounted_with_its_own_paths():
    client = TestClient(create_app([("toy", toy_router("/v1/echo"))]))
    assert client.get("/v1/echo", params={"text": "hi"}).json() == {"text": "hi"}
    assert client.get("/health").json() == {"status": "ok", "pipelines": ["toy"]}
    # nothing is mounted that is not listed
    assert TestClient(create_app([])).get("/v1/echo", params={"text": "hi"}).status_code == 404


def test_two_pipelines_cannot_claim_one_path():
    with pytest.raises(ValueError, match="GET /v1/echo of pipeline 'b' is already served by 'a'"):
        create_app([("a", toy_router("/v1/echo")), ("b", toy_router("/v1/echo"))])
    with pytest.raises(ValueError, match="already served by 'app'"):
        create_app([("a", toy_router("/health"))])
