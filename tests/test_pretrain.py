"""Pretraining: exact resume, divergence stops cleanly, incomplete checkpoints skipped, DDP == 1 process."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import models.gpt
from forgeline.checkpoint import MARKER, complete_checkpoints, latest_checkpoint
from forgeline.schedule import warmup_cosine
from tasks.pretrain import NonFiniteLoss, PretrainConfig, get_batch, pretrain

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "raw" / "austen" / "persuasion.txt.gz"  # the shipped sample (data/README.md)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Byte-level shards (vocab 256) of real prose, in the tokenizer stage's format."""
    d = tmp_path_factory.mktemp("tok")
    text = gzip.open(CORPUS, "rt", encoding="utf-8").read()[:200_000].encode()
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    ids[: len(ids) * 9 // 10].tofile(d / "train.bin")
    ids[len(ids) * 9 // 10:].tofile(d / "val.bin")
    (d / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 256}))
    (d / "tokenizer.json").write_text("{}")
    return d


def tiny_cfg(shards: Path, tmp: Path, **kw) -> PretrainConfig:
    base = dict(tokenizer_dir=str(shards), out_dir=str(tmp / "out"), ckpt_dir=str(tmp / "ckpt"),
                block_size=32, batch_size=4, max_steps=8, warmup_steps=2, lr=3e-3, min_lr=3e-4,
                eval_interval=4, eval_batches=2, ckpt_interval=3, log_interval=1, keep_checkpoints=5)
    base.update(kw)
    return PretrainConfig(**base)


def test_lr_schedule_warms_up_then_decays_to_min():
    def lr_at(step: int) -> float:     # the arguments every training stage passes (lr 1, floor 0.1)
        return warmup_cosine(step, max_steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)

    assert lr_at(0) == pytest.approx(0.1) and lr_at(9) == pytest.approx(1.0)
    assert lr_at(60) == pytest.approx(0.55)                          # half way: the mean of lr and floor
    assert lr_at(110) == pytest.approx(0.1) and lr_at(500) == pytest.approx(0.1)   # held at the floor


def test_global_batch_is_split_across_ranks(shards):
    data = np.memmap(shards / "train.bin", dtype=np.uint16, mode="r")
    x1, _ = get_batch(data, 16, 8, 1, 5, 0, rank=0, world=1)
    a, _ = get_batch(data, 16, 4, 1, 5, 0, rank=0, world=2)
    b, _ = get_batch(data, 16, 4, 1, 5, 0, rank=1, world=2)
    assert torch.equal(torch.cat([a, b]), x1)


def test_loss_falls(shards, tmp_path):
    summary = pretrain(tiny_cfg(shards, tmp_path, max_steps=40, eval_interval=40, ckpt_interval=40))
    hist = json.loads((tmp_path / "out" / "history.json").read_text())["train"]
    assert hist[-1][1] < hist[0][1] - 1.0  # from ~ln(256)=5.5 nats down by more than a nat
    assert summary["val_loss"] < 4.5
    assert (tmp_path / "out" / "loss_curve.png").stat().st_size > 1000


def test_exact_resume_after_crash(shards, tmp_path):
    full = tiny_cfg(shards, tmp_path / "full")
    pretrain(full)

    crashed = tiny_cfg(shards, tmp_path / "crash")

    def crash(step, metrics):
        if step == 5:  # after the step-3 checkpoint, mid-run
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(crashed, log=crash)
    assert latest_checkpoint(crashed.checkpoint_root()).name == "step_00000003"
    pretrain(crashed)  # resumes from step 3, runs to 8

    a = load_file(Path(full.out_dir) / "model.safetensors")
    b = load_file(Path(crashed.out_dir) / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise on CPU
    ha = json.loads((Path(full.out_dir) / "history.json").read_text())
    hb = json.loads((Path(crashed.out_dir) / "history.json").read_text())
    assert ha == hb


def test_checkpoint_without_marker_is_skipped(shards, tmp_path, capsys):
    cfg = tiny_cfg(shards, tmp_path, max_steps=6)
    pretrain(cfg)
    root = cfg.checkpoint_root()
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000003", "step_00000006"]
    (root / "step_00000006" / MARKER).unlink()
    assert latest_checkpoint(root).name == "step_00000003"
    # a torn write (marker present, file truncated) is not complete either
    shutil.copytree(root / "step_00000003", root / "step_00000005")
    with open(root / "step_00000005" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    assert latest_checkpoint(root).name == "step_00000003"
    capsys.readouterr()
    summary = pretrain(cfg)
    assert "resumed from" in capsys.readouterr().out and summary["steps"] == 6
    assert [p.name for p in complete_checkpoints(root)][-1] == "step_00000006"


def test_changed_settings_start_fresh_instead_of_resuming(shards, tmp_path):
    cfg = tiny_cfg(shards, tmp_path, max_steps=3)
    assert cfg.checkpoint_root() != replace(cfg, lr=1e-2).checkpoint_root()
    assert cfg.checkpoint_root() != replace(cfg, max_steps=9).checkpoint_root()
    assert cfg.checkpoint_root() == replace(cfg, log_interval=5, out_dir="elsewhere").checkpoint_root()


def test_non_finite_loss_stops_and_keeps_last_checkpoint(shards, tmp_path, monkeypatch):
    cfg = tiny_cfg(shards, tmp_path, max_steps=8)
    real_forward = models.gpt.GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] == 5:  # the 5th training step (step index 4) diverges
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(models.gpt.GPT, "forward", poisoned)
    with pytest.raises(NonFiniteLoss, match="at step 4") as err:
        pretrain(cfg)
    assert "step_00000003" in str(err.value)
    root = cfg.checkpoint_root()
    assert latest_checkpoint(root).name == "step_00000003"
    assert [p.name for p in root.iterdir()] == ["step_00000003"]  # nothing half-written beside it
    assert not Path(cfg.out_dir, "model.safetensors").exists()


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(shards, tmp_path):
    """2 gloo processes with batch 4 each == 1 process with batch 8 (same global batch)."""
    def run(launch: str, batch: int, out: Path) -> dict:
        args = [f"tokenizer_dir={shards}", f"out_dir={out}", f"ckpt_dir={out}/ckpt", f"launch={launch}",
                "block_size=32", f"batch_size={batch}", "max_steps=6", "warmup_steps=2",
                "eval_interval=100", "ckpt_interval=100", "log_interval=1"]
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
        env.pop("FORGELINE_RUN_ID", None)
        proc = subprocess.run([sys.executable, "-m", "forgeline.launch", "tasks.pretrain", *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads((out / "summary.json").read_text())

    s1 = run("cpu", 8, tmp_path / "one")
    s2 = run("ddp_cpu", 4, tmp_path / "two")
    assert (s1["processes"], s2["processes"]) == (1, 2)
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    ha = json.loads((tmp_path / "one" / "history.json").read_text())["train"]
    hb = json.loads((tmp_path / "two" / "history.json").read_text())["train"]
    np.testing.assert_allclose([l for _, l in ha], [l for _, l in hb], rtol=1e-5)
