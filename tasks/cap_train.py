"""cap_train: image captioning models (models/caption.py) on the scenes, one per encoder variant.

Each variant in `variants` is trained from scratch with the same data, steps and seed, so cap_eval's
table compares encoders alone: `cnn` (a 3x3 grid, 9 tokens) and `vit-<pos>` with pos one of
1d-learned, 2d-learned, 1d-sincos, 2d-sincos (patch_size x patch_size patches). Teacher forcing:
decoder input [BOS] + caption, cross-entropy (label smoothing) on caption + [EOS]; each step draws
`batch_size` train scenes and one of each scene's reference captions, a pure function of (seed,
step). The vocabulary is the train captions' words. Refuses to start unless img_validate passed on
this very manifest.

One linear loop per variant (tasks/mt_train.py's shape) with full-state checkpoints under
checkpoints/cap_train/<key>/<variant>/ and resume. Writes data/cap_train/<variant>/ (config.json,
model.safetensors, vocab.json, history.json, summary.json); cap_eval evaluates every variant folder.

    python -m tasks.cap_train [key=value ...]
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from prefect import task
from safetensors.torch import save_model

from forgeline.checkpoint import checkpoint_key, resume_training_state, save_training_state
from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.expectations import GateClosed, check_gate
from forgeline.images import load_images, to_tensor
from forgeline.schedule import warmup_cosine
from forgeline.workspace import run_stage
from models.caption import POSITIONS, CaptionConfig, CaptionModel, build_vocab, encode_caption, teacher_forcing

VARIANTS = ("cnn", *(f"vit-{p}" for p in POSITIONS))


@dataclass
class CapTrainConfig:
    manifest: str = "data/img_data/manifest.parquet"
    validation: str = "data/img_validate/result.json"   # the gate: img_validate's verdict on this manifest
    out_dir: str = "data/cap_train"
    ckpt_dir: str = "checkpoints/cap_train"
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    image_size: int = 64                 # 64, or 32 for the scenes32 variant
    patch_size: int = 8
    cnn_width: int = 16
    d_model: int = 96
    n_heads: int = 4
    n_enc_layers: int = 2
    n_dec_layers: int = 2
    d_ff: int = 192
    max_len: int = 32
    dropout: float = 0.1
    label_smoothing: float = 0.1
    batch_size: int = 48
    max_steps: int = 800
    lr: float = 1e-3
    min_lr: float = 5e-5
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_batches: int = 4
    ckpt_interval: int = 200
    keep_checkpoints: int = 2
    log_interval: int = 100
    seed: int = 1337

    def check(self) -> None:
        for name in ("batch_size", "max_steps", "ckpt_interval", "log_interval", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cap_train: {name} must be >= 1")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ConfigError(f"cap_train: variants {bad}: each one of {list(VARIANTS)}")
        if self.image_size not in (32, 64) or self.image_size % self.patch_size:
            raise ConfigError("cap_train: image_size 32 or 64, divisible by patch_size")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("cap_train: need 0 <= min_lr <= lr")

    def model_config(self, variant: str, vocab_size: int) -> CaptionConfig:
        encoder, _, pos = variant.partition("-")
        return CaptionConfig(vocab_size=vocab_size, encoder=encoder, pos=pos or "2d-sincos", image_size=self.image_size,
                             patch_size=self.patch_size, cnn_width=self.cnn_width, d_model=self.d_model,
                             n_heads=self.n_heads, n_enc_layers=self.n_enc_layers, n_dec_layers=self.n_dec_layers,
                             d_ff=self.d_ff, max_len=self.max_len, dropout=self.dropout)

    def checkpoint_root(self) -> Path:
        skip = {"out_dir", "ckpt_dir", "log_interval", "keep_checkpoints", "validation", "variants"}
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        inputs = [Path(self.manifest), Path(self.manifest).parent / f"scenes{self.image_size}.npz"]
        return Path(self.ckpt_dir) / checkpoint_key(settings, inputs)


def scene_split(manifest: pd.DataFrame, split: str, image_size: int, data_dir: Path) -> tuple[np.ndarray, list[list[str]]]:
    """The scenes of one split: uint8 images at image_size and their reference captions."""
    part = manifest[(manifest["source"] == "scene") & (manifest["split"] == split)]
    images = load_images([f"scenes{image_size}.npz"] * len(part), part["index"].tolist(), data_dir)
    return images, [list(c) for c in part["captions"]]


def batch_at(images: np.ndarray, captions: list[list[list[int]]], batch_size: int, seed: int, step: int,
             c: CaptionConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step `step`'s (images, decoder input, decoder target): scenes and one caption each, from (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randint(len(images), (batch_size,), generator=g).tolist()
    pick = torch.randint(1 << 30, (batch_size,), generator=g).tolist()
    rows = [captions[i][k % len(captions[i])] for i, k in zip(idx, pick)]
    return (to_tensor(images[idx], c.image_size), *teacher_forcing(rows, c))


@torch.no_grad()
def held_out_loss(model: CaptionModel, images, captions, cfg: CapTrainConfig) -> float:
    """Mean loss (no label smoothing) on fixed val batches, the same at every eval."""
    model.eval()
    losses = [model(*batch_at(images, captions, cfg.batch_size, cfg.seed + 7, i, model.config))[1]
              for i in range(cfg.eval_batches)]
    model.train()
    return torch.stack(losses).mean().item()


def train_variant(cfg: CapTrainConfig, variant: str, words: list[str], data: dict, log=None) -> dict:
    """Train (or resume) one variant to max_steps; write its model folder; return its summary."""
    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model_config(variant, len(words))
    model = CaptionModel(model_cfg)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    root = cfg.checkpoint_root() / variant
    step, history = 0, {"train": [], "val": []}
    meta = resume_training_state(root, model, optimizer, model_cfg, stage=f"cap_train/{variant}")
    if meta is not None:
        step, history = meta["step"], meta["history"]
    resumed_at = step if meta is not None else -1
    model.train()
    (train_x, train_c), (val_x, val_c) = data["train"], data["val"]

    def save() -> None:
        save_training_state(root, step, model, optimizer, model_cfg, cfg, history, {"step": step},
                            keep=cfg.keep_checkpoints)

    t_start = t_last = time.perf_counter()
    while step < cfg.max_steps:
        # ---- learning rate
        lr = warmup_cosine(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # ---- checkpoint (state before this step's update; done already if we resumed here)
        if step > 0 and step != resumed_at and step % cfg.ckpt_interval == 0:
            history["val"].append([step, held_out_loss(model, val_x, val_c, cfg)])
            save()

        # ---- one step
        images, tgt_in, tgt_out = batch_at(train_x, train_c, cfg.batch_size, cfg.seed, step, model_cfg)
        _, loss = model(images, tgt_in, tgt_out, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not (math.isfinite(loss.item()) and math.isfinite(float(grad_norm))):
            raise FloatingPointError(f"cap_train/{variant}: non-finite loss or grad norm at step {step}")
        optimizer.step()
        step += 1
        history["train"].append([step, loss.item()])

        # ---- log
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            print(f"cap_train/{variant} step {step}/{cfg.max_steps} loss {loss.item():.4f} lr {lr:.2e} "
                  f"{(now - t_last) / cfg.log_interval:.3f} s/step", flush=True)
            if log:
                log(step, {f"{variant}.loss": loss.item(), f"{variant}.lr": lr})
            t_last = now
    if step != resumed_at:
        history["val"].append([step, held_out_loss(model, val_x, val_c, cfg)])
        save()
    out = Path(cfg.out_dir) / variant
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(asdict(model_cfg), indent=2))
    (out / "vocab.json").write_text(json.dumps(words))
    (out / "history.json").write_text(json.dumps(history))
    summary = {"steps": step, "val_loss": history["val"][-1][1], "params": model.num_params(),
               "train_seconds": time.perf_counter() - t_start, "resumed_at": resumed_at}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def cap_train(cfg: CapTrainConfig, log=None) -> dict:
    check_gate(cfg.validation, cfg.manifest, "manifest_sha256")
    manifest = pd.read_parquet(cfg.manifest)
    data_dir = Path(cfg.manifest).parent
    raw = {s: scene_split(manifest, s, cfg.image_size, data_dir) for s in ("train", "val")}
    words = build_vocab([c for caps in raw["train"][1] for c in caps])
    index = {w: i for i, w in enumerate(words)}
    data = {s: (x, [[encode_caption(c, index, cfg.max_len) for c in caps] for caps in cs]) for s, (x, cs) in raw.items()}
    summary = {"variants": {}, "vocab_size": len(words), "train_scenes": len(raw["train"][0]),
               "image_size": cfg.image_size}
    for variant in cfg.variants:
        summary["variants"][variant] = train_variant(cfg, variant, words, data, log)
    return summary


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(CapTrainConfig, "cap_train", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        try:
            summary = cap_train(cfg, log=lambda step, m: mlflow.log_metrics(m, step=step))
        except GateClosed as e:
            print(f"cap_train: REFUSED\n{e}", file=sys.stderr)
            sys.exit(1)
        mlflow.log_metrics({f"{v}.{k}": float(x) for v, r in summary["variants"].items() for k, x in r.items()})
    print(json.dumps(summary))


@task(name="cap_train", retries=1, retry_delay_seconds=10)  # a retry resumes from the last checkpoint
def cap_train_task(run: dict[str, str]) -> dict:
    return run_stage("cap_train", **run)


if __name__ == "__main__":
    main()
