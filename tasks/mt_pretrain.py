"""mt_pretrain: masked language modelling of models/seq2seq.py on monolingual text of every language.

As the book's chapter 3 describes it: a random subset (`mask_prob`) of a sentence's tokens is
replaced by MASK at the encoder's input; the decoder gets the same sentence unmasked, shifted right
behind BOS, and the loss is the cross-entropy of the decoder's predictions of every token (and EOS).
The encoder input starts with the sentence's own language token, as a translation source starts
with its target's. Sentences are the lines of data/mt_data/mono.parquet (train and val documents,
English, French, Spanish), tokenized with the shared BPE of mt_tokenizer.

One linear loop (tasks/pretrain.py's shape): learning rate, eval and checkpoint, step, log. A batch
is a pure function of (seed, step), so a resumed run (forgeline/checkpoint.py: weights, optimizer,
RNGs) sees the data an uninterrupted one would.

    python -m forgeline.launch tasks.mt_pretrain [key=value ...]     # launch: in configs/mt_pretrain.yaml
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from prefect import task

from forgeline.chat import load_tokenizer
from forgeline.checkpoint import checkpoint_key, resume_training_state, save_model_folder, save_training_state
from forgeline.config import ConfigError, config_dict, load_config
from forgeline.schedule import warmup_cosine
from forgeline.workspace import run_stage
from models.seq2seq import Seq2Seq, Seq2SeqConfig, encoder_input, pad_batch


@dataclass
class MTPretrainConfig:
    mono: str = "data/mt_data/mono.parquet"     # doc_id, lang, split, text (one line a sentence)
    tokenizer_dir: str = "data/mt_tokenizer"    # tokenizer.json (the shared BPE)
    out_dir: str = "data/mt_pretrain"           # model folder: model.safetensors, config.json, tokenizer.json
    ckpt_dir: str = "checkpoints/mt_pretrain"   # resumable state, outside the DVC outs
    launch: str = "cpu"                         # configs/accelerate/<launch>.yaml (read by forgeline.launch)
    languages: list[str] = field(default_factory=lambda: ["en", "fr", "es"])  # a <2xx> token each
    # model
    d_model: int = 128
    n_heads: int = 4
    n_enc_layers: int = 3
    n_dec_layers: int = 3
    d_ff: int = 512
    max_len: int = 96                           # tokens per side; longer sentences are cut
    dropout: float = 0.1
    # objective
    mask_prob: float = 0.25                     # share of a sentence's tokens replaced by MASK (at least one)
    crop: int = 48                              # tokens kept of a line (handbook paragraphs run to hundreds)
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
    eval_batches: int = 4
    ckpt_interval: int = 500
    keep_checkpoints: int = 2
    log_interval: int = 50
    seed: int = 1337

    def check(self) -> None:
        for name in ("batch_size", "max_steps", "eval_interval", "ckpt_interval", "log_interval", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mt_pretrain: {name} must be >= 1")
        if not 1 <= self.crop <= self.max_len - 2:
            raise ConfigError("mt_pretrain: need 1 <= crop <= max_len - 2")
        if not 0 < self.mask_prob < 1:
            raise ConfigError("mt_pretrain: mask_prob is a share in (0, 1)")
        if self.d_model % self.n_heads:
            raise ConfigError("mt_pretrain: d_model must be a multiple of n_heads")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("mt_pretrain: need 0 <= min_lr <= lr")

    def checkpoint_root(self) -> Path:
        skip = {"out_dir", "ckpt_dir", "launch", "log_interval", "keep_checkpoints"}
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        return Path(self.ckpt_dir) / checkpoint_key(settings, [Path(self.mono), Path(self.tokenizer_dir) / "tokenizer.json"])


def mask_tokens(ids: list[int], mask_prob: float, mask_id: int, g: torch.Generator) -> list[int]:
    """`ids` with round(mask_prob * len) positions (at least one), drawn without replacement, set to mask_id."""
    n = max(1, round(mask_prob * len(ids)))
    out = list(ids)
    for i in torch.randperm(len(ids), generator=g)[:n].tolist():
        out[i] = mask_id
    return out


def mlm_batch(sentences: list[tuple[str, list[int]]], config: Seq2SeqConfig, mask_prob: float,
              g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder input [<2lang>] + masked + [EOS]; decoder input [BOS] + sentence; target sentence + [EOS]."""
    src, tgt_in, tgt_out = [], [], []
    for lang, ids in sentences:
        ids = ids[:config.max_len - 2]
        src.append(encoder_input(mask_tokens(ids, mask_prob, config.mask_id, g), lang, config))
        tgt_in.append([config.bos_id, *ids])
        tgt_out.append([*ids, config.eos_id])
    return pad_batch(src, config.pad_id), pad_batch(tgt_in, config.pad_id), pad_batch(tgt_out, config.pad_id)


def load_sentences(cfg: MTPretrainConfig, tok) -> dict[str, list[tuple[str, list[int]]]]:
    """{split: [(language, token ids)]} from the monolingual documents, one sentence a line, each cut to
    `crop` tokens, sorted by length."""
    mono = pd.read_parquet(cfg.mono, columns=["lang", "split", "text"])
    mono = mono[mono["lang"].isin(cfg.languages)]
    out: dict[str, list[tuple[str, list[int]]]] = {"train": [], "val": []}
    for (split, lang), part in mono.groupby(["split", "lang"], sort=True):
        lines = [line for text in part["text"] for line in text.split("\n") if line.strip()]
        out[split] += [(lang, enc.ids[:cfg.crop]) for enc in tok.encode_batch_fast(lines, add_special_tokens=False)
                       if enc.ids]
    for rows in out.values():
        rows.sort(key=lambda r: len(r[1]))  # stable: equal lengths keep their order
    if not out["train"]:
        raise ValueError(f"{cfg.mono}: no train sentences in {cfg.languages}")
    return out


def batch_at(data: list, batch_size: int, seed: int, step: int) -> tuple[list, torch.Generator]:
    """The step's sentences and the generator its masks draw from: a pure function of (seed, step).
    `data` is sorted by length: a batch is a random window of it, so it pads little."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    start = int(torch.randint(max(1, len(data) - batch_size + 1), (1,), generator=g))
    return data[start:start + batch_size], g


@torch.no_grad()
def held_out_loss(model, data: list, cfg: MTPretrainConfig, config: Seq2SeqConfig, accelerator) -> float:
    """Mean MLM loss on fixed val batches (the same sentences and masks at every eval)."""
    model.eval()
    losses = []
    for i in range(cfg.eval_batches):
        rows, g = batch_at(data, cfg.batch_size, cfg.seed + 7, i)
        src, tgt_in, tgt_out = (t.to(accelerator.device) for t in mlm_batch(rows, config, cfg.mask_prob, g))
        losses.append(model(src, tgt_in, tgt_out)[1].float())
    model.train()
    return accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()


def mt_pretrain(cfg: MTPretrainConfig, log=None) -> dict:
    """Train (or resume) to cfg.max_steps; write the model folder to cfg.out_dir; return a summary."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    tok_file = Path(cfg.tokenizer_dir) / "tokenizer.json"
    tok = load_tokenizer(tok_file)
    data = load_sentences(cfg, tok)
    model_cfg = Seq2SeqConfig.for_tokenizer(tok.get_vocab_size(), cfg.languages, d_model=cfg.d_model,
                                            n_heads=cfg.n_heads, n_enc_layers=cfg.n_enc_layers,
                                            n_dec_layers=cfg.n_dec_layers, d_ff=cfg.d_ff, max_len=cfg.max_len,
                                            dropout=cfg.dropout)
    model = Seq2Seq(model_cfg)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2))

    # ---- resume from the newest complete checkpoint, if any
    step, history = 0, {"train": [], "val": []}
    ckpt_root = cfg.checkpoint_root()
    meta = resume_training_state(ckpt_root, model, optimizer, model_cfg, stage="mt_pretrain",
                                 verbose=accelerator.is_main_process)
    if meta is not None:
        step, history = meta["step"], meta["history"]
    resumed_at = step if meta is not None else -1
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    # each process takes its own rows of one global batch of batch_size * processes sentences
    rank, world = accelerator.process_index, accelerator.num_processes

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
            history["val"].append([step, held_out_loss(model, data["val"] or data["train"], cfg, model_cfg, accelerator)])
        if step > 0 and step != resumed_at and step % cfg.ckpt_interval == 0:
            save()

        # ---- one step
        rows, g = batch_at(data["train"], cfg.batch_size * world, cfg.seed, step)
        src, tgt_in, tgt_out = mlm_batch(rows, model_cfg, cfg.mask_prob, g)
        mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
        _, loss = model(src[mine].to(accelerator.device), tgt_in[mine].to(accelerator.device),
                        tgt_out[mine].to(accelerator.device))
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        loss_value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
        if not (math.isfinite(loss_value) and math.isfinite(float(grad_norm))):
            raise FloatingPointError(f"mt_pretrain: non-finite loss or grad norm at step {step}; stopped before the update")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history["train"].append([step, loss_value])

        # ---- log
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            if accelerator.is_main_process:
                print(f"mt_pretrain step {step}/{cfg.max_steps} loss {loss_value:.4f} lr {lr:.2e} "
                      f"{(now - t_last) / cfg.log_interval:.3f} s/step", flush=True)
                if log:
                    log(step, {"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm)})
            t_last = now

    # ---- final eval, checkpoint and model
    if step != resumed_at:
        history["val"].append([step, held_out_loss(model, data["val"] or data["train"], cfg, model_cfg, accelerator)])
        save()
    summary = {"steps": step, "val_loss": history["val"][-1][1], "params": raw.num_params(),
               "train_sentences": len(data["train"]), "train_seconds": time.perf_counter() - t_start,
               "processes": world}
    if accelerator.is_main_process:
        out = save_model_folder(cfg.out_dir, raw, model_cfg, tok_file)
        (out / "history.json").write_text(json.dumps(history))
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return summary


def main(argv: list[str] | None = None) -> None:
    from accelerate.state import PartialState

    from forgeline.tracking import stage_run

    cfg = load_config(MTPretrainConfig, "mt_pretrain", sys.argv[1:] if argv is None else argv)
    if not PartialState(cpu=not torch.cuda.is_available()).is_main_process:
        mt_pretrain(cfg)
        return
    import mlflow

    with stage_run("mt_pretrain", config_dict(cfg)):
        summary = mt_pretrain(cfg, log=lambda step, m: mlflow.log_metrics(m, step=step))
        mlflow.log_metrics({k: float(v) for k, v in summary.items()})
        for name in ("config.json", "summary.json", "history.json"):
            mlflow.log_artifact(str(Path(cfg.out_dir) / name))
    print(json.dumps(summary))


@task(name="mt_pretrain", retries=1, retry_delay_seconds=10)  # a retry resumes from the last checkpoint
def mt_pretrain_task(run: dict[str, str]) -> dict:
    return run_stage("mt_pretrain", **run)


if __name__ == "__main__":
    main()
