"""img_eval_net: the evaluation network (models/eval_net.py) trained on Fashion-MNIST and on the scenes.

Two networks of one architecture, one per image domain, each its own model folder:
- `fashion`: one head `class` (10 classes), trained on the train split, measured on the test split
  (the package's t10k part), at `fashion_size` (28 -> 32, grey as RGB);
- `scenes`: heads `count` and, per slot (left, middle, right), `shape_*`, `colour_*`, `size_*`
  ("none" where the slot is empty), at 64x64; measured on the test split, whose every image holds a
  (shape, colour) pair never seen in training.
Its features and probabilities are what FID and IS look through (forgeline/image_metrics.py); the
real-vs-real FID floor and the real images' IS are measured here as the reference every generator
report quotes. Refuses to start unless img_validate passed on this very manifest.

One linear loop per network (tasks/mt_train.py's shape): a batch is a pure function of (seed,
step); full-state checkpoints under checkpoints/img_eval_net/<key>/<domain>/ and resume.

    python -m tasks.img_eval_net [key=value ...]
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

from forgeline import scenes
from forgeline.checkpoint import checkpoint_key, resume_training_state, save_training_state
from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.expectations import GateClosed, check_gate
from forgeline.image_metrics import extractor, fid_floor, save_eval_net
from forgeline.images import FASHION_LABELS, load_images, to_tensor
from forgeline.metrics import inception_score
from forgeline.schedule import warmup_cosine
from forgeline.workspace import run_stage
from models.eval_net import EvalNet, EvalNetConfig


@dataclass
class ImgEvalNetConfig:
    manifest: str = "data/img_data/manifest.parquet"
    validation: str = "data/img_validate/result.json"   # the gate: img_validate's verdict on this manifest
    out_dir: str = "data/img_eval_net"
    ckpt_dir: str = "checkpoints/img_eval_net"
    fashion_size: int = 32
    scene_size: int = 64
    width: int = 16
    dropout: float = 0.2
    batch_size: int = 128
    fashion_steps: int = 900
    scene_steps: int = 600
    lr: float = 3e-3
    min_lr: float = 3e-5
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    colour_blind: float = 0.0       # scenes: share of samples shown grey or channel-permuted, colour heads not trained on them
    shape_blind: float = 0.0        # scenes: share shown as 8x8-pooled colour blobs, shape and size heads not trained on them
    instrument_scenes: int = 6000   # scenes rendered here from every (shape, colour) pair, added to the training set
    instrument_seed: int = 7        # their own seed stream: never an img_data image
    lowres: float = 0.25            # scenes: share shown at 32x32 and upsampled back (how 32x32 generators are judged)
    ckpt_interval: int = 300
    keep_checkpoints: int = 2
    log_interval: int = 100
    floor_images: int = 2000        # test images per domain for the FID floor (two halves) and the real IS
    seed: int = 1337

    def check(self) -> None:
        if self.instrument_scenes < 0 or not 0 <= self.lowres <= 1:
            raise ConfigError("img_eval_net: need instrument_scenes >= 0 and 0 <= lowres <= 1")
        for name in ("batch_size", "fashion_steps", "scene_steps", "ckpt_interval", "log_interval", "floor_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"img_eval_net: {name} must be >= 1")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("img_eval_net: need 0 <= min_lr <= lr")

    def checkpoint_root(self) -> Path:
        skip = {"out_dir", "ckpt_dir", "log_interval", "keep_checkpoints", "validation", "floor_images"}
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        return Path(self.ckpt_dir) / checkpoint_key(settings, [Path(self.manifest)])


def scene_heads() -> dict[str, list[str]]:
    """Head -> its class names: count, then shape/colour/size per slot with "none" for an empty slot."""
    heads = {"count": ["1", "2", "3"]}
    for slot in scenes.SLOTS:
        heads |= {f"shape_{slot}": ["none", *scenes.SHAPES], f"colour_{slot}": ["none", *scenes.COLOURS],
                  f"size_{slot}": ["none", *scenes.SIZES]}
    return heads


def scene_labels(part: pd.DataFrame) -> dict[str, torch.Tensor]:
    """Head -> class indices of scene rows (manifest columns n_objects and shape_left, colour_left, ...)."""
    labels = {"count": torch.tensor(part["n_objects"].to_numpy() - 1, dtype=torch.long)}
    for head, names in scene_heads().items():
        if head != "count":
            labels[head] = torch.tensor(part[head].map(names.index).to_numpy(), dtype=torch.long)
    return labels


def instrument_scenes(cfg: ImgEvalNetConfig) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """Scenes of every (shape, colour) pair, rendered here from `instrument_seed`.

    The network is a measuring instrument: it must name a held-out pair as surely as a seen one, or
    it would score a captioner or generator that gets an unseen pair right as wrong. img_data holds
    those pairs out of its train split for the models under test; the instrument learns them from its
    own renders (never an img_data image: the test split it is scored on stays unseen).
    """
    rng = np.random.default_rng(cfg.instrument_seed)
    pairs = [(s, c) for s in scenes.SHAPES for c in scenes.COLOURS]
    images, rows = [], []
    for _ in range(cfg.instrument_scenes):
        objs = scenes.random_scene(rng, pairs)
        images.append(scenes.render(rng, objs))
        rows.append({"n_objects": len(objs), **scenes.slot_labels(objs)})
    return np.stack(images), scene_labels(pd.DataFrame(rows))


def domain_data(manifest: pd.DataFrame, domain: str, data_dir: Path) -> dict:
    """{split: (images uint8 (N, H, W[, C]), {head: labels (N,)})} of one domain; `to_tensor` per batch."""
    source = "fashion" if domain == "fashion" else "scene"
    out = {}
    for split in ("train", "val", "test"):
        part = manifest[(manifest["source"] == source) & (manifest["split"] == split)]
        if domain == "fashion":
            labels = {"class": torch.tensor(part["label_id"].to_numpy(), dtype=torch.long)}
        else:
            labels = scene_labels(part)
        images = load_images(part["file"].tolist(), part["index"].tolist(), data_dir)
        out[split] = (images, labels)
    return out


PERMUTATIONS = ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def batch_at(n: int, batch_size: int, seed: int, step: int, flip: bool, blind: float = 0.0,
             blob: float = 0.0, low: float = 0.0) -> tuple[torch.Tensor, ...]:
    """Step `step`'s row indices, horizontal-flip flags, colour-blind flags and their kind (0 grey, 1-5 a
    channel permutation), shape-blind flags and low-resolution flags: a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randint(n, (batch_size,), generator=g)
    flips = (torch.rand(batch_size, generator=g) < 0.5) & flip
    u = torch.rand(batch_size, generator=g)
    blinds, blobs = u < blind, (u >= blind) & (u < blind + blob)
    kinds = torch.randint(len(PERMUTATIONS) + 1, (batch_size,), generator=g)
    lows = torch.rand(batch_size, generator=g) < low
    return idx, flips, blinds, kinds, blobs, lows


def low_resolution(x: torch.Tensor, lows: torch.Tensor) -> torch.Tensor:
    """Rows with `lows` averaged down 2x and resized back, as `to_tensor` shows a 32x32 image at 64."""
    if not lows.any():
        return x
    small = F.interpolate(F.avg_pool2d(x, 2), size=x.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
    return torch.where(lows[:, None, None, None], small, x)


def shape_blind(x: torch.Tensor, blobs: torch.Tensor) -> torch.Tensor:
    """Rows with `blobs` pooled to 8x8-pixel colour cells: colour and count stay, shape is gone, so the
    colour heads learn colour for shapes never seen with it."""
    pooled = F.interpolate(F.avg_pool2d(x, 8), scale_factor=8, mode="nearest")
    return torch.where(blobs[:, None, None, None], pooled, x)


def colour_blind(x: torch.Tensor, blinds: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """Rows with `blinds` shown grey (kind 0) or with their RGB channels permuted (kinds 1-5): the shape,
    size and count heads then cannot lean on colour, so they learn shape for colours never seen with it."""
    out = x.clone()
    for i in blinds.nonzero().flatten().tolist():
        k = int(kinds[i])
        out[i] = x[i].mean(0, keepdim=True).expand(3, -1, -1) if k == 0 else x[i, list(PERMUTATIONS[k - 1])]
    return out


@torch.no_grad()
def accuracy(model: EvalNet, images: np.ndarray, labels: dict[str, torch.Tensor], batch: int = 500) -> dict[str, float]:
    """Per head accuracy, and `all` = every head right on the same image."""
    model.eval()
    preds = {h: [] for h in labels}
    for i in range(0, len(images), batch):
        for h, logits in model(to_tensor(images[i:i + batch], model.config.image_size)).items():
            preds[h].append(logits.argmax(-1))
    right = {h: torch.cat(preds[h]) == labels[h] for h in labels}
    out = {h: r.float().mean().item() for h, r in right.items()}
    if len(right) > 1:
        out["all"] = torch.stack(list(right.values())).all(0).float().mean().item()
    model.train()
    return out


def train_domain(cfg: ImgEvalNetConfig, domain: str, data: dict, log=None) -> tuple[EvalNet, dict]:
    """Train (or resume) one domain's network to its step budget; return it and its history."""
    torch.manual_seed(cfg.seed)
    images, labels = data["train"]
    heads = {"class": len(FASHION_LABELS)} if domain == "fashion" else {h: len(v) for h, v in scene_heads().items()}
    size = cfg.fashion_size if domain == "fashion" else cfg.scene_size
    model_cfg = EvalNetConfig(image_size=size, width=cfg.width, heads=heads, dropout=cfg.dropout)
    model = EvalNet(model_cfg)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
    max_steps = cfg.fashion_steps if domain == "fashion" else cfg.scene_steps
    root = cfg.checkpoint_root() / domain
    step, history = 0, {"train": [], "val": []}
    meta = resume_training_state(root, model, optimizer, model_cfg, stage=f"img_eval_net/{domain}")
    if meta is not None:
        step, history = meta["step"], meta["history"]
    resumed_at = step if meta is not None else -1
    model.train()

    def save() -> None:
        save_training_state(root, step, model, optimizer, model_cfg, cfg, history, {"step": step},
                            keep=cfg.keep_checkpoints)

    t_last = time.perf_counter()
    while step < max_steps:
        # ---- learning rate
        lr = warmup_cosine(step, max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # ---- checkpoint (state before this step's update; done already if we resumed here)
        if step > 0 and step != resumed_at and step % cfg.ckpt_interval == 0:
            save()

        # ---- one step; flips only for Fashion-MNIST (a flipped scene swaps its left and right slots)
        scenes_only = domain == "scenes"
        idx, flips, blinds, kinds, blobs, lows = batch_at(
            len(images), cfg.batch_size, cfg.seed, step, flip=not scenes_only, blind=cfg.colour_blind * scenes_only,
            blob=cfg.shape_blind * scenes_only, low=cfg.lowres * scenes_only)
        x = to_tensor(images[idx.numpy()], size)
        x = shape_blind(colour_blind(torch.where(flips[:, None, None, None], x.flip(-1), x), blinds, kinds), blobs)
        x = low_resolution(x, lows)
        logits = model(x)
        # a head learns only from rows that show what it names: colour heads not from colour-blind rows,
        # shape and size heads not from shape-blind ones
        shown = {"colour": (~blinds).float(), "shape": (~blobs).float(), "size": (~blobs).float()}
        loss = 0.0
        for h in heads:
            w = shown.get(h.split("_")[0], torch.ones(len(idx)))
            nll = F.cross_entropy(logits[h], labels[h][idx], label_smoothing=cfg.label_smoothing, reduction="none")
            loss = loss + (nll * w).sum() / w.sum().clamp(min=1)
        loss = loss / len(heads)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"img_eval_net/{domain}: non-finite loss at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        history["train"].append([step, loss.item()])

        # ---- log
        if step % cfg.log_interval == 0 or step == max_steps:
            now = time.perf_counter()
            print(f"img_eval_net/{domain} step {step}/{max_steps} loss {loss.item():.4f} lr {lr:.2e} "
                  f"{(now - t_last) / cfg.log_interval:.3f} s/step", flush=True)
            if log:
                log(step, {f"{domain}.loss": loss.item(), f"{domain}.lr": lr})
            t_last = now
    if step != resumed_at:
        history["val"].append([step, accuracy(model, *data["val"])])
        save()
    return model.eval(), history


def img_eval_net(cfg: ImgEvalNetConfig, log=None) -> dict:
    check_gate(cfg.validation, cfg.manifest, "manifest_sha256")
    manifest = pd.read_parquet(cfg.manifest)
    out = Path(cfg.out_dir)
    summary = {}
    for domain in ("fashion", "scenes"):
        t0 = time.perf_counter()
        size = cfg.fashion_size if domain == "fashion" else cfg.scene_size
        data = domain_data(manifest, domain, Path(cfg.manifest).parent)
        if domain == "scenes" and cfg.instrument_scenes:
            (x, y), (xi, yi) = data["train"], instrument_scenes(cfg)
            data["train"] = (np.concatenate([x, xi]), {h: torch.cat([y[h], yi[h]]) for h in y})
        model, history = train_domain(cfg, domain, data, log)
        folder = save_eval_net(out / domain, model)
        (folder / "history.json").write_text(json.dumps(history))
        test_x = data["test"][0]
        pick = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.floor_images]
        real = to_tensor(test_x[np.sort(pick.numpy())], size)
        head = "class" if domain == "fashion" else "count"
        ext = extractor(model, head, folder)
        summary[domain] = {
            "test_accuracy": accuracy(model, *data["test"]), "val_accuracy": history["val"][-1][1],
            **({"test_accuracy_32": accuracy(model, scenes.downsample(test_x, 2), data["test"][1]),
                "instrument_scenes": cfg.instrument_scenes} if domain == "scenes" else {}),
            "train_images": len(data["train"][0]), "test_images": len(test_x), "image_size": size,
            "params": model.num_params(), "feature_dim": model.config.feature_dim, "is_head": head,
            "fid_floor": fid_floor(ext, real, cfg.seed), "fid_floor_images": len(real) // 2,
            "real_inception_score": inception_score(ext.logits(real))[0], "extractor": ext.name,
            "seconds": time.perf_counter() - t0}
        print(f"img_eval_net/{domain}: test accuracy {json.dumps(summary[domain]['test_accuracy'])}", flush=True)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(ImgEvalNetConfig, "img_eval_net", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        try:
            summary = img_eval_net(cfg, log=lambda step, m: mlflow.log_metrics(m, step=step))
        except GateClosed as e:
            print(f"img_eval_net: REFUSED\n{e}", file=sys.stderr)
            sys.exit(1)
        mlflow.log_metrics({f"{d}.{k}.{h}": v for d, r in summary.items() for k in ("test_accuracy", "test_accuracy_32", "val_accuracy")
                            if k in r for h, v in r[k].items()})
        mlflow.log_metrics({f"{d}.{k}": r[k] for d, r in summary.items() for k in ("fid_floor", "real_inception_score")})
        mlflow.log_artifact(str(Path(cfg.out_dir) / "metrics.json"))
    print(json.dumps({d: {"test_accuracy": r["test_accuracy"], "fid_floor": r["fid_floor"]} for d, r in summary.items()}))


@task(name="img_eval_net", retries=1, retry_delay_seconds=10)  # a retry resumes from the last checkpoint
def img_eval_net_task(run: dict[str, str]) -> dict:
    return run_stage("img_eval_net", **run)


if __name__ == "__main__":
    main()
