"""t2i_train: the text-to-image diffusion model (models/diffusion.py) on the captioned scenes at 32x32.

A transformer text encoder over the caption's words (models/text_encoder.py) and a U-Net denoiser
with cross-attention to its states (models/unet.py), trained together on the DDPM loss (predict the
noise at a uniform timestep); each sample takes one of its scene's six reference captions at random,
and with probability `p_uncond` the empty caption (classifier-free guidance). The weights kept are
an exponential moving average of the trained ones (`ema`). Refuses to start unless img_validate
passed on this very manifest.

One linear loop (tasks/vq_train.py's shape): a batch is a pure function of (seed, step); full-state
checkpoints (weights, EMA, optimizer, every RNG) under checkpoints/t2i_train/<key>/ and resume.
Writes the model folder data/t2i_train/: model.safetensors (EMA weights) + config.json (T2IConfig) +
vocab.json, history.json, metrics.json and loss_curve.png.

    python -m tasks.t2i_train [key=value ...]
"""
from __future__ import annotations

import copy
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

from forgeline import scenes
from forgeline.checkpoint import checkpoint_key, resume_training_state, save_training_state
from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.expectations import GateClosed, check_gate
from forgeline.images import load_images, to_tensor
from forgeline.schedule import warmup_cosine
from forgeline.workspace import run_stage
from models.diffusion import T2IConfig, TextToImage
from models.text_encoder import build_vocab, encode_captions


@dataclass
class T2iTrainConfig:
    manifest: str = "data/img_data/manifest.parquet"
    validation: str = "data/img_validate/result.json"   # the gate: img_validate's verdict on this manifest
    out_dir: str = "data/t2i_train"
    ckpt_dir: str = "checkpoints/t2i_train"
    image_size: int = 32
    timesteps: int = 1000
    schedule: str = "cosine"           # cosine | linear
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    base: int = 32
    mults: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res: int = 1
    attn_levels: list[int] = field(default_factory=lambda: [2])
    p_uncond: float = 0.1
    min_snr_gamma: float = 5.0         # Hang et al.'s loss weighting; 0 = the plain DDPM loss
    batch_size: int = 32
    max_steps: int = 1000
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.995                 # 0: keep the trained weights
    threads: int = 2
    ckpt_interval: int = 250
    keep_checkpoints: int = 2
    log_interval: int = 100
    val_images: int = 256              # held-out loss at the end (val split, fixed timesteps and noise)
    seed: int = 1337

    def check(self) -> None:
        for name in ("batch_size", "max_steps", "ckpt_interval", "log_interval", "timesteps", "base", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"t2i_train: {name} must be >= 1")
        if self.schedule not in ("cosine", "linear"):
            raise ConfigError(f"t2i_train: schedule={self.schedule!r}: cosine or linear")
        if self.image_size % 2 ** (len(self.mults) - 1):
            raise ConfigError("t2i_train: image_size must be divisible by 2**(len(mults) - 1)")
        if self.min_snr_gamma < 0:
            raise ConfigError("t2i_train: min_snr_gamma must be >= 0 (0 = the plain DDPM loss)")
        if not 0 <= self.p_uncond < 1 or not 0 <= self.ema < 1:
            raise ConfigError("t2i_train: need 0 <= p_uncond < 1 and 0 <= ema < 1")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("t2i_train: need 0 <= min_lr <= lr")

    def model_config(self, vocab_size: int) -> T2IConfig:
        return T2IConfig(vocab_size=vocab_size, image_size=self.image_size, timesteps=self.timesteps,
                         schedule=self.schedule,
                         text={"d_model": self.text_dim, "n_heads": self.text_heads, "n_layers": self.text_layers,
                               "d_ff": 2 * self.text_dim, "max_len": 32},
                         unet={"base": self.base, "mults": list(self.mults), "num_res": self.num_res,
                               "attn_levels": list(self.attn_levels), "heads": 4})

    def checkpoint_root(self) -> Path:
        skip = {"out_dir", "ckpt_dir", "log_interval", "keep_checkpoints", "validation", "val_images", "threads",
                "ckpt_interval"}   # none of these changes the weights
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        return Path(self.ckpt_dir) / checkpoint_key(settings, [Path(self.manifest)])


def scene_split(manifest: pd.DataFrame, split: str, data_dir: Path) -> tuple[np.ndarray, list[list[str]]]:
    """uint8 (N, 32, 32, 3) pixels of the scenes of one split (scenes32.npz) and their six captions each."""
    part = manifest[(manifest["source"] == "scene") & (manifest["split"] == split)]
    images = load_images(["scenes32.npz"] * len(part), part["index"].tolist(), data_dir)
    return images, [list(c) for c in part["captions"]]


def batch_at(n: int, batch_size: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """Step `step`'s rows, which of each row's six captions, and the generator for its timesteps,
    noise and caption drops: a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(n, (batch_size,), generator=g), torch.randint(6, (batch_size,), generator=g), g


@torch.no_grad()
def val_loss(model: TextToImage, images: np.ndarray, caps: list[list[str]], vocab: list[str], seed: int) -> float:
    """The DDPM loss on held-out scenes (first captions), with fixed timesteps and noise: comparable across runs."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for i in range(0, len(images), 128):
        x0 = to_tensor(images[i:i + 128], model.config.image_size)
        ids = encode_captions([c[0] for c in caps[i:i + 128]], vocab, model.config.text_config().max_len)
        total += model.loss(x0, ids, p_uncond=0.0, generator=g).item() * len(x0)
    model.train()
    return total / max(len(images), 1)


def plot_loss(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*history["train"])
    k = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=0.5, alpha=0.4, label="train (per step)")
    ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"train ({k}-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("noise-prediction MSE")
    ax.set_yscale("log")
    ax.set_title("t2i_train: DDPM loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def t2i_train(cfg: T2iTrainConfig, log=None) -> dict:
    check_gate(cfg.validation, cfg.manifest, "manifest_sha256")
    torch.set_num_threads(cfg.threads)
    manifest = pd.read_parquet(cfg.manifest)
    data_dir = Path(cfg.manifest).parent
    train_x, train_caps = scene_split(manifest, "train", data_dir)
    vocab = build_vocab(scenes.VISUAL_WORDS)
    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model_config(len(vocab))
    model = TextToImage(model_cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    both = torch.nn.ModuleDict({"model": model, "ema": ema})
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
    root = cfg.checkpoint_root()
    step, history = 0, {"train": []}
    meta = resume_training_state(root, both, opt, model_cfg, stage="t2i_train")
    if meta is not None:
        step, history = meta["step"], meta["history"]
    resumed_at = step if meta is not None else -1
    model.train()
    max_len = model_cfg.text_config().max_len

    def save() -> None:
        save_training_state(root, step, both, opt, model_cfg, cfg, history, {"step": step}, keep=cfg.keep_checkpoints)

    t_start = t_last = time.perf_counter()
    while step < cfg.max_steps:
        # ---- learning rate
        lr = warmup_cosine(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr

        # ---- checkpoint (state before this step's update; done already if we resumed here)
        if step > 0 and step != resumed_at and step % cfg.ckpt_interval == 0:
            save()

        # ---- one step: a random caption of each scene, dropped to the empty one with p_uncond
        idx, which, g = batch_at(len(train_x), cfg.batch_size, cfg.seed, step)
        x0 = to_tensor(train_x[idx.numpy()], cfg.image_size)
        ids = encode_captions([train_caps[i][j] for i, j in zip(idx.tolist(), which.tolist())], vocab, max_len)
        loss = model.loss(x0, ids, cfg.p_uncond, generator=g, min_snr_gamma=cfg.min_snr_gamma)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"t2i_train: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

        # ---- EMA of the weights (warmed up: early steps average over fewer steps)
        d = min(cfg.ema, (1 + step) / (10 + step)) if cfg.ema else 0.0
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - d)
        step += 1
        history["train"].append([step, round(loss.item(), 5)])

        # ---- log
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            recent = [v for _, v in history["train"][-cfg.log_interval:]]
            print(f"t2i_train step {step}/{cfg.max_steps} loss {sum(recent) / len(recent):.4f} lr {lr:.2e} "
                  f"{(now - t_last) / cfg.log_interval:.3f} s/step", flush=True)
            if log:
                log(step, {"loss": loss.item(), "lr": lr})
            t_last = now
    if step != resumed_at:
        save()
    train_seconds = time.perf_counter() - t_start

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(ema, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(asdict(model_cfg), indent=2))
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "history.json").write_text(json.dumps(history))
    plot_loss(history, out / "loss_curve.png")
    val_x, val_caps = scene_split(manifest, "val", data_dir)
    tail = [v for _, v in history["train"][-100:]]
    metrics = {"steps": step, "params": model.num_params(), "text_params": sum(p.numel() for p in model.text.parameters()),
               "train_images": len(train_x), "train_seconds": train_seconds, "resumed_at": resumed_at,
               "seconds_per_step": train_seconds / max(1, step - max(resumed_at, 0)),
               "train_loss_last100": sum(tail) / max(1, len(tail)),
               "val_loss": val_loss(ema, val_x[:cfg.val_images], val_caps[:cfg.val_images], vocab, cfg.seed)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(T2iTrainConfig, "t2i_train", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        try:
            metrics = t2i_train(cfg, log=lambda step, m: mlflow.log_metrics(m, step=step))
        except GateClosed as e:
            print(f"t2i_train: REFUSED\n{e}", file=sys.stderr)
            sys.exit(1)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        for name in ("metrics.json", "loss_curve.png"):
            mlflow.log_artifact(str(Path(cfg.out_dir) / name))
    print(json.dumps(metrics))


@task(name="t2i_train", retries=1, retry_delay_seconds=10)  # a retry resumes from the last checkpoint
def t2i_train_task(run: dict[str, str]) -> dict:
    return run_stage("t2i_train", **run)


if __name__ == "__main__":
    main()
