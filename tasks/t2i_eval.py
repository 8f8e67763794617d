"""t2i_eval: the text-to-image model on held-out prompts: attribute accuracy, FID, IS and time per image,
against classifier-free guidance scale and sampling steps; beside it the DALL-E form's samples.

The prompts are the first captions of a seeded sample of `prompts` test scenes (every test scene
holds a (shape, colour) pair never seen in training). For each setting (a guidance sweep at DDIM
`steps`, a DDIM steps sweep at `guidance`, and full DDPM on the first `ddpm_prompts`), t2i_train's
model generates one 32x32 image per prompt; the scenes eval net (img_eval_net's, 64x64: the images
are upsampled bilinearly) judges them against the prompt's structured label
(forgeline/image_metrics.attribute_accuracy: count, shape, colour, size, all), FID and IS are
measured through its features and count head against the real test scenes outside the sample (at
32x32, upsampled the same way; the real-vs-real floor beside it). The REFERENCE row puts the
prompts' own real 32x32 scenes through the same judge: the ceiling. The `seen pairs (val)` row
draws `seen_prompts` val scenes instead (every pair seen in training, the scenes themselves not):
what the model does when no composition is new. If helper stage t2i_dalle has
written data/t2i_dalle/samples.npz (`images` uint8 (N, 32, 32, 3), `image_ids` the test scenes
whose first captions were the prompts, `seconds_per_image`), its row is scored the same way.

Writes data/t2i_eval/: metrics.json, report.md (the table), grid_<setting>.png (samples, the
prompt under each).

    python -m tasks.t2i_eval [key=value ...]
"""
from __future__ import annotations

import json
import re
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from prefect import task
from safetensors.torch import load_model

from forgeline.config import ConfigError, config_dict, stage_config
from forgeline import scenes
from forgeline.image_metrics import attribute_accuracy, extractor, generation_scores, load_eval_net
from forgeline.images import load_images, to_tensor
from forgeline.workspace import run_stage
from models.diffusion import T2IConfig, TextToImage, generate


@dataclass
class T2iEvalConfig:
    manifest: str = "data/img_data/manifest.parquet"
    model: str = "data/t2i_train"
    eval_net: str = "data/img_eval_net/scenes"
    dalle_samples: str = "data/t2i_dalle/samples.npz"   # the DALL-E form's row, when that stage has run
    out_dir: str = "data/t2i_eval"
    prompts: int = 64                      # held-out prompts per setting
    guidances: list[float] = field(default_factory=lambda: [0.0, 1.0, 3.0, 5.0])
    steps: int = 25                        # DDIM steps of the guidance sweep
    guidance: float = 3.0                  # guidance of the steps sweep and of DDPM
    steps_sweep: list[int] = field(default_factory=lambda: [10, 50])
    ddpm_prompts: int = 4                  # full DDPM (all timesteps) on the first ones: 1000 forwards each
    seen_prompts: int = 64                 # val prompts (only seen pairs, unseen scenes) at `steps` and `guidance`; 0 = none
    eta: float = 0.0
    grid: int = 8                          # images per sample grid
    is_head: str = "count"                 # img_eval_net's IS head for the scenes
    threads: int = 2
    seed: int = 0

    def check(self) -> None:
        if min(self.steps, self.grid, self.threads) < 1 or self.prompts < 2 or self.ddpm_prompts in (1,) \
                or self.ddpm_prompts < 0:
            raise ConfigError("t2i_eval: steps, grid, threads >= 1; prompts >= 2 and ddpm_prompts 0 or >= 2 "
                              "(FID needs two images' covariance)")
        if self.seen_prompts == 1 or self.seen_prompts < 0:
            raise ConfigError("t2i_eval: seen_prompts 0 or >= 2 (FID needs two images' covariance)")
        if not self.guidances or min(self.guidances) < 0 or any(s < 1 for s in self.steps_sweep):
            raise ConfigError("t2i_eval: guidances non-empty and >= 0; steps_sweep entries >= 1")


def load_t2i(folder: str | Path) -> tuple[TextToImage, list[str]]:
    """t2i_train's model folder (config.json + model.safetensors + vocab.json) -> (model, vocabulary), no pickle."""
    folder = Path(folder)
    model = TextToImage(T2IConfig(**json.loads((folder / "config.json").read_text())))
    load_model(model, str(folder / "model.safetensors"))
    return model.eval(), json.loads((folder / "vocab.json").read_text())


def seeded_pick(n: int, k: int, seed: int) -> np.ndarray:
    """min(k, n) sorted row positions of n, drawn without replacement: the same for the same seed."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(k, n), replace=False))


def scene_labels(rows) -> dict[str, torch.Tensor]:
    """The scenes eval net's targets for manifest rows (a DataFrame with n_objects and per slot
    shape_/colour_/size_<slot>): {head: class ids (N,)} in img_eval_net's class order ("none" first)."""
    labels = {"count": torch.tensor(rows["n_objects"].to_numpy() - 1, dtype=torch.long)}
    for slot in scenes.SLOTS:
        for attr, names in (("shape", scenes.SHAPES), ("colour", scenes.COLOURS), ("size", scenes.SIZES)):
            classes = ["none", *names]
            labels[f"{attr}_{slot}"] = torch.tensor(rows[f"{attr}_{slot}"].map(classes.index).to_numpy(),
                                                    dtype=torch.long)
    return labels


def save_grid(images: np.ndarray, prompts: list[str], path: Path, title: str) -> None:
    """uint8 (N, S, S, 3) images in one row of up to 8 per line, each with its prompt (wrapped) under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(images))
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, p in zip(axes.flat, images, prompts):
        ax.imshow(img, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(p, 28)), fontsize=7, y=-0.02, va="top")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def t2i_eval(cfg: T2iEvalConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    manifest = pd.read_parquet(cfg.manifest)
    data_dir = Path(cfg.manifest).parent
    test = manifest[(manifest["source"] == "scene") & (manifest["split"] == "test")].reset_index(drop=True)
    pick = seeded_pick(len(test), cfg.prompts, cfg.seed)
    chosen, pool = test.iloc[pick], test.drop(index=pick)
    prompts = [c[0] for c in chosen["captions"]]
    labels = scene_labels(chosen)
    model, vocab = load_t2i(cfg.model)
    size = model.config.image_size
    net = load_eval_net(cfg.eval_net)
    ext = extractor(net, cfg.is_head, cfg.eval_net)
    net_size = net.config.image_size

    def to_net(x: torch.Tensor) -> torch.Tensor:
        """32x32 pixels at the eval net's size, bilinear (what the REFERENCE row goes through too)."""
        return x if x.size(-1) == net_size else F.interpolate(x, size=(net_size, net_size), mode="bilinear",
                                                              align_corners=False)

    def images_of(rows: pd.DataFrame) -> np.ndarray:
        return load_images([f"scenes{size}.npz"] * len(rows), rows["index"].tolist(), data_dir)

    real_pool = to_net(to_tensor(images_of(pool), size))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def score(name: str, images: np.ndarray, lab: dict, seconds: float | None, grid_prompts: list[str], **setting) -> dict:
        x = to_net(to_tensor(images, size))
        row = {"setting": name, **setting, "images": len(images), **attribute_accuracy(net, x, lab),
               **generation_scores(ext, real_pool, x, cfg.seed),
               "seconds_per_image": seconds}
        key = re.sub(r"[^a-z0-9]+", "_", name.lower().replace(".", "p")).strip("_")   # a file and MLflow key
        save_grid(images[:cfg.grid], grid_prompts[:cfg.grid], out / f"grid_{key}.png", name)
        row["grid"] = f"grid_{key}.png"
        print(f"t2i_eval: {name}: all {row['all']:.3f} count {row['count']:.3f} shape {row['shape']:.3f} "
              f"colour {row['colour']:.3f} size {row['size']:.3f} FID {row['fid']:.2f} (floor {row['fid_floor']:.2f}) "
              f"IS {row['inception_score']:.2f}" + (f" {seconds:.3f} s/image" if seconds else ""), flush=True)
        return row

    rows = [score("REFERENCE real scenes", images_of(chosen), labels, None, prompts)]

    def run(name: str, n: int, texts: list[str] = prompts, lab: dict = labels, **kw) -> dict:
        t0 = time.perf_counter()
        images = generate(model, vocab, texts[:n], seed=cfg.seed, eta=cfg.eta, **kw).numpy()
        seconds = (time.perf_counter() - t0) / n
        sub = {h: v[:n] for h, v in lab.items()}
        return score(name, images, sub, seconds, texts, **kw)

    for g in cfg.guidances:
        rows.append(run(f"diffusion DDIM {cfg.steps} guidance {g:g}", cfg.prompts, sampler="ddim", steps=cfg.steps,
                        guidance=g))
    for s in cfg.steps_sweep:
        if s != cfg.steps or cfg.guidance not in cfg.guidances:
            rows.append(run(f"diffusion DDIM {s} guidance {cfg.guidance:g}", cfg.prompts, sampler="ddim", steps=s,
                            guidance=cfg.guidance))
    if cfg.seen_prompts:
        # held-out scenes whose every (shape, colour) pair was seen in training: composition vs generalisation
        val = manifest[(manifest["source"] == "scene") & (manifest["split"] == "val")].reset_index(drop=True)
        seen = val.iloc[seeded_pick(len(val), cfg.seen_prompts, cfg.seed)]
        rows.append(run(f"diffusion DDIM {cfg.steps} guidance {cfg.guidance:g}, seen pairs (val)", len(seen),
                        [c[0] for c in seen["captions"]], scene_labels(seen), sampler="ddim", steps=cfg.steps,
                        guidance=cfg.guidance))
    if cfg.ddpm_prompts:
        rows.append(run(f"diffusion DDPM {model.config.timesteps} guidance {cfg.guidance:g}",
                        min(cfg.ddpm_prompts, cfg.prompts), sampler="ddpm", steps=model.config.timesteps,
                        guidance=cfg.guidance))
    if Path(cfg.dalle_samples).is_file():
        with np.load(cfg.dalle_samples, allow_pickle=False) as z:
            images, ids, seconds = z["images"], [str(i) for i in z["image_ids"]], float(z["seconds_per_image"])
        by_id = test.set_index("image_id").loc[ids]
        rows.append(score("DALL-E (t2i_dalle) samples", images, scene_labels(by_id), seconds,
                          [c[0] for c in by_id["captions"]], in_fid_pool=int(by_id.index.isin(pool["image_id"]).sum())))
    metrics = {"feature_extractor": ext.name, "prompts": prompts, "prompt_image_ids": chosen["image_id"].tolist(),
               "real_pool": len(pool), "rows": rows,
               "t2i_train": json.loads((Path(cfg.model) / "metrics.json").read_text())}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "report.md").write_text(report(metrics))
    return metrics


def report(m: dict) -> str:
    t = m["t2i_train"]
    lines = ["# Text-to-image on held-out prompts (scenes, 32x32)", "",
             f"Model: {t['params'] / 1e6:.2f}M parameters ({t['text_params'] / 1e6:.2f}M text encoder), "
             f"{t['steps']} steps in {t['train_seconds']:.0f} s; held-out DDPM loss {t['val_loss']:.4f}.",
             f"Prompts: the first captions of {len(m['prompts'])} test scenes, each holding a (shape, colour) pair "
             f"never seen in training. Judge: `{m['feature_extractor']}` at 64x64 (32x32 images upsampled "
             f"bilinearly); objects compared left to right (`all_slots`: every per-slot head right). FID against "
             f"{m['real_pool']} real test scenes outside the sample (32x32, upsampled the same way).", "",
             "| setting | n | count | shape | colour | size | all | all (slots) | FID | floor | IS | s/image |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in m["rows"]:
        sec = f"{r['seconds_per_image']:.3f}" if r["seconds_per_image"] else "-"
        lines.append(f"| {r['setting']} | {r['images']} | {r['count']:.3f} | {r['shape']:.3f} | {r['colour']:.3f} | "
                     f"{r['size']:.3f} | {r['all']:.3f} | {r['all_slots']:.3f} | {r['fid']:.2f} | {r['fid_floor']:.2f} | "
                     f"{r['inception_score']:.2f} | {sec} |")
    lines += ["", "FID is biased upward at small n: compare a row with the REFERENCE row of the same n. The "
              "`seen pairs (val)` row's prompts come from val scenes (every (shape, colour) pair seen in training; "
              "its FID is still against the test scenes).", ""]
    lines += [f"![{r['setting']}]({r['grid']})" for r in m["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(T2iEvalConfig, "t2i_eval", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        metrics = t2i_eval(cfg)
        for r in metrics["rows"]:
            key = r["grid"][5:-4]
            mlflow.log_metrics({f"{key}.{k}": float(r[k]) for k in ("count", "shape", "colour", "size", "all",
                                                                      "all_slots", "fid", "inception_score")})
        mlflow.log_metric("fid_floor", metrics["rows"][0]["fid_floor"])
        for name in ("metrics.json", "report.md"):
            mlflow.log_artifact(str(Path(cfg.out_dir) / name))
    print((Path(cfg.out_dir) / "report.md").read_text())


@task(name="t2i_eval", retries=1, retry_delay_seconds=10)
def t2i_eval_task(run: dict[str, str]) -> dict:
    return run_stage("t2i_eval", **run)


if __name__ == "__main__":
    main()
