"""gan_eval_net: the faces' attribute classifier (models/eval_net.py), the network FID, IS and coverage look through.

One EvalNet (the captioning pipeline's architecture) with a head per face attribute (gan_data's
attributes.json) and one `joint` head over (face, skin, hair) = 36 classes: its probabilities are
what the Inception Score and the mode-collapse indicator (share of the 36 classes that 1,000 samples
cover) read. Trained on the train split with horizontal flips (every attribute is left-right
symmetric), measured on the held-out test split. Also measures, as the reference for every
generator report, the real-vs-real FID floor and the real test images' IS and coverage.

With `lfw` on, a small check of the classifier on real faces: skimage.data.lfw_subset (shipped in
scikit-image's wheel: 200 grey 25x25 crops from Labeled Faces in the Wild, the first 100 faces, the
other 100 non-face background patches; no attribute labels), resized to `image_size` and repeated to
RGB. LFW labels none of our attributes, so it reports what can be read honestly: per head the
distribution of predicted classes on the faces and on the non-faces (and the total variation distance
between the two), the joint head's confidence (mean max probability) on LFW faces, non-faces and on
the synthetic test faces (the domain gap), how well that confidence alone tells faces from non-faces
(ROC AUC), and whether the network's features separate them (leave-one-out nearest-centroid
accuracy), beside the same on raw pixels.

Writes data/gan_eval_net/: config.json + model.safetensors (forgeline/image_metrics.py's model
folder, no pickle), attributes.json (head -> class names), history.json, metrics.json, report.md.

    python -m tasks.gan_eval_net [key=value ...]
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from prefect import task

from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.image_metrics import extractor, fid_floor, save_eval_net
from forgeline.images import to_tensor
from forgeline.metrics import inception_score
from forgeline.schedule import warmup_cosine
from forgeline.workspace import run_stage
from models.eval_net import EvalNet, EvalNetConfig

JOINT = ("face", "skin", "hair")   # the joint head's attributes: IS and coverage classes


@dataclass
class GanEvalNetConfig:
    data_dir: str = "data/gan_data"
    out_dir: str = "data/gan_eval_net"
    image_size: int = 32
    width: int = 16
    dropout: float = 0.1
    batch_size: int = 64
    steps: int = 800
    lr: float = 3e-3
    min_lr: float = 3e-5
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    log_interval: int = 100
    floor_images: int = 1000        # test images for the FID floor (two halves) and the real IS/coverage
    lfw: bool = True                # the skimage.data.lfw_subset check (module docstring)
    seed: int = 1337

    def check(self) -> None:
        for name in ("batch_size", "steps", "log_interval", "floor_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"gan_eval_net: {name} must be >= 1")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("gan_eval_net: need 0 <= min_lr <= lr")


def head_classes(attributes: dict[str, list[str]]) -> dict[str, list[str]]:
    """Head -> class names: one per attribute, then `joint` over JOINT (row-major)."""
    joint = [""]
    for a in JOINT:
        joint = [f"{j}/{v}".strip("/") for j in joint for v in attributes[a]]
    return {**attributes, "joint": joint}


def labels_of(manifest: pd.DataFrame, heads: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    out = {a: torch.tensor(manifest[a].map(heads[a].index).to_numpy(), dtype=torch.long) for a in heads if a != "joint"}
    joint = "/".join  # the joint class name of a row
    out["joint"] = torch.tensor([heads["joint"].index(joint(r)) for r in manifest[list(JOINT)].itertuples(index=False)],
                                dtype=torch.long)
    return out


def coverage(joint_logits: torch.Tensor, classes: int) -> float:
    """Share of the joint classes that at least one image is classified as (mode-collapse indicator)."""
    return len(set(joint_logits.argmax(-1).tolist())) / classes


@torch.no_grad()
def accuracy(model: EvalNet, x: torch.Tensor, labels: dict[str, torch.Tensor], batch: int = 500) -> dict[str, float]:
    model.eval()
    logits = {h: torch.cat([model(x[i:i + batch])[h] for i in range(0, len(x), batch)]) for h in labels}
    right = {h: logits[h].argmax(-1) == labels[h] for h in labels}
    out = {h: r.float().mean().item() for h, r in right.items()}
    out["all"] = torch.stack([right[h] for h in labels if h != "joint"]).all(0).float().mean().item()
    return out


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """ROC AUC of a score: P(score of a positive > score of a negative), ties counting half."""
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()).item()


def nearest_centroid_loo(x: torch.Tensor, y: torch.Tensor) -> float:
    """Leave-one-out accuracy of a two-class nearest-centroid rule on standardised vectors x (N, D), y bool."""
    x = x.double()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    right = 0
    for i in range(len(x)):
        keep = torch.arange(len(x)) != i
        pos, neg = x[keep & y].mean(0), x[keep & ~y].mean(0)
        right += int(((x[i] - pos).norm() < (x[i] - neg).norm()) == y[i])
    return right / len(x)


@torch.no_grad()
def lfw_check(model: EvalNet, heads: dict[str, list[str]], size: int, synthetic: torch.Tensor) -> dict:
    """The classifier on skimage.data.lfw_subset's 100 real faces and 100 non-faces (module docstring)."""
    from skimage.data import lfw_subset

    pixels = (lfw_subset() * 255).round().astype(np.uint8)        # (200, 25, 25) float [0, 1] -> uint8 grey
    x = to_tensor(pixels, size)
    is_face = torch.arange(len(x)) < 100                           # the first 100 are faces (its docs)
    model.eval()
    logits = model(x)
    predicted, tv = {}, {}
    for h, names in heads.items():
        pred = logits[h].argmax(-1)
        share = {g: torch.bincount(pred[m], minlength=len(names)).double() / int(m.sum())
                 for g, m in (("faces", is_face), ("non_faces", ~is_face))}
        predicted[h] = {g: {names[i]: round(v[i].item(), 3) for i in v.argsort(descending=True).tolist() if v[i] > 0}
                        for g, v in share.items()}
        tv[h] = 0.5 * (share["faces"] - share["non_faces"]).abs().sum().item()
    conf = logits["joint"].softmax(-1).max(-1).values
    synth = torch.cat([model(synthetic[i:i + 500])["joint"] for i in range(0, len(synthetic), 500)])
    return {"images": len(x), "faces": int(is_face.sum()), "non_faces": int((~is_face).sum()), "size": size,
            "predicted": predicted, "total_variation": tv,
            "joint_confidence": {"lfw_faces": conf[is_face].mean().item(), "lfw_non_faces": conf[~is_face].mean().item(),
                                 "synthetic_faces": synth.softmax(-1).max(-1).values.mean().item()},
            "confidence_auc": auc(conf[is_face], conf[~is_face]),
            "features_nearest_centroid": nearest_centroid_loo(model.features(x), is_face),
            "pixels_nearest_centroid": nearest_centroid_loo(x.flatten(1), is_face)}


def lfw_report(r: dict) -> str:
    c = r["joint_confidence"]
    lines = ["## skimage.data.lfw_subset: the classifier on real faces", "",
             f"{r['faces']} real face crops and {r['non_faces']} non-face patches (grey 25x25, resized to "
             f"{r['size']}x{r['size']}, grey as RGB). LFW labels none of the attributes: no accuracy can be measured.", "",
             f"- joint-head confidence (mean max probability): LFW faces {c['lfw_faces']:.3f}, LFW non-faces "
             f"{c['lfw_non_faces']:.3f}, synthetic test faces {c['synthetic_faces']:.3f}",
             f"- that confidence as a face detector: ROC AUC {r['confidence_auc']:.3f} (0.5 = no separation)",
             f"- leave-one-out nearest-centroid accuracy, faces vs non-faces: on the network's features "
             f"{r['features_nearest_centroid']:.3f}, on raw pixels {r['pixels_nearest_centroid']:.3f}", "",
             "| head | predicted on LFW faces (share) | predicted on non-faces (share) | total variation |",
             "|---|---|---|---|"]
    top = lambda d: ", ".join(f"{k} {v:.2f}" for k, v in list(d.items())[:3])  # noqa: E731
    for h, p in r["predicted"].items():
        if h != "joint":
            lines.append(f"| {h} | {top(p['faces'])} | {top(p['non_faces'])} | {r['total_variation'][h]:.2f} |")
    return "\n".join(lines) + "\n"


def gan_eval_net(cfg: GanEvalNetConfig, log=None) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data = Path(cfg.data_dir)
    manifest = pd.read_parquet(data / "manifest.parquet")
    heads = head_classes(json.loads((data / "attributes.json").read_text()))
    with np.load(data / f"faces{64 if cfg.image_size > 32 else 32}.npz", allow_pickle=False) as z:
        pixels = z["images"]
    split = {s: manifest[manifest["split"] == s] for s in ("train", "val", "test")}
    x = {s: to_tensor(pixels[p["index"].to_numpy()], cfg.image_size) for s, p in split.items()}
    y = {s: labels_of(p, heads) for s, p in split.items()}
    model = EvalNet(EvalNetConfig(image_size=cfg.image_size, width=cfg.width,
                                  heads={h: len(v) for h, v in heads.items()}, dropout=cfg.dropout))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
    history = {"train": [], "val": []}
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        idx = torch.randint(len(x["train"]), (cfg.batch_size,), generator=g)
        xb = x["train"][idx]
        flip = torch.rand(cfg.batch_size, generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        logits = model(xb)
        loss = sum(F.cross_entropy(logits[h], y["train"][h][idx]) for h in heads) / len(heads)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history["train"].append([step + 1, loss.item()])
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.steps:
            acc = accuracy(model, x["val"], y["val"])
            model.train()
            history["val"].append([step + 1, acc])
            print(f"gan_eval_net step {step + 1}/{cfg.steps} loss {loss.item():.4f} val all {acc['all']:.3f} "
                  f"joint {acc['joint']:.3f}", flush=True)
            if log:
                log(step + 1, {"loss": loss.item(), "val.all": acc["all"]})
    model.eval()
    out = Path(cfg.out_dir)
    save_eval_net(out, model)
    (out / "attributes.json").write_text(json.dumps(heads, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(history))
    real = x["test"][:cfg.floor_images]
    ext = extractor(model, "joint", out)
    with torch.no_grad():
        real_logits = ext.logits(real)
    summary = {"test_accuracy": accuracy(model, x["test"], y["test"]), "test_images": len(x["test"]),
               "image_size": cfg.image_size, "params": model.num_params(), "extractor": ext.name,
               "fid_floor": fid_floor(ext, real, cfg.seed), "fid_floor_images": len(real) // 2,
               "real_inception_score": inception_score(real_logits)[0],
               "real_coverage": coverage(real_logits, len(heads["joint"])), "joint_classes": len(heads["joint"]),
               "seconds": time.perf_counter() - t0}
    acc = summary["test_accuracy"]
    text = (f"# gan_eval_net: the faces' attribute classifier\n\nHeld-out accuracy on {len(x['test'])} synthetic "
            "faces: " + ", ".join(f"{h} {v:.3f}" for h, v in acc.items()) + f"; FID floor {summary['fid_floor']:.2f}, "
            f"real IS {summary['real_inception_score']:.2f}.\n")
    if cfg.lfw:
        summary["lfw"] = lfw_check(model, heads, cfg.image_size, x["test"])
        text += "\n" + lfw_report(summary["lfw"])
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(text)
    return summary


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(GanEvalNetConfig, "gan_eval_net", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        summary = gan_eval_net(cfg, log=lambda step, m: mlflow.log_metrics(m, step=step))
        mlflow.log_metrics({f"test_accuracy.{h}": v for h, v in summary["test_accuracy"].items()})
        mlflow.log_metrics({k: summary[k] for k in ("fid_floor", "real_inception_score", "real_coverage")})
        if "lfw" in summary:
            lfw = summary["lfw"]
            mlflow.log_metrics({"lfw.confidence_auc": lfw["confidence_auc"],
                                "lfw.features_nearest_centroid": lfw["features_nearest_centroid"],
                                "lfw.pixels_nearest_centroid": lfw["pixels_nearest_centroid"],
                                **{f"lfw.confidence.{k}": v for k, v in lfw["joint_confidence"].items()}})
        for name in ("metrics.json", "report.md"):
            mlflow.log_artifact(str(Path(cfg.out_dir) / name))
    print(json.dumps({k: summary[k] for k in ("test_accuracy", "fid_floor", "real_inception_score", "real_coverage")}))


@task(name="gan_eval_net", retries=1, retry_delay_seconds=10)
def gan_eval_net_task(run: dict[str, str]) -> dict:
    return run_stage("gan_eval_net", **run)


if __name__ == "__main__":
    main()
