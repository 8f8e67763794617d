"""FID and IS through the evaluation network (models/eval_net.py), with the real-vs-real FID floor.

img_eval_net writes one model folder per image domain (data/img_eval_net/fashion/, .../scenes/:
config.json + model.safetensors, no pickle). `load_eval_net` reads one back; `extractor` wraps it
as forgeline.metrics' FeatureExtractor (penultimate features for FID, one head's logits for IS),
named by its folder and the folder's weights digest, so a score says which network measured it.

FID between two samples of the *same* real distribution is not 0: finite samples leave a floor
(it shrinks with the sample size). `fid_floor` measures it on two disjoint halves of the real
images, and `generation_scores` reports it beside every FID, so "FID 3.1" reads against "floor 1.2".

    from forgeline.image_metrics import load_eval_net, extractor, generation_scores
    net = load_eval_net("data/img_eval_net/fashion")
    scores = generation_scores(extractor(net, "class", "data/img_eval_net/fashion"), real, fake)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from forgeline import metrics
from models.eval_net import EvalNet, EvalNetConfig


def save_eval_net(out: str | Path, model: EvalNet) -> Path:
    from dataclasses import asdict

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(asdict(model.config), indent=2))
    return out


def load_eval_net(path: str | Path, device: str = "cpu") -> EvalNet:
    """A model folder back into an EvalNet in eval mode, without pickle."""
    path = Path(path)
    model = EvalNet(EvalNetConfig(**json.loads((path / "config.json").read_text())))
    load_model(model, str(path / "model.safetensors"), device=device)
    return model.eval()


def extractor(model: EvalNet, head: str, folder: str | Path) -> metrics.FeatureExtractor:
    """The network's two views for FID (features) and IS (`head`'s logits); inputs (N, 3, S, S) in [-1, 1]."""
    digest = hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()[:12]
    if head not in model.heads:
        raise KeyError(f"{folder}: no head {head!r} (has {sorted(model.heads)})")

    @torch.no_grad()
    def logits(x: torch.Tensor) -> torch.Tensor:
        return model(x)[head]

    return metrics.FeatureExtractor(name=f"forgeline-eval-net:{Path(folder).name}:{head}@{digest}",
                                    features=torch.no_grad()(model.features), logits=logits)


@torch.no_grad()
def fid_floor(ext: metrics.FeatureExtractor, real: torch.Tensor, seed: int = 0, batch_size: int = 256) -> float:
    """FID between two disjoint random halves of `real`: what a perfect generator scores at this sample size."""
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
    half = len(real) // 2
    feats = torch.cat([ext.features(real[perm[i:i + batch_size]]) for i in range(0, 2 * half, batch_size)])
    return metrics.fid(feats[:half], feats[half:2 * half])


def generation_scores(ext: metrics.FeatureExtractor, real: torch.Tensor, fake: torch.Tensor,
                      seed: int = 0) -> dict[str, float | str]:
    """metrics.image_generation_scores (FID of fake vs real, IS of fake) and, beside the FID, the
    real-vs-real floor at half the real sample's size (`fid_floor`)."""
    return {**metrics.image_generation_scores(ext, real, fake), "fid_floor": fid_floor(ext, real, seed),
            "real_images": len(real), "fake_images": len(fake)}


# ----------------------------------------------------------------------------- attribute accuracy of generated scenes


@torch.no_grad()
def attribute_accuracy(model: EvalNet, images: torch.Tensor, labels: dict[str, torch.Tensor],
                       batch_size: int = 256) -> dict[str, float]:
    """Does each image show what its label asks, as the scenes eval net judges it. images (N, 3, s, s)
    in [-1, 1], resized bilinearly to the net's size when s differs; labels {head: class ids (N,)}
    in the net's heads and class order (img_eval_net's: count, then shape_/colour_/size_<slot>, "none" = 0).

    A caption such as "a red circle left of a blue square" fixes the objects' order, not their slots,
    so the objects are compared left to right: the occupied slots (shape head not "none") give the
    predicted sequence. Per image, each 0 or 1: `count` the count head; `shape`, `colour`, `size` that
    attribute's sequence equal to the label's; `all` count and every (shape, colour, size) in order;
    `all_slots` the strict reading, every per-slot head right. Returned as shares of the N images."""
    size = model.config.image_size
    preds: dict[str, list[torch.Tensor]] = {h: [] for h in labels}
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        if x.size(-1) != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        for h, logits in model(x).items():
            if h in preds:
                preds[h].append(logits.argmax(-1))
    return attribute_hits({h: torch.cat(p) for h, p in preds.items()}, labels)


def attribute_hits(pred: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """`attribute_accuracy`'s comparison of predicted class ids {head: (N,)} with the labels'."""
    slots = [h.removeprefix("shape_") for h in labels if h.startswith("shape_")]   # left to right, as the heads

    def objects(table: dict[str, torch.Tensor], i: int) -> list[tuple[int, int, int]]:
        return [(int(table[f"shape_{s}"][i]), int(table[f"colour_{s}"][i]), int(table[f"size_{s}"][i]))
                for s in slots if int(table[f"shape_{s}"][i]) != 0]

    n = len(pred["count"])
    hits = {k: 0 for k in ("count", "shape", "colour", "size", "all", "all_slots")}
    for i in range(n):
        got, want = objects(pred, i), objects(labels, i)
        count = int(pred["count"][i] == labels["count"][i])
        hits["count"] += count
        for j, attr in enumerate(("shape", "colour", "size")):
            hits[attr] += [o[j] for o in got] == [o[j] for o in want]
        hits["all"] += count and got == want
        hits["all_slots"] += all(int(pred[h][i] == labels[h][i]) for h in labels)
    return {k: v / max(n, 1) for k, v in hits.items()}
