"""Benchmark POST /v1/images/generations (serve/images.py): milliseconds per request and per image of
each model, through the endpoint in process (FastAPI's TestClient: validation, generation in the
thread pool, PNG and base64) against the same generation called directly (the model's `run`, no HTTP,
no PNG), and for t2i the served per-image loop (one `diffusion.generate` per seed, so image i is the
same whatever n) against one batched `generate` of the n prompts.

The models are the stages' folders where they exist (data/gan_train/..., data/vq_*, data/t2i_train:
what `forgeline serve` loads), else untrained models of the stage configs' default architectures
(configs/gan_train.yaml, vq_train, vq_prior, vq_upsample, t2i_train): the time per image depends on
the architecture, not on the weights' values. Each row says which. Rows interleave over `--repeats`
rounds after one untimed warm-up request per model (it loads the model); the median is reported. Writes
bench/results/images.json.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_images [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_model

from bench import machine, write_result


def save_folder(folder: Path, model: torch.nn.Module, config, weights: str = "model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / weights))
    (folder / "config.json").write_text(json.dumps(asdict(config), indent=2))
    return folder


def untrained_folders(root: Path) -> dict[str, str]:
    """The env overrides of serve/images.py pointing at untrained models of the default architectures."""
    from forgeline import scenes
    from forgeline.config import load_config
    from models.diffusion import TextToImage
    from models.gan import GANConfig, Generator
    from models.gpt import GPT
    from models.text_encoder import build_vocab
    from models.upsampler import Upsampler, UpsamplerConfig
    from models.vqvae import VQVAE
    from tasks.gan_train import GanTrainConfig
    from tasks.t2i_train import T2iTrainConfig
    from tasks.vq_prior import VqPriorConfig
    from tasks.vq_train import VqTrainConfig
    from tasks.vq_upsample import VqUpsampleConfig

    torch.manual_seed(0)
    g = load_config(GanTrainConfig, "gan_train", [])
    gan_cfg = GANConfig(image_size=g.image_size, z_dim=g.z_dim, g_width=g.g_width, d_width=g.d_width)
    vq_cfg = load_config(VqTrainConfig, "vq_train", []).model_config()
    prior_cfg = load_config(VqPriorConfig, "vq_prior", []).model_config(vq_cfg)
    u = load_config(VqUpsampleConfig, "vq_upsample", [])
    up_cfg = UpsamplerConfig(width=u.width, layers=u.layers)
    vocab = build_vocab(scenes.VISUAL_WORDS)
    t2i_cfg = load_config(T2iTrainConfig, "t2i_train", []).model_config(len(vocab))
    prior = save_folder(root / "vq_prior", GPT(prior_cfg), prior_cfg)
    (prior / "prior.json").write_text(json.dumps({"start_token": vq_cfg.codebook_size}))
    t2i = save_folder(root / "t2i_train", TextToImage(t2i_cfg), t2i_cfg)
    (t2i / "vocab.json").write_text(json.dumps(vocab))
    return {"FORGELINE_GAN_MODEL": str(save_folder(root / "gan", Generator(gan_cfg), gan_cfg, "generator.safetensors")),
            "FORGELINE_VQ_TOKENIZER": str(save_folder(root / "vq_train", VQVAE(vq_cfg), vq_cfg)),
            "FORGELINE_VQ_PRIOR": str(prior),
            "FORGELINE_VQ_UPSAMPLER": str(save_folder(root / "vq_upsample", Upsampler(up_cfg), up_cfg)),
            "FORGELINE_T2I_MODEL": str(t2i)}


CASES = [  # (name, request body beyond prompt and seed)
    ("gan", {"model": "gan"}),
    ("vq 32x32 (no super-resolution)", {"model": "vq", "size": "32x32"}),
    ("vq 64x64 (the whole path)", {"model": "vq", "size": "64x64"}),
    ("t2i, 25 DDIM steps, guidance 3", {"model": "t2i", "steps": 25}),
]
PROMPT = "a large red circle on the left and a blue square on the right"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = machine()

    from fastapi.testclient import TestClient

    from models import diffusion
    from serve import images
    from serve.app import create_app

    tmp = tempfile.TemporaryDirectory()
    untrained = untrained_folders(Path(tmp.name))
    trained = {"FORGELINE_GAN_MODEL": images.GanModel.best_loss(),
               "FORGELINE_VQ_TOKENIZER": Path("data/vq_train"), "FORGELINE_VQ_PRIOR": Path("data/vq_prior"),
               "FORGELINE_VQ_UPSAMPLER": Path("data/vq_upsample"), "FORGELINE_T2I_MODEL": Path("data/t2i_train")}
    weights = {}
    for key, folder in trained.items():   # a stage's folder where it exists, else the untrained one
        real = (folder / "config.json").is_file()
        os.environ[key] = str(folder.resolve()) if real else untrained[key]
        weights[key] = f"trained ({folder})" if real else "untrained, default architecture"
    images.MODELS_LOADED.clear()
    client = TestClient(create_app([("images", images.router)]))

    for _, body in CASES:   # warm-up, untimed: each model loads at its first request
        assert client.post("/v1/images/generations", json={"prompt": PROMPT, "n": 1, **body}).status_code == 200
    times: dict[tuple[str, int, str], list[float]] = {}
    for r in range(args.repeats):
        for name, body in CASES:
            for n in args.n:
                req = images.ImageRequest(prompt=PROMPT, n=n, seed=r, **{k: v for k, v in body.items() if k != "size"})
                t0 = time.perf_counter()
                res = client.post("/v1/images/generations", json={"prompt": PROMPT, "n": n, "seed": r, **body})
                t1 = time.perf_counter()
                assert res.status_code == 200, res.text
                model = images.MODELS_LOADED.get(body["model"])
                size = int(res.json()["size"].split("x")[0])
                prompt = model.read_prompt(PROMPT)[0]
                seeds = [r + i for i in range(n)]
                with torch.inference_mode():
                    t2 = time.perf_counter()
                    model.run(req, seeds, size, prompt)
                    t3 = time.perf_counter()
                times.setdefault((name, n, "endpoint"), []).append(t1 - t0)
                times.setdefault((name, n, "direct"), []).append(t3 - t2)
                if body["model"] == "t2i" and n > 1:   # the served loop's reference: one batch of n
                    t4 = time.perf_counter()
                    diffusion.generate(model.model, model.vocab, [prompt] * n, steps=25, guidance=3.0, seed=r)
                    times.setdefault((name, n, "batched"), []).append(time.perf_counter() - t4)

    rows = []
    for name, body in CASES:
        for n in args.n:
            ep, direct = (statistics.median(times[(name, n, k)]) for k in ("endpoint", "direct"))
            row = {"case": name, "n": n, "endpoint_ms": round(1000 * ep, 1), "endpoint_ms_per_image": round(1000 * ep / n, 1),
                   "direct_ms": round(1000 * direct, 1), "endpoint_over_direct": round(ep / direct, 3)}
            if (name, n, "batched") in times:
                batched = statistics.median(times[(name, n, "batched")])
                row["t2i_batched_ms"] = round(1000 * batched, 1)
                row["per_image_loop_over_batched"] = round(direct / batched, 3)
            rows.append(row)
    print(f"threads {args.threads}, {args.repeats} rounds; weights: {json.dumps(weights)}\n")
    print("| case | n | endpoint ms | ms per image | direct ms | endpoint / direct | t2i batched ms | loop / batched |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['n']} | {row['endpoint_ms']} | {row['endpoint_ms_per_image']} | {row['direct_ms']} | "
              f"{row['endpoint_over_direct']} | {row.get('t2i_batched_ms', '')} | {row.get('per_image_loop_over_batched', '')} |")
    out = write_result("images", {"threads": args.threads, "repeats": args.repeats, "prompt": PROMPT,
                                  "weights": weights, "rows": rows}, started)
    print(f"\n{out}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
