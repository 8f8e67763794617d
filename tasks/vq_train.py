"""vq_train: the VQ-VAE image tokenizer (models/vqvae.py) on Fashion-MNIST or the scenes at 32x32.

Loss = L1 + MSE reconstruction + codebook + commitment + `perceptual_weight` x the perceptual distance
through the frozen evaluation network of the same domain (img_eval_net's trunk) + after `adv_start`
steps `adv_weight` x the patch discriminator's adversarial term (hinge losses; the discriminator
trains from `adv_start` on). Every `restart_interval` steps, codes whose usage share fell below
`dead_threshold` / codebook_size are restarted on encoder outputs of the batch. Refuses to start
unless img_validate passed on this very manifest.

One linear loop (tasks/img_eval_net.py's shape): a batch is a pure function of (seed, step);
full-state checkpoints (both networks, both optimizers, every RNG) under checkpoints/vq_train/<key>/
and resume. Writes data/vq_train/: model.safetensors + config.json (VQVAEConfig), history.json and
metrics.json (reconstruction MSE and PSNR on val and test, codebook usage and perplexity).

    python -m tasks.vq_train [key=value ...]
    python -m tasks.vq_train config=configs/t2i_vq.yaml    # the t2i pipeline's scene tokenizer (data/t2i_vq/)
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
import torch.nn.functional as F
from prefect import task
from safetensors.torch import save_model

from forgeline.checkpoint import (checkpoint_key, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                                  set_rng_state)
from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.expectations import GateClosed, check_gate
from forgeline.image_metrics import load_eval_net
from forgeline.images import load_images, to_tensor
from forgeline.schedule import warmup_cosine
from forgeline.workspace import run_stage
from models.vqvae import (VQVAE, PatchDiscriminator, VQVAEConfig, code_stats, generator_adv_loss, hinge_d_loss,
                          perceptual_loss)


@dataclass
class VqTrainConfig:
    manifest: str = "data/img_data/manifest.parquet"
    validation: str = "data/img_validate/result.json"   # the gate: img_validate's verdict on this manifest
    eval_net: str = "data/img_eval_net"                 # <eval_net>/<fashion|scenes>: the perceptual network
    out_dir: str = "data/vq_train"
    ckpt_dir: str = "checkpoints/vq_train"
    domain: str = "fashion"            # fashion | scenes
    image_size: int = 32
    hidden: int = 64
    n_down: int = 2
    n_res: int = 1
    codebook_size: int = 128
    code_dim: int = 32
    beta: float = 0.25
    normalize: bool = True
    disc_width: int = 32
    perceptual_weight: float = 0.1
    adv_weight: float = 0.05
    adv_start: int = 400
    restart_interval: int = 50
    dead_threshold: float = 0.03
    batch_size: int = 64
    max_steps: int = 800
    lr: float = 2e-3
    min_lr: float = 1e-4
    disc_lr: float = 2e-4
    warmup_steps: int = 50
    ckpt_interval: int = 300
    keep_checkpoints: int = 2
    log_interval: int = 100
    eval_images: int = 1000
    seed: int = 1337

    def check(self) -> None:
        for name in ("batch_size", "max_steps", "ckpt_interval", "log_interval", "eval_images", "restart_interval",
                     "codebook_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"vq_train: {name} must be >= 1")
        if self.domain not in ("fashion", "scenes"):
            raise ConfigError(f"vq_train: domain={self.domain!r}: fashion or scenes")
        if self.image_size % 2 ** self.n_down:
            raise ConfigError("vq_train: image_size must be divisible by 2**n_down")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("vq_train: need 0 <= min_lr <= lr")

    def model_config(self) -> VQVAEConfig:
        return VQVAEConfig(image_size=self.image_size, hidden=self.hidden, n_down=self.n_down, n_res=self.n_res,
                           codebook_size=self.codebook_size, code_dim=self.code_dim, beta=self.beta,
                           normalize=self.normalize)

    def checkpoint_root(self) -> Path:
        skip = {"out_dir", "ckpt_dir", "log_interval", "keep_checkpoints", "validation", "eval_images"}
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        inputs = [Path(self.manifest), Path(self.eval_net) / self.domain / "model.safetensors"]
        return Path(self.ckpt_dir) / checkpoint_key(settings, inputs)


def domain_split(manifest: pd.DataFrame, domain: str, split: str, image_size: int, data_dir: Path) -> np.ndarray:
    """uint8 pixels of one domain's split: Fashion-MNIST from its package, scenes from scenes32/64.npz."""
    source = "fashion" if domain == "fashion" else "scene"
    part = manifest[(manifest["source"] == source) & (manifest["split"] == split)]
    files = part["file"].tolist() if domain == "fashion" else [f"scenes{64 if image_size > 32 else 32}.npz"] * len(part)
    return load_images(files, part["index"].tolist(), data_dir)


def batch_at(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Step `step`'s row indices: a pure function of (seed, step)."""
    return torch.randint(n, (batch_size,), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))


def psnr(mse_pm1: float) -> float:
    """PSNR in dB of an MSE measured on [-1, 1] pixels (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / max(mse_pm1, 1e-12))


@torch.no_grad()
def reconstruction(model: VQVAE, images: np.ndarray, size: int, batch: int = 500) -> dict[str, float]:
    """MSE on [-1, 1] and on [0, 1], PSNR, codebook usage and perplexity of the tokens of `images`."""
    model.eval()
    se, idx = 0.0, []
    for i in range(0, len(images), batch):
        x = to_tensor(images[i:i + batch], size)
        rec, tok, _ = model(x)
        se += F.mse_loss(rec, x, reduction="sum").item()
        idx.append(tok.flatten())
    model.train()
    mse = se / (len(images) * 3 * size * size)
    return {"mse": mse, "mse_01": mse / 4, "psnr": psnr(mse), "images": len(images),
            **code_stats(torch.cat(idx), model.config.codebook_size)}


def vq_train(cfg: VqTrainConfig, log=None) -> dict:
    check_gate(cfg.validation, cfg.manifest, "manifest_sha256")
    manifest = pd.read_parquet(cfg.manifest)
    data_dir = Path(cfg.manifest).parent
    train_x = domain_split(manifest, cfg.domain, "train", cfg.image_size, data_dir)
    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model_config()
    model, disc = VQVAE(model_cfg), PatchDiscriminator(cfg.disc_width)
    net = load_eval_net(Path(cfg.eval_net) / cfg.domain)
    net.requires_grad_(False)
    net_size = net.config.image_size

    def perceptual(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.size(-1) != net_size:
            a, b = (F.interpolate(t, size=(net_size, net_size), mode="bilinear", align_corners=False) for t in (a, b))
        return perceptual_loss(net.trunk, a, b)

    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))
    both = torch.nn.ModuleDict({"vqvae": model, "disc": disc})
    root = cfg.checkpoint_root()
    step, history, resumed_at = 0, {"train": []}, -1
    ckpt = latest_checkpoint(root)
    if ckpt is not None:
        meta = json.loads((ckpt / "meta.json").read_text())
        if meta["model_config"] != asdict(model_cfg):
            raise ValueError(f"{ckpt} holds another model config; move it away or set ckpt_dir")
        state, meta = load_checkpoint(ckpt, both)
        opt.load_state_dict(state["optimizer"])
        opt_d.load_state_dict(state["disc_optimizer"])
        set_rng_state(state["rng"])
        step, history, resumed_at = meta["step"], meta["history"], meta["step"]
        print(f"vq_train: resumed from {ckpt} at step {step}", flush=True)
    model.train()
    disc.train()

    def save() -> None:
        save_checkpoint(root, step, both, {"optimizer": opt.state_dict(), "disc_optimizer": opt_d.state_dict(),
                                           "rng": rng_state()},
                        {"history": history, "model_config": asdict(model_cfg), "train_config": asdict(cfg)},
                        keep=cfg.keep_checkpoints)

    t_start = t_last = time.perf_counter()
    while step < cfg.max_steps:
        # ---- learning rate
        lr = warmup_cosine(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr

        # ---- checkpoint (state before this step's update; done already if we resumed here)
        if step > 0 and step != resumed_at and step % cfg.ckpt_interval == 0:
            save()

        # ---- the autoencoder's step
        x = to_tensor(train_x[batch_at(len(train_x), cfg.batch_size, cfg.seed, step).numpy()], cfg.image_size)
        z_e = model.encoder(x)
        z_q, idx, vq = model.quantizer(z_e)
        rec = model.decoder(z_q)
        terms = {"l1": F.l1_loss(rec, x), "mse": F.mse_loss(rec, x), **vq}
        if cfg.perceptual_weight:
            terms["perceptual"] = cfg.perceptual_weight * perceptual(rec, x)
        adversarial = cfg.adv_weight > 0 and step >= cfg.adv_start
        if adversarial:
            terms["adv"] = cfg.adv_weight * generator_adv_loss(disc(rec))
        loss = sum(terms.values())
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"vq_train: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        # ---- the discriminator's step (after the warm-up)
        if adversarial:
            d_loss = hinge_d_loss(disc(x), disc(rec.detach()))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            terms["d_loss"] = d_loss

        # ---- dead codes take encoder outputs of this batch
        restarted = 0
        if (step + 1) % cfg.restart_interval == 0:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + 1)   # (seed, step): resumes alike
            restarted = model.quantizer.restart_dead(z_e.detach(), cfg.dead_threshold, g)
        step += 1
        history["train"].append([step, {k: round(v.item(), 5) for k, v in terms.items()} | {"restarted": restarted}])

        # ---- log
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            stats = code_stats(idx, cfg.codebook_size)
            print(f"vq_train step {step}/{cfg.max_steps} loss {loss.item():.4f} mse {terms['mse'].item():.4f} "
                  f"usage {stats['usage']:.2f} perplexity {stats['perplexity']:.1f} lr {lr:.2e} "
                  f"{(now - t_last) / cfg.log_interval:.3f} s/step", flush=True)
            if log:
                log(step, {"loss": loss.item(), "lr": lr, **{k: v.item() for k, v in terms.items()},
                           "batch_usage": stats["usage"], "batch_perplexity": stats["perplexity"]})
            t_last = now
    if step != resumed_at:
        save()
    train_seconds = time.perf_counter() - t_start

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(asdict(model_cfg), indent=2))
    (out / "history.json").write_text(json.dumps(history))
    metrics = {"domain": cfg.domain, "steps": step, "params": model.num_params(), "tokens_per_image": model_cfg.tokens,
               "train_images": len(train_x), "train_seconds": train_seconds, "resumed_at": resumed_at}
    for split in ("val", "test"):
        images = domain_split(manifest, cfg.domain, split, cfg.image_size, data_dir)[:cfg.eval_images]
        metrics[split] = reconstruction(model, images, cfg.image_size)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(VqTrainConfig, "vq_train", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        try:
            metrics = vq_train(cfg, log=lambda step, m: mlflow.log_metrics(m, step=step))
        except GateClosed as e:
            print(f"vq_train: REFUSED\n{e}", file=sys.stderr)
            sys.exit(1)
        mlflow.log_metrics({f"{s}.{k}": float(v) for s in ("val", "test") for k, v in metrics[s].items()})
        mlflow.log_artifact(str(Path(cfg.out_dir) / "metrics.json"))
    print(json.dumps({s: metrics[s] for s in ("val", "test")}))


@task(name="vq_train", task_run_name="{stage}", retries=1, retry_delay_seconds=10)  # a retry resumes
def vq_train_task(run: dict[str, str], stage: str = "vq_train") -> dict:
    """vq_train, or the same module as another stage (t2i_vq: configs/t2i_vq.yaml, the scene tokenizer)."""
    return run_stage(stage, **run)


if __name__ == "__main__":
    main()
