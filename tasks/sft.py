"""SFT: supervised fine-tuning of the pretrained model on chat conversations, loss on assistant tokens only.

One linear loop, as in tasks/pretrain.py: learning rate, eval and checkpoint, step, log. A batch
is a pure function of (seed, step): epoch e is a permutation seeded by (seed, e), and step s takes
positions s*B .. s*B+B-1 of the concatenated epochs, so a resumed run sees what an uninterrupted
one would. Every token that is not assistant content (or the <|end|> closing it) has target -100
and carries no loss. Reports held-out loss and exact-match accuracy of greedy replies on the
held-out verifiable prompts, for the base model (before step 0) and the fine-tuned one.

    python -m tasks.sft [key=value ...]
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from prefect import task

from forgeline.chat import (END, PAD, collate, decode_reply, encode_conversations, is_correct, load_tokenizer,
                            prompt_ids, read_jsonl)
from forgeline.checkpoint import (checkpoint_key, latest_checkpoint, load_model_folder, resume_training_state,
                                  save_model_folder, save_training_state)
from forgeline.config import ConfigError, config_dict, load_config
from forgeline.schedule import warmup_cosine
from forgeline.workspace import run_stage
from models.gpt import GPT, linear_cross_entropy
from models.sampling import GenerationConfig, generate


@dataclass
class SFTConfig:
    base_dir: str = "data/pretrain"       # model folder: config.json, model.safetensors, tokenizer.json
    data_dir: str = "data/chat_data"      # sft_train.jsonl, sft_val.jsonl
    out_dir: str = "data/sft"             # the fine-tuned model folder + metrics.json
    ckpt_dir: str = "checkpoints/sft"     # resumable state, outside the DVC outs
    # optimisation
    batch_size: int = 32                  # conversations per step
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0                # max global grad norm; 0 = off
    # bookkeeping
    eval_interval: int = 250              # steps between held-out losses
    ckpt_interval: int = 250
    keep_checkpoints: int = 2
    log_interval: int = 10
    max_new_tokens: int = 16              # greedy reply length cap when scoring the verifiable tasks
    seed: int = 1337

    def check(self) -> None:
        for name in ("batch_size", "max_steps", "eval_interval", "ckpt_interval", "log_interval", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sft: {name} must be >= 1")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("sft: need 0 <= min_lr <= lr")

    def checkpoint_root(self) -> Path:
        """ckpt_dir/<key>: the key hashes every weight-changing setting, the base weights and the data."""
        skip = {"out_dir", "ckpt_dir", "log_interval", "keep_checkpoints", "max_new_tokens"}
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        inputs = [Path(self.base_dir) / "model.safetensors", Path(self.data_dir) / "sft_train.jsonl"]
        return Path(self.ckpt_dir) / checkpoint_key(settings, inputs)


# ----------------------------------------------------------------------------- data
# batch_indices is copied into each training stage on purpose (as nanochat does): each loop owns its batches


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Rows of step `step`: positions step*B .. step*B+B-1 of epoch permutations seeded by (seed, epoch)."""
    perms: dict[int, list[int]] = {}
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        out.append(perms[epoch][offset])
    return out


def assistant_loss(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """model(x, y)'s loss (mean cross-entropy over targets that are not -100), with the LM head run
    on those positions alone: assistant tokens are ~1/5 of a chat batch, the head ~1/3 of the FLOPs."""
    keep = y != -100
    return linear_cross_entropy(model.hidden(x)[keep], model.lm_head.weight, y[keep])


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def held_out_loss(model: GPT, examples: list, pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy per assistant token over all held-out conversations."""
    model.eval()
    total, count = 0.0, 0
    for b in range(0, len(examples), batch_size):
        x, y = collate(examples[b:b + batch_size], pad_id)
        n = int((y != -100).sum())
        loss = assistant_loss(model, x, y)
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / count


@torch.no_grad()
def task_accuracy(model: GPT, tok, rows: list[dict], max_new_tokens: int) -> dict:
    """Exact-match accuracy of greedy replies on verifiable rows: overall, per task, and per row."""
    was_training = model.training
    model.eval()
    greedy = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_tokens=(tok.token_to_id(END),))
    gens = generate(model, [prompt_ids(tok, r) for r in rows], greedy, batch_size=512)
    model.train(was_training)
    replies = [decode_reply(tok, g)[0] for g in gens]
    correct = [is_correct(rep, r["answer"]) for rep, r in zip(replies, rows)]
    metrics = {"task_accuracy": sum(correct) / len(rows)}
    for t in sorted({r["source"] for r in rows}):
        hits = [c for c, r in zip(correct, rows) if r["source"] == t]
        metrics[f"task_accuracy.{t}"] = sum(hits) / len(hits)
    return {"metrics": metrics, "replies": replies, "correct": correct}


# ----------------------------------------------------------------------------- the loop


def sft(cfg: SFTConfig, log=None) -> dict:
    """Fine-tune (or resume) to cfg.max_steps; write the model folder to cfg.out_dir; return metrics.

    `log(step, metrics)` receives the logged metrics (the CLI sends them to MLflow).
    """
    torch.manual_seed(cfg.seed)
    model = load_model_folder(cfg.base_dir).train()
    tok = load_tokenizer(Path(cfg.base_dir) / "tokenizer.json")
    pad_id = tok.token_to_id(PAD)
    block = model.config.block_size
    train_rows = read_jsonl(Path(cfg.data_dir) / "sft_train.jsonl")
    val_rows = read_jsonl(Path(cfg.data_dir) / "sft_val.jsonl")
    train, dropped = encode_conversations(train_rows, tok, block)
    val, val_dropped = encode_conversations(val_rows, tok, block)
    verifiable_val = [r for r in val_rows if r["answer"] is not None]
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2))

    # ---- resume from the newest complete checkpoint, or score the base model first
    step, history = 0, {"train": [], "val": [], "base": {}}
    ckpt_root = cfg.checkpoint_root()
    meta = resume_training_state(ckpt_root, model, optimizer, model.config, stage="sft")
    if meta is not None:
        step, history = meta["step"], meta["history"]
    else:
        base = task_accuracy(model, tok, verifiable_val, cfg.max_new_tokens)["metrics"]
        history["base"] = {"val_loss": held_out_loss(model, val, pad_id, cfg.batch_size), **base}
        print(f"sft: base model val loss {history['base']['val_loss']:.4f}, "
              f"task accuracy {history['base']['task_accuracy']:.3f}", flush=True)
    resumed_at = step if meta is not None else -1

    t_start, t_last, last_step = time.perf_counter(), time.perf_counter(), step
    while step < cfg.max_steps:
        # ---- learning rate
        lr = warmup_cosine(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # ---- eval and checkpoint (state before this step's update)
        if step > 0 and step != resumed_at and step % cfg.eval_interval == 0:
            history["val"].append([step, held_out_loss(model, val, pad_id, cfg.batch_size)])
        if step > 0 and step != resumed_at and step % cfg.ckpt_interval == 0:
            save(ckpt_root, cfg, model, optimizer, step, history)

        # ---- one step on a batch of conversations, loss on assistant tokens only
        x, y = collate([train[i] for i in batch_indices(len(train), cfg.batch_size, cfg.seed, step)], pad_id)
        loss = assistant_loss(model, x, y)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                   cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if not (math.isfinite(loss.item()) and math.isfinite(float(grad_norm))):
            raise FloatingPointError(f"sft: non-finite loss or grad norm at step {step}; "
                                     f"last checkpoint: {latest_checkpoint(ckpt_root) or 'none'}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history["train"].append([step, loss.item()])

        # ---- log
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            dt = (now - t_last) / max(1, step - last_step)
            t_last, last_step = now, step
            print(f"step {step:>5}/{cfg.max_steps} loss {loss.item():.4f} lr {lr:.2e} {dt * 1000:.0f} ms/step",
                  flush=True)
            if log:
                log(step, {"loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm)})

    # ---- final eval, checkpoint and model
    if step != resumed_at:
        history["val"].append([step, held_out_loss(model, val, pad_id, cfg.batch_size)])
        save(ckpt_root, cfg, model, optimizer, step, history)
    scored = task_accuracy(model, tok, verifiable_val, cfg.max_new_tokens)
    metrics = {"steps": step, "val_loss": history["val"][-1][1], **scored["metrics"],
               **{f"base_{k}": v for k, v in history["base"].items()},
               "train_conversations": len(train), "dropped_too_long": dropped + val_dropped,
               "train_seconds": time.perf_counter() - t_start}
    write_model(cfg, model, tok, metrics, history, verifiable_val, scored)
    return metrics


def save(root: Path, cfg: SFTConfig, model: GPT, optimizer, step: int, history: dict) -> None:
    save_training_state(root, step, model, optimizer, model.config, cfg, history,
                        {"step": step, "rows_seen": step * cfg.batch_size}, keep=cfg.keep_checkpoints)


def write_model(cfg: SFTConfig, model: GPT, tok, metrics: dict, history: dict, rows: list, scored: dict) -> None:
    """data/sft/: the model folder (as data/pretrain), metrics.json, history.json, samples.json."""
    out = save_model_folder(cfg.out_dir, model, model.config, Path(cfg.base_dir) / "tokenizer.json")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "history.json").write_text(json.dumps(history))
    samples = [{"task": r["source"], "prompt": r["messages"][-2]["content"], "answer": r["answer"],
                "reply": rep, "correct": ok} for r, rep, ok in zip(rows, scored["replies"], scored["correct"])]
    (out / "samples.json").write_text(json.dumps(samples[:40], indent=2))


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    cfg = load_config(SFTConfig, "sft", sys.argv[1:] if argv is None else argv)
    with stage_run("sft", config_dict(cfg)):
        metrics = sft(cfg, log=lambda step, m: mlflow.log_metrics(m, step=step))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        for name in ("metrics.json", "samples.json"):
            mlflow.log_artifact(str(Path(cfg.out_dir) / name))
    print(f"sft: {metrics['steps']} steps, val loss {metrics['base_val_loss']:.4f} -> {metrics['val_loss']:.4f}, "
          f"task accuracy {metrics['base_task_accuracy']:.3f} -> {metrics['task_accuracy']:.3f}")


@task(name="sft", retries=1, retry_delay_seconds=10)  # a retry resumes from the last checkpoint
def sft_task(run: dict[str, str]) -> dict:
    return run_stage("sft", **run)


if __name__ == "__main__":
    main()
