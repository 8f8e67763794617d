"""Lineage: git commit and the DVC digests of each stage's inputs and outputs (from dvc.lock)."""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import yaml

from forgeline.paths import ROOT


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD commit, suffixed `-dirty` when tracked files differ from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return sha + ("-dirty" if dirty else "")


def read_lock(root: Path = ROOT) -> dict[str, Any]:
    """dvc.lock's stages: {stage: {'cmd', 'deps': [...], 'outs': [...], 'params': {...}}}."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return {}
    return (yaml.load(lock.read_text(), Loader=yaml.CSafeLoader) or {}).get("stages", {})


def lock_entry(stage: str, root: Path = ROOT) -> dict[str, Any]:
    return read_lock(root).get(stage, {})


def digests(stage: str, root: Path = ROOT) -> dict[str, dict[str, str]]:
    """{'deps': {path: md5}, 'outs': {path: md5}} for a stage, as DVC recorded them."""
    entry = lock_entry(stage, root)
    return {kind: {item["path"]: item.get("md5", "") for item in entry.get(kind, [])}
            for kind in ("deps", "outs")}
