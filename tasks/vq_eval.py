"""vq_eval: samples of the VQ prior decoded to pixels, scored by FID and IS beside the real-vs-real floor.

For each (temperature, top_p) of the grid, `samples` images are generated: the prior (vq_prior's GPT)
continues [START] by grid x grid codes through models/sampling.py (top-p, temperature, a seed), the
VQ-VAE (vq_train's) decodes them. A START token sampled where a code belongs (the prior never saw
one there) is counted and replaced by code 0. Beside the samples: the VQ-VAE's reconstructions of
the same real test images (what a perfect prior could reach through this tokenizer) and the FID
floor (two halves of the real images). FID and IS through the evaluation network of the domain
(forgeline/image_metrics.py; its name and weights digest in every row). Sample grids as PNG.

The first setting's samples also go through vq_upsample's 2x super-resolution (32 -> 64), the
serving path's last step: samples_t<T>_p<P>_x2.png and its time per image.

Writes data/vq_eval/: metrics.json, report.md (the table), real.png, reconstructions.png,
samples_t<T>_p<P>.png.

    python -m tasks.vq_eval [key=value ...]
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from prefect import task

from forgeline.checkpoint import load_model_folder
from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.image_metrics import extractor, generation_scores, load_eval_net
from forgeline.images import load_images, to_tensor
from forgeline.workspace import run_stage
from models.sampling import GenerationConfig, generate
from models.upsampler import Upsampler, UpsamplerConfig
from models.vqvae import VQVAE, VQVAEConfig, code_stats


@dataclass
class VqEvalConfig:
    manifest: str = "data/img_data/manifest.parquet"
    vqvae: str = "data/vq_train"
    prior: str = "data/vq_prior"
    upsampler: str = "data/vq_upsample"          # the serving path's last step, applied to the first setting's samples
    eval_net: str = "data/img_eval_net"
    out_dir: str = "data/vq_eval"
    domain: str = "fashion"                      # fashion | scenes: vq_train's
    real_images: int = 2000                      # real test images: FID reference and the floor's two halves
    samples: int = 1000                          # generated images per setting
    temperatures: list[float] = field(default_factory=lambda: [1.0, 0.8])
    top_ps: list[float] = field(default_factory=lambda: [1.0, 0.9])
    batch_size: int = 250
    grid: int = 8                                # sample grids of grid x grid images
    seed: int = 0

    def check(self) -> None:
        if min(self.real_images, self.samples, self.batch_size, self.grid) < 1 or self.real_images < 4:
            raise ConfigError("vq_eval: real_images >= 4; samples, batch_size, grid >= 1")
        if not self.temperatures or not self.top_ps or min(self.temperatures) <= 0:
            raise ConfigError("vq_eval: temperatures (> 0) and top_ps must not be empty")
        if not all(0 < p <= 1 for p in self.top_ps):
            raise ConfigError("vq_eval: each top_p in (0, 1]")
        if self.domain not in ("fashion", "scenes"):
            raise ConfigError(f"vq_eval: domain={self.domain!r}: fashion or scenes")


def sample_codes(prior, start: int, n: int, tokens: int, temperature: float, top_p: float, seed: int,
                 batch_size: int) -> torch.Tensor:
    """(n, tokens) codes sampled from [START] in raster order (models/sampling.py's generate)."""
    cfg = GenerationConfig(max_new_tokens=tokens, temperature=temperature, top_p=top_p, seed=seed)
    return torch.tensor(generate(prior, [[start]] * n, cfg, batch_size=batch_size))


def save_grid(images: torch.Tensor, path: Path, cols: int) -> None:
    """(N, 3, S, S) in [-1, 1] -> one PNG of rows of `cols` images, 1-pixel grey gaps."""
    from PIL import Image

    n, _, s, _ = images.shape
    rows = -(-n // cols)
    canvas = np.full((rows * (s + 1) + 1, cols * (s + 1) + 1, 3), 128, np.uint8)
    pix = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    for i, img in enumerate(pix):
        r, c = divmod(i, cols)
        canvas[1 + r * (s + 1):1 + r * (s + 1) + s, 1 + c * (s + 1):1 + c * (s + 1) + s] = img
    Image.fromarray(canvas).resize((canvas.shape[1] * 3, canvas.shape[0] * 3), Image.NEAREST).save(path)


def vq_eval(cfg: VqEvalConfig) -> dict:
    manifest = pd.read_parquet(cfg.manifest)
    vq = load_model_folder(cfg.vqvae, VQVAE, config_cls=VQVAEConfig)
    prior = load_model_folder(cfg.prior)
    meta = json.loads((Path(cfg.prior) / "prior.json").read_text())
    folder = Path(cfg.eval_net) / cfg.domain
    net = load_eval_net(folder)
    upsampler = load_model_folder(cfg.upsampler, Upsampler, config_cls=UpsamplerConfig)
    ext = extractor(net, "class" if cfg.domain == "fashion" else "count", folder)
    net_size, size = net.config.image_size, vq.config.image_size

    def to_net(x: torch.Tensor) -> torch.Tensor:
        """The VQ-VAE's pixels at the evaluation network's size (scenes: 32 -> 64)."""
        return x if size == net_size else F.interpolate(x, size=(net_size, net_size), mode="bilinear",
                                                        align_corners=False)

    source = "fashion" if cfg.domain == "fashion" else "scene"
    part = manifest[(manifest["source"] == source) & (manifest["split"] == "test")].iloc[:cfg.real_images]
    files = part["file"].tolist() if cfg.domain == "fashion" else [f"scenes{size}.npz"] * len(part)
    real = to_tensor(load_images(files, part["index"].tolist(), Path(cfg.manifest).parent), size)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    with torch.no_grad():
        recon = torch.cat([vq(real[i:i + cfg.batch_size])[0] for i in range(0, len(real), cfg.batch_size)])
    scores = generation_scores(ext, to_net(real), to_net(recon), cfg.seed)
    rows.append({"setting": "VQ-VAE reconstructions of the real images", **scores})
    save_grid(real[:cfg.grid ** 2], out / "real.png", cfg.grid)
    save_grid(recon[:cfg.grid ** 2], out / "reconstructions.png", cfg.grid)
    for t in cfg.temperatures:
        for p in cfg.top_ps:
            t0 = time.perf_counter()
            codes = sample_codes(prior, meta["start_token"], cfg.samples, vq.config.tokens, t, p, cfg.seed,
                                 cfg.batch_size)
            invalid = int((codes >= vq.config.codebook_size).sum())
            codes = codes.masked_fill(codes >= vq.config.codebook_size, 0)
            with torch.no_grad():
                fake = torch.cat([vq.decode(codes[i:i + cfg.batch_size]) for i in range(0, len(codes), cfg.batch_size)])
            seconds = time.perf_counter() - t0
            name = f"samples_t{t:g}_p{p:g}"
            save_grid(fake[:cfg.grid ** 2], out / f"{name}.png", cfg.grid)
            if not rows[1:]:   # the serving path's last step on the first setting: 2x super-resolution
                t1 = time.perf_counter()
                with torch.no_grad():
                    big = upsampler(fake[:cfg.grid ** 2])
                upsample_ms = 1000 * (time.perf_counter() - t1) / len(big)
                save_grid(big, out / f"{name}_x2.png", cfg.grid)
            stats = code_stats(codes, vq.config.codebook_size)
            rows.append({"setting": f"prior samples, temperature {t:g}, top-p {p:g}", "temperature": t, "top_p": p,
                         **generation_scores(ext, to_net(real), to_net(fake), cfg.seed),
                         "ms_per_image": 1000 * seconds / len(fake), "invalid_tokens": invalid,
                         "code_usage": stats["usage"], "code_perplexity": stats["perplexity"], "grid": f"{name}.png"})
            print(f"vq_eval: {rows[-1]['setting']}: FID {rows[-1]['fid']:.3f} (floor {rows[-1]['fid_floor']:.3f}) "
                  f"IS {rows[-1]['inception_score']:.2f} {rows[-1]['ms_per_image']:.1f} ms/image", flush=True)
    metrics = {"domain": cfg.domain, "feature_extractor": ext.name, "rows": rows, "upsample_ms_per_image": upsample_ms,
               "vq_upsample": json.loads((Path(cfg.upsampler) / "metrics.json").read_text()),
               "vq_train": json.loads((Path(cfg.vqvae) / "metrics.json").read_text()),
               "vq_prior": json.loads((Path(cfg.prior) / "metrics.json").read_text())}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "report.md").write_text(report(metrics))
    return metrics


def report(m: dict) -> str:
    t, p = m["vq_train"]["test"], m["vq_prior"]
    lines = [f"# VQ-VAE and its GPT prior ({m['domain']}, 32x32)", "",
             f"Tokenizer on {t['images']} test images: MSE {t['mse_01']:.5f} (pixels in [0, 1]), PSNR {t['psnr']:.2f} dB, "
             f"codebook usage {t['usage']:.1%}, perplexity {t['perplexity']:.1f}.",
             f"Prior on {p['test_images']} test images: {p['test_bits_per_token']:.3f} bits per token "
             f"(uniform: {p['uniform_bits_per_token']:.2f}), {p['test_bits_per_dim']:.4f} bits per dimension.", "",
             "2x super-resolution (vq_upsample) on test images, PSNR: " + ", ".join(
                 f"{k} {v:.2f} dB" for k, v in m["vq_upsample"]["test_psnr"].items())
             + f"; {m['upsample_ms_per_image']:.2f} ms per sample (32 -> 64).", "",
             f"FID and IS through `{m['feature_extractor']}`.", "",
             "| images | FID | real-vs-real floor | IS | ms/image | START sampled |", "|---|---|---|---|---|---|"]
    for r in m["rows"]:
        lines.append(f"| {r['setting']} | {r['fid']:.3f} | {r['fid_floor']:.3f} | {r['inception_score']:.2f} | "
                     f"{r.get('ms_per_image', float('nan')):.2f} | {r.get('invalid_tokens', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(VqEvalConfig, "vq_eval", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        metrics = vq_eval(cfg)
        for r in metrics["rows"]:
            key = "recon" if "temperature" not in r else f"t{r['temperature']:g}_p{r['top_p']:g}"
            mlflow.log_metrics({f"{key}.fid": r["fid"], f"{key}.is": r["inception_score"], "fid_floor": r["fid_floor"]})
        for name in ("metrics.json", "report.md"):
            mlflow.log_artifact(str(Path(cfg.out_dir) / name))
    print((Path(cfg.out_dir) / "report.md").read_text())


@task(name="vq_eval", retries=1, retry_delay_seconds=10)
def vq_eval_task(run: dict[str, str]) -> dict:
    return run_stage("vq_eval", **run)


if __name__ == "__main__":
    main()
