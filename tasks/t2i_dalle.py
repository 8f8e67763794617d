"""t2i_dalle: the DALL-E form of text-to-image (book chapter 9 beside the diffusion model; Ramesh et al.
2021, arXiv:2102.12092): caption tokens as a prefix to the VQ image tokens in the same GPT.

The train scenes are tokenised by t2i_vq's VQ-VAE (32x32 -> an 8x8 grid, 64 codes in raster order).
A sequence is [caption words, right-padded to text_len] [BOS] [64 image codes]; the vocabulary is
the codes 0..K-1, BOS = K, PAD = K+1, then the caption words (forgeline/scenes.py VISUAL_WORDS,
sorted; other words are dropped). The project's GPT (models/gpt.py) trains on it with next-token
cross-entropy on the image codes plus `text_weight` x the cross-entropy on the text (0 = off);
`positions: 2d` gives the image part row + column encodings (GPTConfig.pos_2d, grid_start =
text_len + 1) on top of the 1D ones. Each step draws each scene's caption from its six at random.
Reports held-out bits per image token (test scenes, their first caption).

Then, for `samples` test scenes drawn with `seed` (every test scene holds an unseen (shape, colour)
pair), the prompt [first caption][BOS] is continued by 64 codes through models/sampling.py (top-p,
temperature, a seed); a non-code token sampled where a code belongs is counted and replaced by code
0; t2i_vq's decoder turns the codes into pixels.

One linear loop (tasks/vq_prior.py's shape): a batch is a pure function of (seed, step); full-state
checkpoints under checkpoints/t2i_dalle/<key>/ and resume. Writes data/t2i_dalle/: config.json +
model.safetensors (GPTConfig; forgeline.checkpoint.load_model_folder loads it), dalle.json (vocab,
special tokens, text_len, grid, the VQ-VAE folder), history.json, metrics.json, samples.npz
(`images` uint8 (N, 32, 32, 3), `image_ids` str (N,) the manifest image_id of each prompt's scene,
`prompts` str (N,), `seconds_per_image` float: sampling + decoding, batched) and samples.png (a grid
with the prompts). t2i_eval scores samples.npz.

    python -m tasks.t2i_dalle [key=value ...]
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
from prefect import task
from safetensors.torch import save_model

from forgeline.checkpoint import checkpoint_key, load_model_folder, resume_training_state, save_training_state
from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.expectations import GateClosed, check_gate
from forgeline.images import load_images, to_tensor
from forgeline.scenes import VISUAL_WORDS
from forgeline.schedule import warmup_cosine
from forgeline.workspace import run_stage
from models.gpt import GPT, PRESETS, GPTConfig, linear_cross_entropy
from models.sampling import GenerationConfig, generate
from models.vqvae import VQVAE, VQVAEConfig


@dataclass
class T2iDalleConfig:
    manifest: str = "data/img_data/manifest.parquet"
    validation: str = "data/img_validate/result.json"   # the gate: img_validate's verdict on this manifest
    vqvae: str = "data/t2i_vq"
    out_dir: str = "data/t2i_dalle"
    ckpt_dir: str = "checkpoints/t2i_dalle"
    train_images: int = 0              # train scenes used (0 = all)
    test_images: int = 1000            # held-out scenes for bits per image token
    text_len: int = 24                 # caption words kept (the longest caption has 24), PAD after
    text_weight: float = 0.0           # weight of the text tokens' cross-entropy (0 = image tokens only)
    preset: str = "tiny"
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    pos_encoding: str = "learned"      # 1D positions over the whole sequence: learned, rope or sincos
    positions: str = "2d"              # 1d | 2d: 2d adds row + column encodings to the image tokens
    grid_encoding: str = "learned"     # with positions 2d: learned or sincos
    dropout: float = 0.0
    batch_size: int = 32
    max_steps: int = 1000
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    ckpt_interval: int = 250
    keep_checkpoints: int = 2
    log_interval: int = 100
    samples: int = 200                 # held-out prompts sampled (the file t2i_eval scores)
    temperature: float = 1.0
    top_p: float = 0.9
    sample_batch: int = 100
    grid: int = 6                      # samples.png: grid x grid samples with their prompts
    seed: int = 1337

    def check(self) -> None:
        for name in ("batch_size", "max_steps", "ckpt_interval", "log_interval", "test_images", "text_len",
                     "samples", "sample_batch", "grid"):
            if getattr(self, name) < 1:
                raise ConfigError(f"t2i_dalle: {name} must be >= 1")
        if self.preset not in PRESETS:
            raise ConfigError(f"t2i_dalle: preset {self.preset!r}: one of {sorted(PRESETS)}")
        if self.positions not in ("1d", "2d") or self.grid_encoding not in ("learned", "sincos"):
            raise ConfigError(f"t2i_dalle: positions={self.positions!r} (1d or 2d), "
                              f"grid_encoding={self.grid_encoding!r} (learned or sincos)")
        if not 0 <= self.min_lr <= self.lr or self.text_weight < 0:
            raise ConfigError("t2i_dalle: need 0 <= min_lr <= lr and text_weight >= 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("t2i_dalle: need temperature >= 0 and 0 < top_p <= 1")

    def model_config(self, vq: VQVAEConfig) -> GPTConfig:
        vocab = vq.codebook_size + 2 + len(WORDS)
        return GPTConfig.from_preset(self.preset, vocab_size=vocab, block_size=self.text_len + 1 + vq.tokens,
                                     n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head,
                                     pos_encoding=self.pos_encoding, dropout=self.dropout,
                                     pos_2d=self.grid_encoding if self.positions == "2d" else "none",
                                     grid_h=vq.grid, grid_w=vq.grid, grid_start=self.text_len + 1)

    def checkpoint_root(self) -> Path:
        skip = {"out_dir", "ckpt_dir", "log_interval", "keep_checkpoints", "validation", "test_images", "samples",
                "temperature", "top_p", "sample_batch", "grid"}
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        inputs = [Path(self.manifest), Path(self.vqvae) / "model.safetensors"]
        return Path(self.ckpt_dir) / checkpoint_key(settings, inputs)


WORDS = sorted(VISUAL_WORDS)   # the caption vocabulary, after the codes, BOS and PAD


def caption_tokens(text: str, codebook_size: int, text_len: int) -> list[int]:
    """A caption -> text_len ids: its VISUAL_WORDS in order (others dropped), cut at text_len, PAD after."""
    first, pad = codebook_size + 2, codebook_size + 1
    ids = [first + WORDS.index(w) for w in text.lower().split() if w in VISUAL_WORDS][:text_len]
    return ids + [pad] * (text_len - len(ids))


def dalle_loss(model: GPT, seqs: torch.Tensor, text_len: int, text_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, image-token loss) of sequences (B, text_len + 1 + tokens) = [text][BOS][codes].

    Input position t predicts token t + 1: targets at t >= text_len are the image codes; those before
    (the caption's words after the first, and BOS) are the text, weighted by text_weight (0 = no loss)."""
    h = model.hidden(seqs[:, :-1]).flatten(0, 1)                     # (B * (L - 1), C)
    targets = seqs[:, 1:]
    is_image = torch.arange(targets.size(1), device=seqs.device) >= text_len
    image_loss = linear_cross_entropy(h, model.lm_head.weight, targets.masked_fill(~is_image, -100).flatten())
    if text_weight == 0:
        return image_loss, image_loss
    text_loss = linear_cross_entropy(h, model.lm_head.weight, targets.masked_fill(is_image, -100).flatten())
    return image_loss + text_weight * text_loss, image_loss


@torch.no_grad()
def image_nll_nats(model: GPT, seqs: torch.Tensor, text_len: int, batch: int = 250) -> float:
    """Mean NLL (nats) of the image codes of `seqs`, caption and BOS given."""
    model.eval()
    total = sum(dalle_loss(model, seqs[i:i + batch], text_len, 0.0)[1].item() * len(seqs[i:i + batch])
                for i in range(0, len(seqs), batch))
    model.train()
    return total / len(seqs)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, S, S) in [-1, 1] -> (N, S, S, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def sample_codes(model: GPT, prompts: list[list[int]], codebook_size: int, tokens: int,
                 cfg: T2iDalleConfig) -> tuple[torch.Tensor, int]:
    """(N, tokens) codes continuing prompts [text][BOS] (models/sampling.py: temperature, top-p, seed), and
    how many sampled tokens were not codes (BOS, PAD or a word where a code belongs; replaced by code 0)."""
    gen = GenerationConfig(max_new_tokens=tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    codes = torch.tensor(generate(model.eval(), prompts, gen, batch_size=cfg.sample_batch))
    bad = codes >= codebook_size
    return codes.masked_fill(bad, 0), int(bad.sum())


@torch.no_grad()
def sample_images(model: GPT, vq: VQVAE, prompts: list[list[int]], cfg: T2iDalleConfig) -> tuple[np.ndarray, int]:
    """Images (N, S, S, 3) uint8 for prompts [text][BOS] and how many sampled tokens were not codes."""
    codes, bad = sample_codes(model, prompts, vq.config.codebook_size, vq.config.tokens, cfg)
    return np.concatenate([to_uint8(vq.decode(codes[i:i + 250])) for i in range(0, len(codes), 250)]), bad


def save_grid(images: np.ndarray, prompts: list[str], path: Path, n: int) -> None:
    """n x n images, each scaled 4x with its prompt wrapped below it."""
    import textwrap

    from PIL import Image, ImageDraw

    cell_w, img = 150, 128
    cell_h = img + 48
    canvas = Image.new("RGB", (n * cell_w, n * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (im, text) in enumerate(zip(images[:n * n], prompts)):
        x, y = (k % n) * cell_w, (k // n) * cell_h
        canvas.paste(Image.fromarray(im).resize((img, img), Image.NEAREST), (x + (cell_w - img) // 2, y))
        draw.multiline_text((x + 2, y + img + 2), "\n".join(textwrap.wrap(text, 26)[:4]), fill="black", spacing=0)
    canvas.save(path)


def t2i_dalle(cfg: T2iDalleConfig, log=None) -> dict:
    check_gate(cfg.validation, cfg.manifest, "manifest_sha256")
    manifest = pd.read_parquet(cfg.manifest)
    data_dir = Path(cfg.manifest).parent
    vq = load_model_folder(cfg.vqvae, VQVAE, config_cls=VQVAEConfig)
    K, L, size = vq.config.codebook_size, cfg.text_len, vq.config.image_size
    bos = K

    def split(name: str, n: int) -> pd.DataFrame:
        part = manifest[(manifest["source"] == "scene") & (manifest["split"] == name)]
        return part.iloc[:n] if n else part

    def codes_of(part: pd.DataFrame) -> torch.Tensor:
        images = load_images([f"scenes{size}.npz"] * len(part), part["index"].tolist(), data_dir)
        return torch.cat([vq.encode(to_tensor(images[i:i + 500], size)).flatten(1) for i in range(0, len(images), 500)])

    def text_of(part: pd.DataFrame) -> torch.Tensor:
        """(N, captions, L) ids of every caption of each scene."""
        return torch.tensor([[caption_tokens(c, K, L) for c in caps] for caps in part["captions"]])

    t0 = time.perf_counter()
    train_part, test_part = split("train", cfg.train_images), split("test", cfg.test_images)
    with torch.no_grad():
        train_codes, test_codes = codes_of(train_part), codes_of(test_part)
    train_text, test_text = text_of(train_part), text_of(test_part)
    test = torch.cat([test_text[:, 0], torch.full((len(test_codes), 1), bos), test_codes], 1)   # first caption
    tokenise_seconds = time.perf_counter() - t0

    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model_config(vq.config)
    model = GPT(model_cfg)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (0.9, 0.95))
    root = cfg.checkpoint_root()
    step, history = 0, {"train": [], "test": []}
    meta = resume_training_state(root, model, optimizer, model_cfg, stage="t2i_dalle")
    if meta is not None:
        step, history = meta["step"], meta["history"]
    resumed_at = step if meta is not None else -1
    model.train()

    def save() -> None:
        save_training_state(root, step, model, optimizer, model_cfg, cfg, history, {"step": step},
                            keep=cfg.keep_checkpoints)

    t_start = t_last = time.perf_counter()
    while step < cfg.max_steps:
        # ---- learning rate
        lr = warmup_cosine(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # ---- checkpoint (state before this step's update; done already if we resumed here)
        if step > 0 and step != resumed_at and step % cfg.ckpt_interval == 0:
            history["test"].append([step, image_nll_nats(model, test, L)])
            save()

        # ---- one step: scenes and one of each one's captions, a pure function of (seed, step)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        rows = torch.randint(len(train_codes), (cfg.batch_size,), generator=g)
        which = torch.randint(train_text.size(1), (cfg.batch_size,), generator=g)
        seqs = torch.cat([train_text[rows, which], torch.full((cfg.batch_size, 1), bos), train_codes[rows]], 1)
        loss, image_loss = dalle_loss(model, seqs, L, cfg.text_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not (math.isfinite(loss.item()) and math.isfinite(float(grad_norm))):
            raise FloatingPointError(f"t2i_dalle: non-finite loss or grad norm at step {step}")
        optimizer.step()
        step += 1
        history["train"].append([step, image_loss.item()])

        # ---- log
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            print(f"t2i_dalle step {step}/{cfg.max_steps} loss {loss.item():.4f} image {image_loss.item():.4f} "
                  f"lr {lr:.2e} {(now - t_last) / cfg.log_interval:.3f} s/step", flush=True)
            if log:
                log(step, {"loss": loss.item(), "image_loss": image_loss.item(), "lr": lr})
            t_last = now
    if step != resumed_at:
        history["test"].append([step, image_nll_nats(model, test, L)])
        save()
    train_seconds = time.perf_counter() - t_start

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(asdict(model_cfg), indent=2))
    (out / "dalle.json").write_text(json.dumps({
        "words": WORDS, "word_offset": K + 2, "bos_token": bos, "pad_token": K + 1, "text_len": L,
        "grid": vq.config.grid, "order": "raster", "positions": cfg.positions, "vqvae": cfg.vqvae}, indent=2))
    (out / "history.json").write_text(json.dumps(history))

    # ---- samples for held-out prompts: a seeded draw of test scenes, each one's first caption
    test_all = split("test", 0)
    pick = np.sort(np.random.default_rng(cfg.seed).choice(len(test_all), min(cfg.samples, len(test_all)),
                                                          replace=False))
    chosen = test_all.iloc[pick]
    prompts = [caps[0] for caps in chosen["captions"]]
    t1 = time.perf_counter()
    images, not_codes = sample_images(model, vq, [caption_tokens(p, K, L) + [bos] for p in prompts], cfg)
    seconds_per_image = (time.perf_counter() - t1) / len(images)
    np.savez(out / "samples.npz", images=images, image_ids=np.array(chosen["image_id"].tolist(), dtype=str),
             prompts=np.array(prompts, dtype=str), seconds_per_image=np.float64(seconds_per_image))
    save_grid(images, prompts, out / "samples.png", cfg.grid)

    nats, n = history["test"][-1][1], min(len(test), len(train_codes))
    train_eval = torch.cat([train_text[:n, 0], torch.full((n, 1), bos), train_codes[:n]], 1)
    metrics = {"test_nll_nats_per_image_token": nats, "test_bits_per_image_token": nats / math.log(2),
               "uniform_bits_per_token": math.log2(K), "positions": cfg.positions,
               "train_nll_nats_per_image_token": image_nll_nats(model, train_eval, L),
               "train_images": len(train_codes), "test_images": len(test), "steps": step,
               "params": model.num_params(), "tokenise_seconds": tokenise_seconds, "train_seconds": train_seconds,
               "samples": len(images), "seconds_per_image": seconds_per_image, "sampled_non_codes": not_codes,
               "temperature": cfg.temperature, "top_p": cfg.top_p, "resumed_at": resumed_at}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(T2iDalleConfig, "t2i_dalle", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        try:
            metrics = t2i_dalle(cfg, log=lambda step, m: mlflow.log_metrics(m, step=step))
        except GateClosed as e:
            print(f"t2i_dalle: REFUSED\n{e}", file=sys.stderr)
            sys.exit(1)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(Path(cfg.out_dir) / "samples.png"))
    print(json.dumps(metrics))


@task(name="t2i_dalle", retries=1, retry_delay_seconds=10)  # a retry resumes from the last checkpoint
def t2i_dalle_task(run: dict[str, str]) -> dict:
    return run_stage("t2i_dalle", **run)


if __name__ == "__main__":
    main()
