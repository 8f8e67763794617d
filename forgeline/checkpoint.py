"""Atomic checkpoints: a run killed at any instant resumes from its newest complete one.

Layout of one checkpoint, `<root>/step_00000120/`:
    model.safetensors   weights (no pickle; tied tensors handled by safetensors' save_model)
    state.pt            optimizer, scheduler, RNG states (loaded with weights_only=True)
    meta.json           step, data position, config, anything JSON the loop wants back
    COMPLETE            written last: sizes of the files above

Everything is written into a temporary sibling, fsynced, renamed into place, then the parent
directory is fsynced. A folder without COMPLETE (or whose files don't match it) is never resumed.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

MARKER = "COMPLETE"
FILES = ("model.safetensors", "state.pt", "meta.json")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """Every RNG a training loop draws from, as tensors and plain containers (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                    meta: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` atomically; keep the newest `keep` complete ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2, default=str))
    for name in FILES:
        _fsync(tmp / name)
    (tmp / MARKER).write_text(json.dumps({name: (tmp / name).stat().st_size for name in FILES}))
    _fsync(tmp / MARKER)
    _fsync(tmp)
    if final.exists():  # a re-save of the same step (e.g. after resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_complete(path: Path) -> bool:
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        sizes = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return all((path / n).is_file() and (path / n).stat().st_size == s for n, s in sizes.items())


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into `model`; return (state, meta) for the loop to restore."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no valid {MARKER} marker)")
    load_model(model, str(path / "model.safetensors"))
    state = torch.load(path / "state.pt", weights_only=True)
    meta = json.loads((path / "meta.json").read_text())
    return state, meta
