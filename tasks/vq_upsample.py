"""vq_upsample: the 2x super-resolution step (models/upsampler.py) on the VQ pipeline's images.

Pairs are made from the domain's train images: the image at image_size / 2 (antialiased bilinear,
forgeline/images.py's `to_tensor`) in, the image at image_size out; L1 loss. Reports PSNR on the
test images against bilinear and bicubic upsampling of the same inputs (what the network must beat).
vq_eval applies it to decoded samples (32 -> 64). Refuses to start unless img_validate passed.

One linear loop; a batch is a pure function of (seed, step); full-state checkpoints under
checkpoints/vq_upsample/<key>/ and resume. Writes data/vq_upsample/: model.safetensors,
config.json (UpsamplerConfig), metrics.json.

    python -m tasks.vq_upsample [key=value ...]
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

from forgeline.checkpoint import checkpoint_key, resume_training_state, save_training_state
from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.expectations import GateClosed, check_gate
from forgeline.images import load_images, to_tensor
from forgeline.workspace import run_stage
from models.upsampler import Upsampler, UpsamplerConfig


@dataclass
class VqUpsampleConfig:
    manifest: str = "data/img_data/manifest.parquet"
    validation: str = "data/img_validate/result.json"   # the gate: img_validate's verdict on this manifest
    out_dir: str = "data/vq_upsample"
    ckpt_dir: str = "checkpoints/vq_upsample"
    domain: str = "fashion"            # fashion | scenes
    image_size: int = 32               # the high resolution of training; inputs are half of it
    width: int = 32
    layers: int = 3
    batch_size: int = 64
    max_steps: int = 400
    lr: float = 2e-3
    ckpt_interval: int = 200
    keep_checkpoints: int = 2
    log_interval: int = 100
    eval_images: int = 1000
    seed: int = 1337

    def check(self) -> None:
        for name in ("batch_size", "max_steps", "ckpt_interval", "log_interval", "eval_images", "layers", "width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"vq_upsample: {name} must be >= 1")
        if self.domain not in ("fashion", "scenes") or self.image_size % 2:
            raise ConfigError("vq_upsample: domain fashion or scenes, an even image_size")

    def checkpoint_root(self) -> Path:
        skip = {"out_dir", "ckpt_dir", "log_interval", "keep_checkpoints", "validation", "eval_images"}
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        return Path(self.ckpt_dir) / checkpoint_key(settings, [Path(self.manifest)])


def split_images(manifest: pd.DataFrame, domain: str, split: str, image_size: int, data_dir: Path) -> np.ndarray:
    source = "fashion" if domain == "fashion" else "scene"
    part = manifest[(manifest["source"] == source) & (manifest["split"] == split)]
    files = part["file"].tolist() if domain == "fashion" else [f"scenes{64 if image_size > 32 else 32}.npz"] * len(part)
    return load_images(files, part["index"].tolist(), data_dir)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between image batches in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / max(F.mse_loss(a.clamp(-1, 1), b).item(), 1e-12))


def vq_upsample(cfg: VqUpsampleConfig, log=None) -> dict:
    check_gate(cfg.validation, cfg.manifest, "manifest_sha256")
    manifest = pd.read_parquet(cfg.manifest)
    data_dir = Path(cfg.manifest).parent
    train = split_images(manifest, cfg.domain, "train", cfg.image_size, data_dir)
    torch.manual_seed(cfg.seed)
    model_cfg = UpsamplerConfig(width=cfg.width, layers=cfg.layers)
    model = Upsampler(model_cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    root = cfg.checkpoint_root()
    step, history = 0, {"train": []}
    meta = resume_training_state(root, model, optimizer, model_cfg, stage="vq_upsample")
    if meta is not None:
        step, history = meta["step"], meta["history"]
    resumed_at = step if meta is not None else -1

    def save() -> None:
        save_training_state(root, step, model, optimizer, model_cfg, cfg, history, {"step": step},
                            keep=cfg.keep_checkpoints)

    t_start = t_last = time.perf_counter()
    while step < cfg.max_steps:
        # ---- learning rate: cosine to zero
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.max_steps))

        # ---- checkpoint (state before this step's update; done already if we resumed here)
        if step > 0 and step != resumed_at and step % cfg.ckpt_interval == 0:
            save()

        # ---- one step
        idx = torch.randint(len(train), (cfg.batch_size,), generator=torch.Generator().manual_seed(
            cfg.seed * 1_000_003 + step)).numpy()
        high = to_tensor(train[idx], cfg.image_size)
        low = to_tensor(train[idx], cfg.image_size // 2)
        loss = F.l1_loss(model(low), high)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        history["train"].append([step, loss.item()])
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            print(f"vq_upsample step {step}/{cfg.max_steps} l1 {loss.item():.4f} "
                  f"{(now - t_last) / cfg.log_interval:.3f} s/step", flush=True)
            if log:
                log(step, {"l1": loss.item()})
            t_last = now
    if step != resumed_at:
        save()

    test = split_images(manifest, cfg.domain, "test", cfg.image_size, data_dir)[:cfg.eval_images]
    high, low = to_tensor(test, cfg.image_size), to_tensor(test, cfg.image_size // 2)
    model.eval()
    with torch.no_grad():
        sr = model(low)
    up = {mode: F.interpolate(low, scale_factor=2, mode=mode, align_corners=False) for mode in ("bilinear", "bicubic")}
    metrics = {"test_psnr": {"upsampler": psnr(sr, high), **{m: psnr(x, high) for m, x in up.items()}},
               "test_images": len(test), "from_size": cfg.image_size // 2, "to_size": cfg.image_size,
               "params": model.num_params(), "steps": step, "train_seconds": time.perf_counter() - t_start,
               "resumed_at": resumed_at}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(asdict(model_cfg), indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(VqUpsampleConfig, "vq_upsample", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        try:
            metrics = vq_upsample(cfg, log=lambda step, m: mlflow.log_metrics(m, step=step))
        except GateClosed as e:
            print(f"vq_upsample: REFUSED\n{e}", file=sys.stderr)
            sys.exit(1)
        mlflow.log_metrics({f"test_psnr.{k}": v for k, v in metrics["test_psnr"].items()})
    print(json.dumps(metrics))


@task(name="vq_upsample", retries=1, retry_delay_seconds=10)  # a retry resumes from the last checkpoint
def vq_upsample_task(run: dict[str, str]) -> dict:
    return run_stage("vq_upsample", **run)


if __name__ == "__main__":
    main()
