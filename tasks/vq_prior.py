"""vq_prior: the autoregressive prior over VQ-VAE tokens, the project's GPT (models/gpt.py) in raster order.

Tokenises the train images with vq_train's VQ-VAE (an 8x8 grid -> 64 codes in raster order, row by
row) and trains a decoder-only GPT on [START] + codes, START = codebook_size (vocab = codebook_size
+ 1), next-token cross-entropy on the codes only. Positions (`positions`): 1d = the GPT's own 1D ones
(`pos_encoding`; the raster index); 2d = those plus a row and a column encoding per code
(`grid_encoding`: learned or sincos; GPTConfig.pos_2d with grid_start 1, after START). Reports the held-out negative log-likelihood on test images as bits per token and
bits per dimension (the image's total bits over its 3 x S x S pixel values, as the VQ-VAE papers'
prior figures). Refuses to start unless img_validate passed on this very manifest.

One linear loop (tasks/pretrain.py's shape, copied small): a batch is a pure function of (seed,
step); full-state checkpoints under checkpoints/vq_prior/<key>/ and resume. Writes data/vq_prior/:
config.json + model.safetensors (load with forgeline.checkpoint.load_model_folder), prior.json (the
start token, the grid, the positions, the VQ-VAE it reads; config.json's pos_2d/grid_* fields
are GPTConfig's, absent (= 1D) in folders written before them), history.json, metrics.json. Sampling and decoding to
pixels are vq_eval's (through models/sampling.py).

    python -m tasks.vq_prior [key=value ...]
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from prefect import task
from safetensors.torch import save_model

from forgeline.checkpoint import checkpoint_key, load_model_folder, resume_training_state, save_training_state
from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.expectations import GateClosed, check_gate
from forgeline.images import load_images, to_tensor
from forgeline.schedule import warmup_cosine
from forgeline.workspace import run_stage
from models.gpt import GPT, PRESETS, GPTConfig
from models.vqvae import VQVAE, VQVAEConfig


@dataclass
class VqPriorConfig:
    manifest: str = "data/img_data/manifest.parquet"
    validation: str = "data/img_validate/result.json"   # the gate: img_validate's verdict on this manifest
    vqvae: str = "data/vq_train"
    out_dir: str = "data/vq_prior"
    ckpt_dir: str = "checkpoints/vq_prior"
    domain: str = "fashion"            # fashion | scenes: vq_train's
    train_images: int = 20000          # tokenised train images (0 = all)
    test_images: int = 1000            # held-out images for bits per dimension
    preset: str = "tiny"
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    pos_encoding: str = "learned"      # 1D raster positions: learned, rope or sincos
    positions: str = "1d"              # 1d | 2d: 2d adds row + column encodings of the code grid
    grid_encoding: str = "learned"     # with positions 2d: learned or sincos
    dropout: float = 0.0
    batch_size: int = 32
    max_steps: int = 800
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    ckpt_interval: int = 200
    keep_checkpoints: int = 2
    log_interval: int = 100
    seed: int = 1337

    def check(self) -> None:
        for name in ("batch_size", "max_steps", "ckpt_interval", "log_interval", "test_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"vq_prior: {name} must be >= 1")
        if self.preset not in PRESETS:
            raise ConfigError(f"vq_prior: preset {self.preset!r}: one of {sorted(PRESETS)}")
        if self.pos_encoding not in ("learned", "rope", "sincos"):
            raise ConfigError(f"vq_prior: pos_encoding={self.pos_encoding!r}: learned, rope or sincos")
        if self.positions not in ("1d", "2d") or self.grid_encoding not in ("learned", "sincos"):
            raise ConfigError(f"vq_prior: positions={self.positions!r} (1d or 2d), "
                              f"grid_encoding={self.grid_encoding!r} (learned or sincos)")
        if self.domain not in ("fashion", "scenes"):
            raise ConfigError(f"vq_prior: domain={self.domain!r}: fashion or scenes")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("vq_prior: need 0 <= min_lr <= lr")

    def model_config(self, vq: VQVAEConfig) -> GPTConfig:
        return GPTConfig.from_preset(self.preset, vocab_size=vq.codebook_size + 1, block_size=vq.tokens + 1,
                                     n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head,
                                     pos_encoding=self.pos_encoding, dropout=self.dropout,
                                     pos_2d=self.grid_encoding if self.positions == "2d" else "none",
                                     grid_h=vq.grid, grid_w=vq.grid, grid_start=1)   # the codes follow START

    def checkpoint_root(self) -> Path:
        skip = {"out_dir", "ckpt_dir", "log_interval", "keep_checkpoints", "validation", "test_images"}
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        inputs = [Path(self.manifest), Path(self.vqvae) / "model.safetensors"]
        return Path(self.ckpt_dir) / checkpoint_key(settings, inputs)


def tokenise(vq: VQVAE, images: np.ndarray, batch: int = 500) -> torch.Tensor:
    """uint8 images -> (N, tokens) codes in raster order (row by row of the grid)."""
    return torch.cat([vq.encode(to_tensor(images[i:i + batch], vq.config.image_size)).flatten(1)
                      for i in range(0, len(images), batch)])


def with_start(codes: torch.Tensor, start: int) -> torch.Tensor:
    """(N, T) codes -> (N, T + 1) sequences [START, c_0, ..., c_{T-1}]."""
    return torch.cat([torch.full((len(codes), 1), start, dtype=codes.dtype), codes], 1)


@torch.no_grad()
def nll_nats(model: GPT, seqs: torch.Tensor, batch: int = 250) -> float:
    """Mean next-token NLL (nats) of the codes of `seqs` (N, T + 1), the START token given."""
    model.eval()
    total = 0.0
    for i in range(0, len(seqs), batch):
        s = seqs[i:i + batch]
        _, loss = model(s[:, :-1], s[:, 1:])
        total += loss.item() * len(s)
    model.train()
    return total / len(seqs)


def vq_prior(cfg: VqPriorConfig, log=None) -> dict:
    check_gate(cfg.validation, cfg.manifest, "manifest_sha256")
    manifest = pd.read_parquet(cfg.manifest)
    data_dir = Path(cfg.manifest).parent
    vq = load_model_folder(cfg.vqvae, VQVAE, config_cls=VQVAEConfig)
    source = "fashion" if cfg.domain == "fashion" else "scene"

    def split(name: str, n: int) -> np.ndarray:
        part = manifest[(manifest["source"] == source) & (manifest["split"] == name)]
        part = part.iloc[:n] if n else part
        files = part["file"].tolist() if cfg.domain == "fashion" else [f"scenes{vq.config.image_size}.npz"] * len(part)
        return load_images(files, part["index"].tolist(), data_dir)

    t0 = time.perf_counter()
    start = vq.config.codebook_size
    train = with_start(tokenise(vq, split("train", cfg.train_images)), start)
    test = with_start(tokenise(vq, split("test", cfg.test_images)), start)
    tokenise_seconds = time.perf_counter() - t0

    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model_config(vq.config)
    model = GPT(model_cfg)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (0.9, 0.95))
    root = cfg.checkpoint_root()
    step, history = 0, {"train": [], "test": []}
    meta = resume_training_state(root, model, optimizer, model_cfg, stage="vq_prior")
    if meta is not None:
        step, history = meta["step"], meta["history"]
    resumed_at = step if meta is not None else -1
    model.train()

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
            history["test"].append([step, nll_nats(model, test)])
            save()

        # ---- one step: a batch of whole images, a pure function of (seed, step)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        seqs = train[torch.randint(len(train), (cfg.batch_size,), generator=g)]
        _, loss = model(seqs[:, :-1], seqs[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not (math.isfinite(loss.item()) and math.isfinite(float(grad_norm))):
            raise FloatingPointError(f"vq_prior: non-finite loss or grad norm at step {step}")
        optimizer.step()
        step += 1
        history["train"].append([step, loss.item()])

        # ---- log
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            print(f"vq_prior step {step}/{cfg.max_steps} loss {loss.item():.4f} lr {lr:.2e} "
                  f"{(now - t_last) / cfg.log_interval:.3f} s/step", flush=True)
            if log:
                log(step, {"loss": loss.item(), "lr": lr})
            t_last = now
    if step != resumed_at:
        history["test"].append([step, nll_nats(model, test)])
        save()
    train_seconds = time.perf_counter() - t_start

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(asdict(model_cfg), indent=2))
    (out / "prior.json").write_text(json.dumps({"start_token": start, "grid": vq.config.grid, "order": "raster",
                                                "positions": cfg.positions,
                                                "vqvae": cfg.vqvae, "domain": cfg.domain}, indent=2))
    (out / "history.json").write_text(json.dumps(history))
    nats = history["test"][-1][1]
    dims = 3 * vq.config.image_size ** 2
    metrics = {"test_nll_nats_per_token": nats, "test_bits_per_token": nats / math.log(2),
               "test_bits_per_dim": nats / math.log(2) * vq.config.tokens / dims, "pixel_dims": dims,
               "uniform_bits_per_token": math.log2(vq.config.codebook_size),
               "train_nll_nats_per_token": nll_nats(model, train[:len(test)]),
               "train_images": len(train), "test_images": len(test), "steps": step, "params": model.num_params(),
               "tokenise_seconds": tokenise_seconds, "train_seconds": train_seconds, "resumed_at": resumed_at}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(VqPriorConfig, "vq_prior", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        try:
            metrics = vq_prior(cfg, log=lambda step, m: mlflow.log_metrics(m, step=step))
        except GateClosed as e:
            print(f"vq_prior: REFUSED\n{e}", file=sys.stderr)
            sys.exit(1)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    print(json.dumps(metrics))


@task(name="vq_prior", retries=1, retry_delay_seconds=10)  # a retry resumes from the last checkpoint
def vq_prior_task(run: dict[str, str]) -> dict:
    return run_stage("vq_prior", **run)


if __name__ == "__main__":
    main()
