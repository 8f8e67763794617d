"""compose_finetune: the general model (compose_pretrain) fine-tuned on the letter/dialogue domain.

The domain's train documents (data/compose_data/domain.parquet) are encoded with the base model's
tokenizer, each followed by <|endoftext|>, into one token stream; training draws random windows
of block_size tokens from it, a pure function of (seed, step), and follows the base run's recipe
(AdamW, warmup then cosine) at a lower learning rate. Held-out loss on the val documents before
and after. The run is short (tens of seconds on 2 cores), so it keeps no resumable checkpoints:
a killed run starts again.

    python -m tasks.compose_finetune [key=value ...]
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from prefect import task

from forgeline.chat import EOT
from forgeline.checkpoint import load_model_folder, save_model_folder
from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.schedule import warmup_cosine
from forgeline.workspace import run_stage


@dataclass
class ComposeFinetuneConfig:
    base_dir: str = "data/compose_pretrain"            # model folder: config.json, model.safetensors, tokenizer.json
    domain: str = "data/compose_data/domain.parquet"   # doc_id, split, text
    out_dir: str = "data/compose_finetune"             # the fine-tuned model folder + metrics.json
    batch_size: int = 16
    max_steps: int = 150
    lr: float = 5e-4
    min_lr: float = 5e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_batches: int = 8
    log_interval: int = 10
    seed: int = 1337

    def check(self) -> None:
        for name in ("batch_size", "max_steps", "eval_batches", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"compose_finetune: {name} must be >= 1")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("compose_finetune: need 0 <= min_lr <= lr")


def encode_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """Token ids of the texts, each followed by <|endoftext|>, as one int64 array."""
    eot = tokenizer.token_to_id(EOT)
    ids = [np.asarray(e.ids + [eot], dtype=np.int64) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


def windows(data: np.ndarray, block: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` random (input, target) windows of `block` tokens, drawn from a generator seeded by `seed`."""
    if len(data) <= block + 1:
        raise ValueError(f"{len(data)} tokens: fewer than block_size + 1 = {block + 1}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(data) - block - 1, (batch,), generator=g).tolist()
    x = torch.from_numpy(np.stack([data[s:s + block] for s in starts]))
    y = torch.from_numpy(np.stack([data[s + 1:s + 1 + block] for s in starts]))
    return x, y


@torch.no_grad()
def held_out_loss(model, data: np.ndarray, cfg: ComposeFinetuneConfig) -> float:
    """Mean loss over fixed validation windows (the same before and after training)."""
    model.eval()
    losses = [model(*windows(data, model.config.block_size, cfg.batch_size, cfg.seed + 7 + i))[1].item()
              for i in range(cfg.eval_batches)]
    model.train()
    return float(np.mean(losses))


def compose_finetune(cfg: ComposeFinetuneConfig, log=None) -> dict:
    from tokenizers import Tokenizer

    torch.manual_seed(cfg.seed)
    base = Path(cfg.base_dir)
    model = load_model_folder(base).train()
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    docs = pd.read_parquet(cfg.domain)
    train = encode_stream(tokenizer, docs.loc[docs["split"] == "train", "text"].tolist())
    val = encode_stream(tokenizer, docs.loc[docs["split"] == "val", "text"].tolist())
    block = model.config.block_size
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (0.9, 0.95))
    val_before = held_out_loss(model, val, cfg)

    history, t0 = [], time.perf_counter()
    for step in range(cfg.max_steps):
        # ---- learning rate
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        # ---- step
        x, y = windows(train, block, cfg.batch_size, cfg.seed * 1_000_003 + step)
        _, loss = model(x, y)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append([step + 1, loss.item()])
        # ---- log
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_steps:
            print(f"step {step + 1:>4}/{cfg.max_steps} loss {loss.item():.4f}", flush=True)
            if log:
                log(step + 1, {"loss": loss.item(), "lr": warmup_cosine(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)})

    val_after = held_out_loss(model, val, cfg)
    metrics = {"val_loss_before": val_before, "val_loss": val_after, "train_tokens": int(len(train)),
               "val_tokens": int(len(val)), "steps": cfg.max_steps, "train_seconds": time.perf_counter() - t0}
    out = save_model_folder(cfg.out_dir, model.eval(), model.config, base / "tokenizer.json")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(history))
    return metrics


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(ComposeFinetuneConfig, "compose_finetune", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        metrics = compose_finetune(cfg, log=lambda step, m: mlflow.log_metrics(m, step=step))
        mlflow.log_metrics(metrics)
        for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.json"):
            mlflow.log_artifact(str(Path(cfg.out_dir) / name), artifact_path="model")
    print(f"{stage}: val loss {metrics['val_loss_before']:.4f} -> {metrics['val_loss']:.4f} "
          f"in {metrics['train_seconds']:.0f}s")


@task(name="compose_finetune", task_run_name="{stage}")
def compose_finetune_task(run: dict[str, str], stage: str = "compose_finetune") -> dict:
    return run_stage(stage, **run)


if __name__ == "__main__":
    main()
