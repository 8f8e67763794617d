"""The Prefect API a pipeline run started from the command line talks to: the server PREFECT_API_URL
names (`forgeline up`), else a temporary one of its own, started before anything else.

Prefect's ephemeral mode starts the same temporary server (uvicorn serving prefect.server's app on
127.0.0.1, its sqlite under PREFECT_HOME, no UI, no background services) only when the flow first
calls the API, and imports the whole server package into the calling process first, though the
server runs in a child (~4 s on 2 cores). Started here, the child imports and migrates its database
on one core while this process does its own start-up work on the other.

    api = TemporaryAPI.start_unless_configured()   # returns at once; the same one if already started
    ...                                            # other start-up work
    with api.ready():                              # waits for /health (the server stops at exit)
        run_the_flow()
"""
from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TemporaryAPI:
    _started: TemporaryAPI | None = None  # one per process: a flow module may start it before flow_main asks

    def __init__(self, proc: subprocess.Popen | None, url: str):
        self.proc, self.url = proc, url

    @classmethod
    def start_unless_configured(cls) -> TemporaryAPI:
        if cls._started is None or (cls._started.proc is not None and cls._started.proc.poll() is not None):
            cls._started = cls._start()
        return cls._started

    @classmethod
    def _start(cls) -> TemporaryAPI:
        import prefect
        from prefect.settings import PREFECT_API_URL, get_current_settings

        if PREFECT_API_URL.value():
            return cls(None, PREFECT_API_URL.value())
        port = _free_port()
        # the command and environment Prefect's SubprocessASGIServer uses for its ephemeral server
        env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
               "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"], env=env)
        api = cls(proc, f"http://127.0.0.1:{port}/api")
        # stopped at exit, as Prefect stops its own: the log and event workers Prefect starts later
        # register their final flush later, so it runs first (atexit is last in, first out)
        atexit.register(api.stop)
        return api

    @contextlib.contextmanager
    def ready(self) -> Iterator[str]:
        """Wait until the server answers /health, then point Prefect at it."""
        if self.proc is None:
            yield self.url
            return
        import httpx
        from prefect.settings import (PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
                                      temporary_settings)

        timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        deadline = time.monotonic() + timeout
        with httpx.Client() as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the temporary Prefect server exited with code {self.proc.returncode}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the temporary Prefect server did not answer within {timeout} s")
                time.sleep(0.05)
        with temporary_settings({PREFECT_API_URL: self.url}):
            yield self.url

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
