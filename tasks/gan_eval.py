"""gan_eval: FID (beside the real-vs-real floor), IS, mode collapse and truncation of every gan_train generator.

For each loss gan_train trained, `samples` faces from its generator (z from `seed`) are scored
through gan_eval_net's classifier (forgeline/image_metrics.py): FID against as many held-out real
faces, with the floor (two halves of the real faces) beside it; IS from the joint (face, skin,
hair) head; the mode-collapse indicator = share of the 36 joint classes the samples cover, and per
attribute the share of its classes covered; diversity = mean pairwise distance of the classifier's
features (the real faces' value beside it). Then FID and diversity against the truncation
threshold (z entries beyond it redrawn, models/gan.py's `sample_z`), one curve per loss, and sample
grids: random, and truncated at `truncation`.

`domain: fashion` scores gan_fashion_train's generators the same way on Fashion-MNIST (the
gan_fashion_eval stage, configs/gan_fashion_eval.yaml): the real images are the first `samples` of
the test split (the package's t10k part), the network img_eval_net's fashion model, IS and coverage
read its 10-class head (the mode-collapse indicator = share of the 10 classes 1,000 samples cover).

Writes <out_dir>/: metrics.json, report.md (the table minimax vs nonsaturating vs wgan-gp),
truncation.png, samples_<loss>.png, samples_<loss>_truncated.png.

    python -m tasks.gan_eval [key=value ...]
    python -m tasks.gan_eval config=configs/gan_fashion_eval.yaml       # the gan_fashion_eval stage
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from prefect import task
from safetensors.torch import load_model

from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.image_metrics import extractor, generation_scores, load_eval_net
from forgeline.images import FASHION_LABELS, load_images, to_tensor
from forgeline.workspace import run_stage
from models.gan import GANConfig, Generator, sample_z


HEADS = {"faces": "joint", "fashion": "class"}   # per domain, the eval net's head that IS and coverage read
WHAT = {"faces": "faces", "fashion": "Fashion-MNIST images"}


@dataclass
class GanEvalConfig:
    domain: str = "faces"               # faces | fashion: as gan_train's
    data_dir: str = "data/gan_data"     # faces: gan_data's folder; fashion: img_data's
    eval_net: str = "data/gan_eval_net" # an eval net model folder (fashion: data/img_eval_net/fashion)
    train_dir: str = "data/gan_train"
    out_dir: str = "data/gan_eval"
    samples: int = 1000                 # per generator, and as many real faces
    truncation: float = 1.0             # the threshold of the truncated sample grid
    thresholds: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 1.5, 2.0, 3.0])
    grid: int = 8                       # grid x grid samples per picture
    seed: int = 7

    def check(self) -> None:
        if self.samples < 4 or self.truncation <= 0 or not self.thresholds or min(self.thresholds) <= 0:
            raise ConfigError("gan_eval: samples >= 4, truncation > 0, thresholds > 0")
        if self.domain not in HEADS:
            raise ConfigError(f"gan_eval: domain={self.domain!r}: one of {sorted(HEADS)}")


def real_test(cfg: GanEvalConfig, size: int) -> torch.Tensor:
    """The first cfg.samples test images of the domain, (N, 3, size, size) in [-1, 1]."""
    manifest = pd.read_parquet(Path(cfg.data_dir) / "manifest.parquet")
    if cfg.domain == "fashion":
        part = manifest[(manifest["source"] == "fashion") & (manifest["split"] == "test")][:cfg.samples]
        return to_tensor(load_images(part["file"].tolist(), part["index"].tolist(), cfg.data_dir), size)
    test = manifest.loc[manifest["split"] == "test", "index"].to_numpy()
    with np.load(Path(cfg.data_dir) / f"faces{size}.npz", allow_pickle=False) as z:
        return to_tensor(z["images"][test[:cfg.samples]], size)


def load_generator(folder: Path) -> Generator:
    g = Generator(GANConfig(**json.loads((folder / "config.json").read_text())))
    load_model(g, str(folder / "generator.safetensors"))
    return g.eval()


@torch.no_grad()
def generate(g: Generator, n: int, seed: int, threshold: float | None = None, batch: int = 500) -> torch.Tensor:
    z = sample_z(n, g.z_dim, threshold, torch.Generator().manual_seed(seed))
    return torch.cat([g(z[i:i + batch]) for i in range(0, n, batch)])


@torch.no_grad()
def diversity(features: torch.Tensor) -> float:
    """Mean pairwise Euclidean distance between the images' feature vectors (N, D), pairs i != j."""
    d = torch.cdist(features.double(), features.double())
    n = len(features)
    return (d.sum() / (n * (n - 1))).item()


@torch.no_grad()
def coverage(net, heads: dict[str, list[str]], x: torch.Tensor) -> dict[str, float]:
    """Per head, the share of its classes that at least one image is classified as."""
    logits = net(x)
    return {h: len(set(logits[h].argmax(-1).tolist())) / len(names) for h, names in heads.items()}


@torch.no_grad()
def class_shares(net, head: str, names: list[str], x: torch.Tensor) -> dict[str, float]:
    """Share of the images `head` assigns to each class: coverage says which classes appear, this how evenly."""
    counts = torch.bincount(net(x)[head].argmax(-1), minlength=len(names)).double() / len(x)
    return {name: round(c.item(), 4) for name, c in zip(names, counts)}


def to_grid(x: torch.Tensor, n: int) -> np.ndarray:
    """(n*n, 3, S, S) in [-1, 1] -> (n*S, n*S, 3) uint8."""
    img = ((x[:n * n].clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    s = img.shape[1]
    return img.reshape(n, n, s, s, 3).transpose(0, 2, 1, 3, 4).reshape(n * s, n * s, 3)


def save_grid(x: torch.Tensor, n: int, path: Path, scale: int = 3) -> None:
    from PIL import Image

    grid = Image.fromarray(to_grid(x, n))
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)


def plot_truncation(rows: dict[str, list[dict]], real_diversity: float, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5))
    ax_f, ax_d = fig.subplots(1, 2)
    for loss, pts in rows.items():
        t = [p["threshold"] for p in pts]
        ax_f.plot(t, [p["fid"] for p in pts], marker="o", label=loss)
        ax_d.plot(t, [p["diversity"] for p in pts], marker="o", label=loss)
    ax_d.axhline(real_diversity, color="grey", linestyle="--", label="real images")
    for ax, title in ((ax_f, "FID vs truncation threshold"), (ax_d, "diversity (mean pairwise feature distance)")):
        ax.set_xlabel("threshold (|z| redrawn beyond it)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))


def gan_eval(cfg: GanEvalConfig) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = load_eval_net(cfg.eval_net)
    ext = extractor(net, HEADS[cfg.domain], cfg.eval_net)
    heads = ({"class": list(FASHION_LABELS)} if cfg.domain == "fashion"
             else json.loads((Path(cfg.eval_net) / "attributes.json").read_text()))
    folders = sorted(p.parent for p in Path(cfg.train_dir).glob("*/generator.safetensors"))
    if not folders:
        raise FileNotFoundError(f"{cfg.train_dir}: no generator folders (run gan_train)")
    size = GANConfig(**json.loads((folders[0] / "config.json").read_text())).image_size
    real = real_test(cfg, size)
    with torch.no_grad():
        real_div = diversity(ext.features(real))
    head = HEADS[cfg.domain]
    result = {"real": {"images": len(real), "diversity": real_div, "coverage": coverage(net, heads, real),
                       "class_shares": class_shares(net, head, heads[head], real),
                       "inception_score": generation_scores(ext, real, real)["inception_score"]},
              "extractor": ext.name, "domain": cfg.domain, "head": HEADS[cfg.domain], "losses": {}}
    sweep = {}
    for folder in folders:
        loss = folder.name
        g = load_generator(folder)
        fake = generate(g, cfg.samples, cfg.seed)
        scores = generation_scores(ext, real, fake, cfg.seed)
        with torch.no_grad():
            div = diversity(ext.features(fake))
        train = json.loads((folder / "summary.json").read_text())
        history = json.loads((folder / "history.json").read_text())
        result["losses"][loss] = {**scores, "diversity": div, "coverage": coverage(net, heads, fake),
                                  "class_shares": class_shares(net, head, heads[head], fake),
                                  "steps": train["steps"], "d_steps_per_g_step": train["d_steps_per_g_step"],
                                  "train_seconds": train["train_seconds"], "fid_over_training": history["eval"]}
        sweep[loss] = []
        for t in cfg.thresholds:
            x = generate(g, cfg.samples, cfg.seed, t)
            with torch.no_grad():
                d = diversity(ext.features(x))
            sweep[loss].append({"threshold": t, "fid": generation_scores(ext, real, x, cfg.seed)["fid"], "diversity": d})
        save_grid(fake, cfg.grid, out / f"samples_{loss}.png")
        save_grid(generate(g, cfg.grid ** 2, cfg.seed, cfg.truncation), cfg.grid, out / f"samples_{loss}_truncated.png")
        print(f"gan_eval/{loss}: FID {scores['fid']:.2f} (floor {scores['fid_floor']:.2f}) "
              f"IS {scores['inception_score']:.2f} coverage {result['losses'][loss]['coverage'][HEADS[cfg.domain]]:.3f}",
              flush=True)
    result["truncation"] = sweep
    plot_truncation(sweep, real_div, out / "truncation.png")
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(report(result, cfg))
    return result


def report(r: dict, cfg: GanEvalConfig) -> str:
    real, head, what = r["real"], HEADS[cfg.domain], WHAT[cfg.domain]
    attrs = [h for h in real["coverage"] if h != head]   # the faces' 8 attributes; none for fashion
    if attrs:
        intro = ("Coverage = share of the 36 (face, skin, hair) classes the samples are classified as (the "
                 "mode-collapse indicator); attribute coverage = mean over the 8 attributes of the share of "
                 "their classes present.")
    else:
        intro = (f"Coverage = share of the {len(FASHION_LABELS)} Fashion-MNIST classes the samples are "
                 "classified as (the mode-collapse indicator).")
    lines = [f"# {'Face' if cfg.domain == 'faces' else 'Fashion-MNIST'} GAN: {cfg.samples} samples per generator "
             f"vs {real['images']} held-out {what}", "", f"Scores through `{r['extractor']}`. {intro}", "",
             f"| loss | D steps per G step | G steps | train s | FID | FID floor | IS | {head} coverage |"
             + (" attribute coverage |" if attrs else "") + " diversity |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if attrs else "")]
    attr_cell = lambda cov: f" {np.mean([cov[h] for h in attrs]):.3f} |" if attrs else ""  # noqa: E731
    for loss, m in r["losses"].items():
        lines.append(f"| {loss} | {m['d_steps_per_g_step']} | {m['steps']} | {m['train_seconds']:.0f} | {m['fid']:.2f} | "
                     f"{m['fid_floor']:.2f} | {m['inception_score']:.2f} | {m['coverage'][head]:.3f} |"
                     f"{attr_cell(m['coverage'])} {m['diversity']:.3f} |")
    lines.append(f"| real {what} | | | | | | {real['inception_score']:.2f} | {real['coverage'][head]:.3f} |"
                 f"{attr_cell(real['coverage'])} {real['diversity']:.3f} |")
    if not attrs:
        lines += ["", f"Share of the samples per class (`{head}` head's argmax):", "",
                  "| | " + " | ".join(real["class_shares"]) + " |", "|---|" + "---|" * len(real["class_shares"])]
        for name, m in [*r["losses"].items(), (f"real {what}", real)]:
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in m["class_shares"].values()) + " |")
    lines += ["", "FID against the truncation threshold (lower threshold = z nearer 0):", "",
              "| loss | " + " | ".join(str(t) for t in cfg.thresholds) + " |", "|---|" + "---|" * len(cfg.thresholds)]
    for loss, pts in r["truncation"].items():
        lines.append(f"| {loss} | " + " | ".join(f"{p['fid']:.1f} / {p['diversity']:.2f}" for p in pts) + " |")
    lines += ["", "(each cell: FID / diversity)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(GanEvalConfig, "gan_eval", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        r = gan_eval(cfg)
        for loss, m in r["losses"].items():
            mlflow.log_metrics({f"{loss}.fid": m["fid"], f"{loss}.fid_floor": m["fid_floor"],
                                f"{loss}.inception_score": m["inception_score"], f"{loss}.coverage": m["coverage"][r["head"]],
                                f"{loss}.diversity": m["diversity"]})
        for p in sorted(Path(cfg.out_dir).glob("*.png")) + [Path(cfg.out_dir) / "report.md"]:
            mlflow.log_artifact(str(p))
    print(json.dumps({loss: {k: m[k] for k in ("fid", "fid_floor", "inception_score")} for loss, m in r["losses"].items()}))


@task(name="gan_eval", task_run_name="{stage}")
def gan_eval_task(run: dict[str, str], stage: str = "gan_eval") -> dict:
    return run_stage(stage, **run)


if __name__ == "__main__":
    main()
