"""Benchmarks: each prints a markdown table and writes bench/results/<name>.json via `write_result`.

Every result records the machine state it was measured in (load average before and after, cores, the
commit and whether the tree was dirty), so a figure can be traced to the code and judged for noise.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent


def machine() -> dict:
    """Load average (1, 5, 15 min), cores and the commit the benchmark ran on."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count(),
            "commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_result(name: str, result: dict, started: dict | None = None) -> Path:
    """Write bench/results/<name>.json atomically, with `machine()` at the start (`started`) and at the end."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    tmp = out.with_suffix(".json.tmp")
    meta = {"machine_at_start": started, "machine_at_end": machine()} if started else {"machine": machine()}
    tmp.write_text(json.dumps({**result, **meta}, indent=2, default=str) + "\n")
    tmp.replace(out)
    return out
