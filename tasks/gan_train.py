"""gan_train: DCGAN on the faces or on Fashion-MNIST (models/gan.py), one run per loss on the same budget.

`domain` picks the images: `faces` (gan_data's renders, scored through gan_eval_net's joint head) or
`fashion` (the Fashion-MNIST rows of img_data's manifest, 28x28 grey resized to `image_size` and
repeated to RGB, scored through img_eval_net's fashion network and its 10-class head); the pipeline
runs this module twice, as gan_train and as gan_fashion_train (configs/gan_fashion_train.yaml).

Each loss in `losses` (minimax, nonsaturating, wgan-gp) trains its own generator and discriminator
(the critic for wgan-gp) from the same seed for `steps` generator steps, each after `d_steps`
discriminator steps (`critic_steps` for wgan-gp, as Gulrajani et al. train the critic more), so
gan_eval's table compares losses alone. The chapter's stability aids are options: separate
learning rates (`lr_g`, `lr_d`), instance noise on the discriminator's inputs (std `instance_noise`
annealed linearly to 0), weight decay. A batch (its real faces and its z) is a pure function of
(seed, step, k); every `eval_interval` steps FID and IS of `eval_samples` samples are measured
through the domain's evaluation network (forgeline/image_metrics.py), the curves that gan_eval plots.

Full-state checkpoints (G and D weights, both optimizers, RNGs, history) under
checkpoints/gan_train/<key>/<loss>/ (forgeline/checkpoint.py); a rerun resumes from the newest.
Writes data/gan_train/<loss>/: generator.safetensors + config.json (no pickle), history.json,
summary.json, and data/gan_train/curves.png (losses and FID per step, every loss).

    python -m tasks.gan_train [key=value ...]
    python -m tasks.gan_train config=configs/gan_fashion_train.yaml     # the gan_fashion_train stage
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
import torch.nn as nn
from prefect import task
from safetensors.torch import save_model

from forgeline.checkpoint import checkpoint_key, resume_training_state, save_training_state
from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.image_metrics import extractor, generation_scores, load_eval_net
from forgeline.images import load_images, to_tensor
from forgeline.workspace import run_stage
from models.gan import LOSSES, Discriminator, GANConfig, Generator, d_loss, g_loss, gradient_penalty, init_weights, sample_z

HEADS = {"faces": "joint", "fashion": "class"}   # per domain, the eval net's head that IS reads


@dataclass
class GanTrainConfig:
    domain: str = "faces"               # faces | fashion (HEADS)
    data_dir: str = "data/gan_data"     # faces: gan_data's folder; fashion: img_data's (its manifest.parquet)
    eval_net: str = "data/gan_eval_net" # an eval net model folder (fashion: data/img_eval_net/fashion)
    out_dir: str = "data/gan_train"
    ckpt_dir: str = "checkpoints/gan_train"
    losses: list[str] = field(default_factory=lambda: list(LOSSES))
    image_size: int = 32
    z_dim: int = 64
    g_width: int = 32
    d_width: int = 32
    train_images: int = 0               # the first n of the train split; 0 = all of it
    batch_size: int = 64
    steps: int = 1000                   # generator steps per loss
    d_steps: int = 1                    # discriminator steps per generator step (minimax, nonsaturating)
    critic_steps: int = 3               # critic steps per generator step (wgan-gp)
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    wgan_betas: list[float] = field(default_factory=lambda: [0.0, 0.9])
    weight_decay: float = 0.0
    instance_noise: float = 0.0         # std at step 0 in [-1, 1] pixel units, annealed linearly to 0
    gp_weight: float = 10.0
    eval_interval: int = 250
    eval_samples: int = 500
    ckpt_interval: int = 250
    keep_checkpoints: int = 2
    log_interval: int = 100
    seed: int = 1337

    def check(self) -> None:
        for name in ("batch_size", "steps", "d_steps", "critic_steps", "eval_interval", "eval_samples",
                     "ckpt_interval", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"gan_train: {name} must be >= 1")
        if not self.losses or set(self.losses) - set(LOSSES):
            raise ConfigError(f"gan_train: losses must be a non-empty subset of {LOSSES}")
        if self.domain not in HEADS:
            raise ConfigError(f"gan_train: domain={self.domain!r}: one of {sorted(HEADS)}")
        if self.train_images < 0:
            raise ConfigError("gan_train: train_images >= 0 (0 = the whole train split)")
        if self.image_size not in (32, 64):
            raise ConfigError("gan_train: image_size is 32 or 64 (gan_data's two renders)")
        if self.instance_noise < 0 or self.weight_decay < 0 or len(self.wgan_betas) != 2:
            raise ConfigError("gan_train: instance_noise, weight_decay >= 0; wgan_betas = [beta1, beta2]")

    def checkpoint_root(self, loss: str) -> Path:
        skip = {"data_dir", "eval_net", "out_dir", "ckpt_dir", "losses", "log_interval", "keep_checkpoints"}
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        return Path(self.ckpt_dir) / checkpoint_key(settings, [Path(self.data_dir) / "manifest.parquet"]) / loss


class Pair(nn.Module):
    """G and D as one module, so one checkpoint holds both."""

    def __init__(self, g: Generator, d: Discriminator):
        super().__init__()
        self.g, self.d = g, d


class Optimizers:
    """Both optimizers behind one state_dict, for forgeline.checkpoint's training state."""

    def __init__(self, g: torch.optim.Optimizer, d: torch.optim.Optimizer):
        self.g, self.d = g, d

    def state_dict(self) -> dict:
        return {"g": self.g.state_dict(), "d": self.d.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.g.load_state_dict(state["g"])
        self.d.load_state_dict(state["d"])


def real_images(cfg: GanTrainConfig, split: str, limit: int = 0) -> torch.Tensor:
    """(N, 3, S, S) in [-1, 1]: the domain's split (its first `limit` rows if > 0) at the training size."""
    manifest = pd.read_parquet(Path(cfg.data_dir) / "manifest.parquet")
    if cfg.domain == "fashion":
        part = manifest[(manifest["source"] == "fashion") & (manifest["split"] == split)]
        part = part[:limit] if limit else part
        return to_tensor(load_images(part["file"].tolist(), part["index"].tolist(), cfg.data_dir), cfg.image_size)
    rows = manifest.loc[manifest["split"] == split, "index"].to_numpy()
    with np.load(Path(cfg.data_dir) / f"faces{cfg.image_size}.npz", allow_pickle=False) as z:
        return to_tensor(z["images"][rows[:limit] if limit else rows], cfg.image_size)


@torch.no_grad()
def sample(g: Generator, n: int, seed: int, threshold: float | None = None, batch: int = 500) -> torch.Tensor:
    """n images from G in eval mode (BatchNorm running statistics), z drawn from `seed`."""
    was = g.training
    g.eval()
    z = sample_z(n, g.z_dim, threshold, torch.Generator().manual_seed(seed))
    out = torch.cat([g(z[i:i + batch]) for i in range(0, n, batch)])
    g.train(was)
    return out


def train_loss(cfg: GanTrainConfig, loss: str, train_x: torch.Tensor, scorer=None, log=None) -> dict:
    """Train (or resume) one loss's G and D to cfg.steps; write its folder; return its summary."""
    torch.manual_seed(cfg.seed)
    wgan = loss == "wgan-gp"
    mcfg = GANConfig(image_size=cfg.image_size, z_dim=cfg.z_dim, g_width=cfg.g_width, d_width=cfg.d_width, critic=wgan)
    g, d = Generator(mcfg), Discriminator(mcfg)
    g.apply(init_weights)
    d.apply(init_weights)
    pair = Pair(g, d)
    betas = tuple(cfg.wgan_betas) if wgan else (cfg.beta1, cfg.beta2)
    opt = Optimizers(torch.optim.Adam(g.parameters(), cfg.lr_g, betas=betas, weight_decay=cfg.weight_decay),
                     torch.optim.Adam(d.parameters(), cfg.lr_d, betas=betas, weight_decay=cfg.weight_decay))
    k = cfg.critic_steps if wgan else cfg.d_steps
    root = cfg.checkpoint_root(loss)
    step, history = 0, {"train": [], "eval": []}
    meta = resume_training_state(root, pair, opt, mcfg, stage=f"gan_train/{loss}")
    if meta is not None:
        step, history = meta["step"], meta["history"]
    resumed_at = step if meta is not None else -1

    def save() -> None:
        history["seconds"] = seconds_before + time.perf_counter() - t_start   # training time over all runs
        save_training_state(root, step, pair, opt, mcfg, cfg, history, {"step": step}, keep=cfg.keep_checkpoints)

    seconds_before = history.get("seconds", 0.0)
    t_start = t_last = time.perf_counter()
    g.train()
    d.train()
    while step < cfg.steps:
        # ---- checkpoint (the state before this step; done already if we resumed here)
        if step > 0 and step != resumed_at and step % cfg.ckpt_interval == 0:
            save()
        sigma = cfg.instance_noise * (1 - step / cfg.steps)

        # ---- k discriminator steps: real batch and z are a pure function of (seed, step, i)
        for i in range(k):
            rng = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 16 + i)
            real = train_x[torch.randint(len(train_x), (cfg.batch_size,), generator=rng)]
            with torch.no_grad():
                fake = g(sample_z(cfg.batch_size, cfg.z_dim, generator=rng))
            if sigma > 0:
                real = real + sigma * torch.randn(real.shape, generator=rng)
                fake = fake + sigma * torch.randn(fake.shape, generator=rng)
            real_s, fake_s = d.logit(real), d.logit(fake)
            loss_d = d_loss(loss, real_s, fake_s)
            if wgan:
                loss_d = loss_d + cfg.gp_weight * gradient_penalty(d.logit, real, fake, rng)
            opt.d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt.d.step()

        # ---- one generator step
        rng = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 16 + 15)
        fake = g(sample_z(cfg.batch_size, cfg.z_dim, generator=rng))
        if sigma > 0:
            fake = fake + sigma * torch.randn(fake.shape, generator=rng)
        loss_g = g_loss(loss, d.logit(fake))
        opt.g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt.g.step()
        step += 1
        if not (math.isfinite(loss_d.item()) and math.isfinite(loss_g.item())):
            raise FloatingPointError(f"gan_train/{loss}: non-finite loss at step {step}")
        row = [step, loss_d.item(), loss_g.item(), real_s.mean().item(), fake_s.mean().item()]
        history["train"].append(row)

        # ---- log, and FID/IS over training
        if step % cfg.log_interval == 0 or step == cfg.steps:
            now = time.perf_counter()
            print(f"gan_train/{loss} step {step}/{cfg.steps} d {row[1]:.4f} g {row[2]:.4f} "
                  f"{(now - t_last) / cfg.log_interval:.3f} s/step", flush=True)
            if log:
                log(step, {f"{loss}.d_loss": row[1], f"{loss}.g_loss": row[2]})
            t_last = now
        if scorer is not None and (step % cfg.eval_interval == 0 or step == cfg.steps):
            scores = scorer(sample(g, cfg.eval_samples, cfg.seed + 1))
            history["eval"].append([step, scores["fid"], scores["inception_score"]])
            print(f"gan_train/{loss} step {step}: FID {scores['fid']:.2f} IS {scores['inception_score']:.2f}", flush=True)
            if log:
                log(step, {f"{loss}.fid": scores["fid"], f"{loss}.is": scores["inception_score"]})
    if step != resumed_at:
        save()
    out = Path(cfg.out_dir) / loss
    out.mkdir(parents=True, exist_ok=True)
    save_model(g, str(out / "generator.safetensors"))
    (out / "config.json").write_text(json.dumps(asdict(mcfg), indent=2))
    (out / "history.json").write_text(json.dumps(history))
    summary = {"steps": step, "d_steps_per_g_step": k, "generator_params": sum(p.numel() for p in g.parameters()),
               "discriminator_params": sum(p.numel() for p in d.parameters()),
               "train_seconds": history.get("seconds", 0.0), "resumed_at": resumed_at,
               "last_fid": history["eval"][-1][1] if history["eval"] else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def plot_curves(histories: dict[str, dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.5))
    ax_d, ax_g, ax_f = fig.subplots(1, 3)
    for loss, h in histories.items():
        t = np.array(h["train"])
        if len(t):
            w = max(1, len(t) // 50)  # moving average over ~2 % of the run
            smooth = lambda v: np.convolve(v, np.ones(w) / w, mode="valid")  # noqa: E731
            ax_d.plot(t[w - 1:, 0], smooth(t[:, 1]), label=loss)
            ax_g.plot(t[w - 1:, 0], smooth(t[:, 2]), label=loss)
        if h["eval"]:
            e = np.array(h["eval"])
            ax_f.plot(e[:, 0], e[:, 1], marker="o", label=loss)
    for ax, title in ((ax_d, "discriminator loss"), (ax_g, "generator loss"), (ax_f, "FID (lower is better)")):
        ax.set_title(title)
        ax.set_xlabel("generator step")
        ax.legend()
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))


def gan_train(cfg: GanTrainConfig, log=None) -> dict:
    train_x = real_images(cfg, "train", cfg.train_images)
    net = load_eval_net(cfg.eval_net)
    ext = extractor(net, HEADS[cfg.domain], cfg.eval_net)
    real = real_images(cfg, "test", 1000)
    scorer = lambda fake: generation_scores(ext, real, fake)  # noqa: E731
    summary = {"domain": cfg.domain, "losses": {}, "train_images": len(train_x), "image_size": cfg.image_size}
    for loss in cfg.losses:
        summary["losses"][loss] = train_loss(cfg, loss, train_x, scorer, log)
    histories = {loss: json.loads((Path(cfg.out_dir) / loss / "history.json").read_text()) for loss in cfg.losses}
    plot_curves(histories, Path(cfg.out_dir) / "curves.png")
    return summary


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(GanTrainConfig, "gan_train", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        summary = gan_train(cfg, log=lambda step, m: mlflow.log_metrics(m, step=step))
        mlflow.log_metrics({f"{loss}.{k}": float(v) for loss, r in summary["losses"].items() for k, v in r.items()
                            if v is not None})
        mlflow.log_artifact(str(Path(cfg.out_dir) / "curves.png"))
    print(json.dumps(summary))


@task(name="gan_train", task_run_name="{stage}", retries=1, retry_delay_seconds=10)  # a retry resumes
def gan_train_task(run: dict[str, str], stage: str = "gan_train") -> dict:
    return run_stage(stage, **run)


if __name__ == "__main__":
    main()
