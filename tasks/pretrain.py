"""Pretrain: next-token prediction of models/gpt.py on the tokenizer stage's shards.

One linear loop (nanoGPT's shape): learning rate, eval and checkpoint, micro-steps, clip and
step, log. Launched by Accelerate: one CPU process by default, DDP on CPU or GPUs, FSDP on GPUs.
Batches are a pure function of (seed, step, micro-step), so a resumed run sees exactly the data
an uninterrupted run would have seen, and N processes see the same global batch as one.

    python -m forgeline.launch tasks.pretrain [key=value ...]      # launch: in configs/pretrain.yaml
    accelerate launch --config_file configs/accelerate/ddp_cpu.yaml -m tasks.pretrain max_steps=50
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from prefect import task

from forgeline.checkpoint import (checkpoint_key, latest_checkpoint, resume_training_state, save_model_folder,
                                  save_training_state)
from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.schedule import warmup_cosine
from forgeline.workspace import run_stage
from models.gpt import GPT, PRESETS, GPTConfig


@dataclass
class PretrainConfig:
    tokenizer_dir: str = "data/tokenizer"   # tokenizer.json, train.bin, val.bin, meta.json
    out_dir: str = "data/pretrain"          # final model: model.safetensors, config.json, tokenizer.json
    ckpt_dir: str = "checkpoints/pretrain"  # resumable state; outside DVC outs so a rerun keeps it
    launch: str = "cpu"                     # configs/accelerate/<launch>.yaml (read by forgeline.launch)
    # model: a preset plus the architecture switches
    preset: str = "tiny"
    block_size: int = 128                   # training context, tokens
    pos_encoding: Literal["rope", "sincos", "learned"] = "rope"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    mlp: Literal["relu", "gelu", "swiglu"] = "swiglu"
    n_kv_heads: int | None = None
    dropout: float = 0.0
    # optimisation
    batch_size: int = 16                    # sequences per micro-step per process
    grad_accum: int = 1                     # micro-steps per optimizer step
    max_steps: int = 300
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0                  # max global grad norm; 0 = off
    mixed_precision: Literal["no", "bf16"] = "no"
    gradient_checkpointing: bool = False
    # bookkeeping
    eval_interval: int = 50                 # steps between validation losses
    eval_batches: int = 8
    ckpt_interval: int = 50                 # steps between checkpoints
    keep_checkpoints: int = 2
    log_interval: int = 10
    # MFU's denominator: the best matmul FLOP/s one process reaches in the training dtype (bench.bench_gpt
    # measures it); 0 = a 0.5 s probe at start, which reads low when the machine is busy (MFU then high)
    peak_flops: float = 0.0
    seed: int = 1337

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"pretrain: preset={self.preset!r}; known: {sorted(PRESETS)}")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "ckpt_interval",
                     "log_interval", "block_size", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"pretrain: {name} must be >= 1")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("pretrain: need 0 <= min_lr <= lr")

    def checkpoint_root(self) -> Path:
        """ckpt_dir/<key>: runs that would follow the same trajectory share (and resume) checkpoints.

        The key hashes every setting that changes the weights, and the shards' meta.json; changing
        e.g. lr or max_steps (the cosine schedule) or re-tokenizing starts a fresh run instead of
        resuming one that took another path.
        """
        skip = {"out_dir", "ckpt_dir", "launch", "log_interval", "keep_checkpoints", "peak_flops"}
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        return Path(self.ckpt_dir) / checkpoint_key(settings, [Path(self.tokenizer_dir) / "meta.json"])

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig.from_preset(self.preset, vocab_size=vocab_size, block_size=self.block_size,
                                     pos_encoding=self.pos_encoding, norm=self.norm, mlp=self.mlp,
                                     n_kv_heads=self.n_kv_heads, dropout=self.dropout)


class NonFiniteLoss(RuntimeError):
    """Training diverged; the last complete checkpoint is left as it was."""


def load_shards(tokenizer_dir: str) -> tuple[np.memmap, np.memmap, dict]:
    meta = json.loads((Path(tokenizer_dir) / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(Path(tokenizer_dir) / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(Path(tokenizer_dir) / "val.bin", dtype=dtype, mode="r")
    return train, val, meta


def get_batch(data: np.memmap, block_size: int, batch_size: int, seed: int, step: int, micro: int,
              rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of the global batch for (step, micro): (B, T) inputs and targets.

    The global batch (world * batch_size windows) is drawn from a generator seeded by
    (seed, step, micro) alone: resuming, or changing the process count, sees the same windows.
    """
    if len(data) <= block_size + 1:
        raise ValueError(f"shard of {len(data)} tokens is shorter than block_size+1={block_size + 1}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + micro)
    starts = torch.randint(len(data) - block_size - 1, (world * batch_size,), generator=g)
    starts = starts[rank * batch_size:(rank + 1) * batch_size].tolist()
    x = torch.from_numpy(np.stack([data[s:s + block_size] for s in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[s + 1:s + 1 + block_size] for s in starts]).astype(np.int64))
    return x, y


@torch.no_grad()
def estimate_loss(model, data, cfg: PretrainConfig, accelerator, seed_offset: int = 7) -> float:
    """Mean loss over a fixed set of validation windows (the same ones at every eval)."""
    model.eval()
    losses = []
    for i in range(cfg.eval_batches):
        x, y = get_batch(data, cfg.block_size, cfg.batch_size, cfg.seed + seed_offset, 0, i,
                         accelerator.process_index, accelerator.num_processes)
        with accelerator.autocast():
            _, loss = model(x.to(accelerator.device), y.to(accelerator.device))
        losses.append(loss.float())
    model.train()
    local = torch.stack(losses).mean()
    return accelerator.reduce(local, reduction="mean").item()


def pretrain(cfg: PretrainConfig, log=None) -> dict:
    """Train (or resume) to cfg.max_steps; write the final model to cfg.out_dir; return a summary.

    `log(step, metrics)` receives the logged metrics (the CLI sends them to MLflow).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from forgeline.launch import matmul_peak_flops

    # on a machine without CUDA the multi-GPU launcher still starts N processes: cpu=True makes them gloo DDP
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    train_data, val_data, meta = load_shards(cfg.tokenizer_dir)
    model_cfg = cfg.model_config(meta["vocab_size"])
    model = GPT(model_cfg)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2))

    # ---- resume from the newest complete checkpoint, if any
    step, history = 0, {"train": [], "val": []}
    ckpt_root = cfg.checkpoint_root()
    ckpt_meta = resume_training_state(ckpt_root, model, optimizer, model_cfg, stage="pretrain", verbose=main)
    if ckpt_meta is not None:
        step, history = ckpt_meta["step"], ckpt_meta["history"]
    resumed_at = step if ckpt_meta is not None else -1
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    peak = cfg.peak_flops or matmul_peak_flops(torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32)
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    t_start, t_last, last_step = time.perf_counter(), time.perf_counter(), step
    while step < cfg.max_steps:
        # ---- learning rate
        lr = warmup_cosine(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # ---- eval and checkpoint (state *before* this step's update; done already if we resumed here)
        if step > 0 and step != resumed_at and step % cfg.eval_interval == 0:
            history["val"].append([step, estimate_loss(model, val_data, cfg, accelerator)])
        if step > 0 and step != resumed_at and step % cfg.ckpt_interval == 0:
            save(ckpt_root, cfg, accelerator, raw_model, optimizer, step, history, model_cfg)

        # ---- micro-steps: accumulate gradients, sync only on the last one
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            x, y = get_batch(train_data, cfg.block_size, cfg.batch_size, cfg.seed, step, micro, rank, world)
            x, y = x.to(accelerator.device), y.to(accelerator.device)
            sync = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                with accelerator.autocast():
                    _, loss = model(x, y)
                accelerator.backward(loss / cfg.grad_accum)
            loss_sum += loss.detach().float()

        # ---- clip and step; a non-finite loss or gradient stops before the update
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        loss_value = accelerator.reduce(loss_sum / cfg.grad_accum, reduction="mean").item()
        if not (math.isfinite(loss_value) and math.isfinite(float(grad_norm))):
            last = latest_checkpoint(ckpt_root)
            raise NonFiniteLoss(f"non-finite loss ({loss_value}) or grad norm ({float(grad_norm)}) at step {step}; "
                                f"stopped before the update. Last good checkpoint: {last or 'none'}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history["train"].append([step, loss_value])

        # ---- log
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            dt = (now - t_last) / max(1, step - last_step)
            t_last, last_step = now, step
            tok_s = tokens_per_step / dt
            mfu = raw_model.estimate_mfu(cfg.batch_size * cfg.grad_accum, dt, peak)
            eta = dt * (cfg.max_steps - step)
            if main:
                print(f"step {step:>5}/{cfg.max_steps} loss {loss_value:.4f} lr {lr:.2e} "
                      f"{tok_s:,.0f} tok/s mfu {mfu * 100:.1f}% eta {eta:.0f}s", flush=True)
                if log:
                    log(step, {"loss": loss_value, "lr": lr, "tokens_per_s": tok_s, "mfu": mfu,
                               "grad_norm": float(grad_norm)})

    # ---- final eval, checkpoint and model
    if step == resumed_at:  # resumed a finished run: nothing new to evaluate or save
        val_loss = history["val"][-1][1]
    else:
        val_loss = estimate_loss(model, val_data, cfg, accelerator)
        history["val"].append([step, val_loss])
        save(ckpt_root, cfg, accelerator, raw_model, optimizer, step, history, model_cfg)
    summary = {"steps": step, "final_train_loss": history["train"][-1][1] if history["train"] else float("nan"),
               "val_loss": val_loss, "params": raw_model.num_params(),
               "train_seconds": time.perf_counter() - t_start, "processes": world}
    if main:
        write_model(cfg, raw_model, model_cfg, summary, history)
    accelerator.wait_for_everyone()
    return summary


def save(root: Path, cfg, accelerator, raw_model, optimizer, step, history, model_cfg) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_training_state(root, step, raw_model, optimizer, model_cfg, cfg, history, {"step": step, "micro": 0},
                            keep=cfg.keep_checkpoints)
    accelerator.wait_for_everyone()


def write_model(cfg: PretrainConfig, model: GPT, model_cfg: GPTConfig, summary: dict, history: dict) -> None:
    """data/pretrain/: the model folder (weights, model config, tokenizer), history, loss curve."""
    out = save_model_folder(cfg.out_dir, model, model_cfg, Path(cfg.tokenizer_dir) / "tokenizer.json")
    (out / "history.json").write_text(json.dumps(history))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_loss(history, out / "loss_curve.png")


def plot_loss(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        ax.plot(*zip(*history["train"]), label="train", lw=1)
    if history["val"]:
        ax.plot(*zip(*history["val"]), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("pretraining loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from accelerate.state import PartialState

    from forgeline.tracking import stage_run

    # config=configs/S.yaml runs this module as stage S (compose_pretrain: its own corpus and model)
    stage, cfg = stage_config(PretrainConfig, "pretrain", sys.argv[1:] if argv is None else argv)
    if not PartialState(cpu=not torch.cuda.is_available()).is_main_process:
        try:
            pretrain(cfg)
        except NonFiniteLoss:
            sys.exit(3)
        return
    import mlflow

    with stage_run(stage, config_dict(cfg)):
        try:
            summary = pretrain(cfg, log=lambda step, m: mlflow.log_metrics(m, step=step))
        except NonFiniteLoss as e:
            mlflow.set_tag("pretrain.diverged", str(e))
            print(f"{stage}: STOPPED\n{e}", file=sys.stderr)
            sys.exit(3)
        mlflow.log_metrics({k: float(v) for k, v in summary.items()})
        out = Path(cfg.out_dir)
        mlflow.log_artifact(str(out / "loss_curve.png"))
        for name in ("model.safetensors", "config.json", "tokenizer.json", "summary.json"):
            mlflow.log_artifact(str(out / name), artifact_path="model")
        print(f"pretrain: {summary['steps']} steps, val loss {summary['val_loss']:.4f}, "
              f"{summary['train_seconds']:.0f}s on {summary['processes']} process(es)")


@task(name="pretrain", task_run_name="{stage}", retries=1, retry_delay_seconds=10)  # a retry resumes from the last checkpoint
def pretrain_task(run: dict[str, str], stage: str = "pretrain") -> dict:
    return run_stage(stage, **run)


if __name__ == "__main__":
    main()
