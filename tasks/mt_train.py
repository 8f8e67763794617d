"""mt_train: supervised fine-tuning of the seq2seq model on the translation pairs, from mt_pretrain's weights.

One model for every direction in the pairs (en->fr, en->es): the encoder input starts with the
target language's token. Teacher forcing: decoder input [BOS] + target, cross-entropy (with label
smoothing) on target + [EOS]. `init: pretrained` starts from data/mt_pretrain's weights, `init:
random` from a fresh initialisation of the same architecture (the ablation in
bench/bench_mt_ablation.py). Refuses to start unless mt_validate passed on these very pairs.

One linear loop (tasks/pretrain.py's shape), launched by Accelerate, with full-state resume
(forgeline/checkpoint.py): a batch is a pure function of (seed, step) and a random window of the
pairs sorted by length (little padding).

    python -m forgeline.launch tasks.mt_train [key=value ...]      # launch: in configs/mt_train.yaml
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from prefect import task
from safetensors.torch import load_model

from forgeline.chat import load_tokenizer
from forgeline.checkpoint import checkpoint_key, resume_training_state, save_model_folder, save_training_state
from forgeline.config import ConfigError, config_dict, load_config
from forgeline.schedule import warmup_cosine
from forgeline.workspace import run_stage
from models.seq2seq import Seq2Seq, Seq2SeqConfig, encoder_input, pad_batch


@dataclass
class MTTrainConfig:
    pairs: str = "data/mt_data/pairs.parquet"
    validation: str = "data/mt_validate/result.json"  # the gate: mt_validate's verdict on these pairs
    pretrained_dir: str = "data/mt_pretrain"          # model folder: the architecture, and the weights for init=pretrained
    out_dir: str = "data/mt_train"
    ckpt_dir: str = "checkpoints/mt_train"
    launch: str = "cpu"
    init: Literal["pretrained", "random"] = "pretrained"
    dropout: float = 0.1
    label_smoothing: float = 0.1
    # optimisation
    batch_size: int = 32
    max_steps: int = 1500
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 150
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0
    # bookkeeping
    eval_interval: int = 500
    eval_batches: int = 8
    ckpt_interval: int = 500
    keep_checkpoints: int = 2
    log_interval: int = 50
    seed: int = 1337

    def check(self) -> None:
        for name in ("batch_size", "max_steps", "eval_interval", "ckpt_interval", "log_interval", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mt_train: {name} must be >= 1")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("mt_train: need 0 <= min_lr <= lr")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("mt_train: label_smoothing is in [0, 1)")

    def checkpoint_root(self) -> Path:
        skip = {"out_dir", "ckpt_dir", "launch", "log_interval", "keep_checkpoints", "validation"}
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        inputs = [Path(self.pairs), Path(self.pretrained_dir) / "model.safetensors"]
        return Path(self.ckpt_dir) / checkpoint_key(settings, inputs)


class GateClosed(RuntimeError):
    """mt_validate did not pass on these pairs."""


def check_gate(cfg: MTTrainConfig) -> None:
    path = Path(cfg.validation)
    if not path.is_file():
        raise GateClosed(f"{path}: no validation report; run mt_validate first")
    report = json.loads(path.read_text())
    with open(cfg.pairs, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    if not report.get("success"):
        raise GateClosed(f"{path}: the pairs failed validation ({report.get('failed_expectations')} expectations)")
    if report.get("pairs_sha256") != sha:
        raise GateClosed(f"{path} is about other pairs than {cfg.pairs}; rerun mt_validate")


def load_pairs(path: str, tok, config: Seq2SeqConfig) -> dict[str, list[tuple[list[int], list[int]]]]:
    """{split: [(encoder input, target ids)]}, each split sorted by length; targets cut to max_len - 1."""
    df = pd.read_parquet(path, columns=["tgt_lang", "src", "tgt", "split"])
    df = df[df["tgt_lang"].isin(config.lang_ids)]
    src = tok.encode_batch_fast(df["src"].tolist(), add_special_tokens=False)
    tgt = tok.encode_batch_fast(df["tgt"].tolist(), add_special_tokens=False)
    out: dict[str, list] = {"train": [], "val": [], "test": []}
    for split, lang, s, t in zip(df["split"], df["tgt_lang"], src, tgt):
        out[split].append((encoder_input(s.ids, lang, config), t.ids[:config.max_len - 1]))
    for rows in out.values():
        rows.sort(key=lambda r: max(len(r[0]), len(r[1])))
    return out


def batch_at(data: list, batch_size: int, seed: int, step: int) -> list:
    """Step `step`'s pairs: a random window of the length-sorted list, a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    start = int(torch.randint(max(1, len(data) - batch_size + 1), (1,), generator=g))
    return data[start:start + batch_size]


def tensors(rows: list, config: Seq2SeqConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(encoder input, decoder input [BOS] + target, decoder target target + [EOS]), padded."""
    return (pad_batch([r[0] for r in rows], config.pad_id),
            pad_batch([[config.bos_id, *r[1]] for r in rows], config.pad_id),
            pad_batch([[*r[1], config.eos_id] for r in rows], config.pad_id))


@torch.no_grad()
def held_out_loss(model, data: list, cfg: MTTrainConfig, config: Seq2SeqConfig, device) -> float:
    """Mean loss (no label smoothing) on fixed val windows, the same at every eval."""
    model.eval()
    losses = []
    for i in range(cfg.eval_batches):
        rows = batch_at(data, cfg.batch_size, cfg.seed + 7, i)
        losses.append(model(*(t.to(device) for t in tensors(rows, config)))[1].float())
    model.train()
    return torch.stack(losses).mean().item()


def mt_train(cfg: MTTrainConfig, log=None) -> dict:
    """Fine-tune (or resume) to cfg.max_steps; write the model folder to cfg.out_dir; return a summary."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    check_gate(cfg)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    pre = Path(cfg.pretrained_dir)
    model_cfg = Seq2SeqConfig(**{**json.loads((pre / "config.json").read_text()), "dropout": cfg.dropout})
    model = Seq2Seq(model_cfg)
    if cfg.init == "pretrained":
        load_model(model, str(pre / "model.safetensors"))
    tok = load_tokenizer(pre / "tokenizer.json")
    data = load_pairs(cfg.pairs, tok, model_cfg)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2))

    # ---- resume from the newest complete checkpoint, if any
    step, history = 0, {"train": [], "val": []}
    ckpt_root = cfg.checkpoint_root()
    meta = resume_training_state(ckpt_root, model, optimizer, model_cfg, stage="mt_train",
                                 verbose=accelerator.is_main_process)
    if meta is not None:
        step, history = meta["step"], meta["history"]
    resumed_at = step if meta is not None else -1
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    rank, world = accelerator.process_index, accelerator.num_processes
    val = data["val"] or data["train"]
    if step == 0:  # the starting point: what pretraining (or nothing) gives before any pair is seen
        history["val"].append([0, held_out_loss(raw, val, cfg, model_cfg, accelerator.device)])

    def save() -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_training_state(ckpt_root, step, raw, optimizer, model_cfg, cfg, history, {"step": step},
                                keep=cfg.keep_checkpoints)
        accelerator.wait_for_everyone()

    t_start, t_last = time.perf_counter(), time.perf_counter()
    while step < cfg.max_steps:
        # ---- learning rate
        lr = warmup_cosine(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # ---- eval and checkpoint (state before this step's update; done already if we resumed here)
        if step > 0 and step != resumed_at and step % cfg.eval_interval == 0:
            history["val"].append([step, held_out_loss(raw, val, cfg, model_cfg, accelerator.device)])
        if step > 0 and step != resumed_at and step % cfg.ckpt_interval == 0:
            save()

        # ---- one step: this process's rows of one global window of batch_size * processes pairs
        rows = batch_at(data["train"], cfg.batch_size * world, cfg.seed, step)
        rows = rows[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
        src, tgt_in, tgt_out = (t.to(accelerator.device) for t in tensors(rows, model_cfg))
        _, loss = model(src, tgt_in, tgt_out, label_smoothing=cfg.label_smoothing)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        loss_value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
        if not (math.isfinite(loss_value) and math.isfinite(float(grad_norm))):
            raise FloatingPointError(f"mt_train: non-finite loss or grad norm at step {step}; stopped before the update")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history["train"].append([step, loss_value])

        # ---- log
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            if accelerator.is_main_process:
                print(f"mt_train step {step}/{cfg.max_steps} loss {loss_value:.4f} lr {lr:.2e} "
                      f"{(now - t_last) / cfg.log_interval:.3f} s/step", flush=True)
                if log:
                    log(step, {"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm)})
            t_last = now

    # ---- final eval, checkpoint and model
    if step != resumed_at:
        history["val"].append([step, held_out_loss(raw, val, cfg, model_cfg, accelerator.device)])
        save()
    summary = {"steps": step, "init": cfg.init, "val_loss": history["val"][-1][1], "val_loss_at_start": history["val"][0][1],
               "params": raw.num_params(), "train_pairs": len(data["train"]),
               "train_seconds": time.perf_counter() - t_start, "processes": world}
    if accelerator.is_main_process:
        out = save_model_folder(cfg.out_dir, raw, model_cfg, pre / "tokenizer.json")
        (out / "history.json").write_text(json.dumps(history))
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return summary


def main(argv: list[str] | None = None) -> None:
    from accelerate.state import PartialState

    from forgeline.tracking import stage_run

    cfg = load_config(MTTrainConfig, "mt_train", sys.argv[1:] if argv is None else argv)
    if not PartialState(cpu=not torch.cuda.is_available()).is_main_process:
        mt_train(cfg)
        return
    import mlflow

    with stage_run("mt_train", config_dict(cfg)):
        try:
            summary = mt_train(cfg, log=lambda step, m: mlflow.log_metrics(m, step=step))
        except GateClosed as e:
            print(f"mt_train: REFUSED\n{e}", file=sys.stderr)
            sys.exit(1)
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})
        for name in ("config.json", "summary.json", "history.json"):
            mlflow.log_artifact(str(Path(cfg.out_dir) / name))
    print(json.dumps(summary))


@task(name="mt_train", retries=1, retry_delay_seconds=10)  # a retry resumes from the last checkpoint
def mt_train_task(run: dict[str, str]) -> dict:
    return run_stage("mt_train", **run)


if __name__ == "__main__":
    main()
