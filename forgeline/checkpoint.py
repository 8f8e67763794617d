"""Atomic checkpoints: a run killed at any instant resumes from its newest complete one.

Layout of one checkpoint, `<root>/step_00000120/`:
    model.safetensors   weights (no pickle; tied tensors handled by safetensors' save_model)
    state.pt            optimizer, scheduler, RNG states (loaded with weights_only=True)
    meta.json           step, data position, config, anything JSON the loop wants back
    COMPLETE            written last: sizes of the files above

Everything is written into a temporary sibling, fsynced, renamed into place, then the parent
directory is fsynced. A folder without COMPLETE (or whose files don't match it) is never resumed.

A training stage keys its checkpoints by `checkpoint_key` (the settings that change the weights and
the bytes of its inputs), saves with `save_training_state` and resumes with `resume_training_state`.

The model folder (what a training stage writes to data/<stage>/ and the next stage or the registry
loads): config.json (the GPTConfig), model.safetensors, tokenizer.json; `save_model_folder` and
`load_model_folder` are its only writer and reader.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from models.gpt import GPT, GPTConfig

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


# ----------------------------------------------------------------------------- a training loop's state


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_key(settings: dict[str, Any], inputs: list[Path]) -> str:
    """12 hex digits naming a trajectory: the settings that change the weights and the bytes of the
    inputs. Runs with equal keys would follow the same path, so they share (and resume) checkpoints;
    changing e.g. lr or max_steps (the schedule) or an input starts afresh."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in inputs:
        h.update(file_sha256(path).encode())
    return h.hexdigest()[:12]


def save_training_state(root: Path, step: int, model: torch.nn.Module, optimizer, model_config, train_config,
                        history: dict, data_position: dict, keep: int) -> Path:
    """A checkpoint of everything a loop needs to go on bit for bit: weights, optimizer, every RNG,
    the data position and the history, with the model and train configs (dataclasses) for the record."""
    return save_checkpoint(root, step, model, {"optimizer": optimizer.state_dict(), "rng": rng_state()},
                           {"data_position": data_position, "history": history, "model_config": asdict(model_config),
                            "train_config": asdict(train_config)}, keep=keep)


def same_config(saved: dict[str, Any], config) -> bool:
    """Whether a checkpoint's recorded config (a dict) is `config` (a dataclass); a field added to the
    dataclass after the checkpoint was written (e.g. GPTConfig.pos_2d) counts as its default."""
    defaults = {f.name: f.default for f in fields(config) if f.default is not MISSING}
    return {**defaults, **saved} == asdict(config)


def resume_training_state(root: Path, model: torch.nn.Module, optimizer, model_config=None,
                          stage: str = "", verbose: bool = True) -> dict[str, Any] | None:
    """Restore the newest complete checkpoint under `root` into model, optimizer and every RNG; return
    its meta (step, history, data position), or None when there is none. A checkpoint of another model
    config (`model_config`, a dataclass) is an error, not a silent fresh start."""
    ckpt = latest_checkpoint(root)
    if ckpt is None:
        return None
    meta = json.loads((ckpt / "meta.json").read_text())
    if model_config is not None and not same_config(meta["model_config"], model_config):
        raise ValueError(f"{ckpt} holds another model config; move it away or set ckpt_dir")
    state, meta = load_checkpoint(ckpt, model)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    if verbose:
        print(f"{stage}: resumed from {ckpt} at step {meta['step']}", flush=True)
    return meta


# ----------------------------------------------------------------------------- the model folder


def save_model_folder(out: str | Path, model: torch.nn.Module, config: GPTConfig, tokenizer_file: str | Path) -> Path:
    """Write `model` (a GPT, or a module holding one such as RewardModel) with its GPTConfig and tokenizer."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2))
    shutil.copy2(tokenizer_file, out / "tokenizer.json")
    return out


def load_model_folder(path: str | Path, cls: type = GPT, device: str = "cpu", config_cls: type = GPTConfig,
                      weights: str = "model.safetensors"):
    """A model folder (config.json of `config_cls` + safetensors `weights`) back into `cls(config)`, in eval mode,
    without pickle: a GPT or RewardModel by default, any model of models/ with its config dataclass otherwise."""
    path = Path(path)
    model = cls(config_cls(**json.loads((path / "config.json").read_text())))
    load_model(model, str(path / weights), device=device)
    return model.eval()
