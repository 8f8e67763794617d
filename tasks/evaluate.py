"""Evaluate: validation perplexity and bits per byte of a trained model, plus sampled continuations.

Bits per byte divides the summed negative log-likelihood (in bits) by the UTF-8 bytes the
predicted tokens stand for, so it compares models with different tokenizers; perplexity is
per token and does not.

    python -m tasks.evaluate [key=value ...]
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from prefect import task

from forgeline import metrics as fm
from forgeline.checkpoint import load_model_folder
from forgeline.config import ConfigError, config_dict, load_config
from forgeline.workspace import run_stage
from models.sampling import GenerationConfig, generate


@dataclass
class EvaluateConfig:
    model_dir: str = "data/pretrain"        # config.json + model.safetensors + tokenizer.json
    tokenizer_dir: str = "data/tokenizer"   # val.bin + meta.json
    out_dir: str = "data/evaluate"
    context: int = 0                        # tokens per window; 0 = the model's block_size
    max_eval_tokens: int = 500_000          # cap on val tokens scored (the whole split if smaller)
    batch_size: int = 8
    n_samples: int = 4                      # held-out prompts to continue
    prompt_tokens: int = 24
    max_new_tokens: int = 48
    temperature: float = 0.8
    top_k: int = 40
    seed: int = 1234

    def check(self) -> None:
        if self.context < 0 or self.batch_size < 1 or self.max_eval_tokens < 2:
            raise ConfigError("evaluate: need context >= 0, batch_size >= 1, max_eval_tokens >= 2")


def byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens), from the byte-level alphabet."""
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of the 256 bytes
    assert len(alphabet) == 256
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for piece, i in tokenizer.get_vocab().items():
        if piece not in special:
            lengths[i] = len(piece)  # one stand-in character per byte
    return lengths


@torch.no_grad()
def score(model, tokens: np.ndarray, context: int, batch_size: int, lengths: np.ndarray) -> dict:
    """Summed NLL over non-overlapping windows of the token stream; every token but the first predicted."""
    n_windows = (len(tokens) - 1) // context
    nll_nats, n_tokens, n_bytes = 0.0, 0, 0
    for b in range(0, n_windows, batch_size):
        starts = range(b * context, min(n_windows, b + batch_size) * context, context)
        x = torch.from_numpy(np.stack([tokens[s:s + context] for s in starts]).astype(np.int64))
        y = torch.from_numpy(np.stack([tokens[s + 1:s + 1 + context] for s in starts]).astype(np.int64))
        logits, _ = model(x)
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
        nll_nats += nll.item()
        n_tokens += y.numel()
        n_bytes += int(lengths[y.numpy()].sum())
    return {"val_loss": nll_nats / n_tokens, "val_perplexity": fm.perplexity_from_nll(nll_nats, n_tokens),
            "val_bits_per_byte": fm.bits_per_byte(nll_nats, max(1, n_bytes)),
            "scored_tokens": n_tokens, "scored_bytes": n_bytes}


def held_out_prompts(tokens: np.ndarray, eot: int, n: int, length: int) -> list[np.ndarray]:
    """The first `length` tokens of the first `n` validation documents."""
    bounds = np.flatnonzero(tokens == eot)
    starts = np.concatenate([[0], bounds + 1])[:n]
    return [tokens[s:s + length] for s in starts if s + length <= len(tokens)]


def evaluate(cfg: EvaluateConfig) -> dict:
    from tokenizers import Tokenizer


    torch.manual_seed(cfg.seed)
    model = load_model_folder(cfg.model_dir)
    tokenizer = Tokenizer.from_file(str(Path(cfg.model_dir) / "tokenizer.json"))
    meta = json.loads((Path(cfg.tokenizer_dir) / "meta.json").read_text())
    val = np.memmap(Path(cfg.tokenizer_dir) / "val.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    val = np.asarray(val[:cfg.max_eval_tokens])
    context = cfg.context or model.config.block_size

    t0 = time.perf_counter()
    metrics = score(model, val, context, cfg.batch_size, byte_lengths(tokenizer))
    metrics["eval_seconds"] = time.perf_counter() - t0
    metrics["context"] = context

    eot = meta["special_tokens"]["<|endoftext|>"]
    prompts = [p.astype(np.int64).tolist() for p in held_out_prompts(val, eot, cfg.n_samples, cfg.prompt_tokens)]
    decoding = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                seed=cfg.seed)
    outs = generate(model, prompts, decoding) if prompts else []
    shown = {k: getattr(decoding, k) for k in ("temperature", "top_k", "max_new_tokens", "seed")}
    samples = [{"prompt": tokenizer.decode(p), "continuation": tokenizer.decode(o), "decoding": shown}
               for p, o in zip(prompts, outs)]

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    lines = [f"# Samples from {cfg.model_dir}", "",
             f"Decoding: temperature={cfg.temperature}, top_k={cfg.top_k}, "
             f"max_new_tokens={cfg.max_new_tokens}, seed={cfg.seed}; prompts: the first "
             f"{cfg.prompt_tokens} tokens of held-out (validation) documents.", ""]
    for i, s in enumerate(samples, 1):
        lines += [f"## Sample {i}", "", f"**Prompt:** {s['prompt']!r}", "",
                  f"**Continuation:** {s['continuation']!r}", ""]
    (out / "samples.md").write_text("\n".join(lines))
    (out / "samples.json").write_text(json.dumps(samples, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    cfg = load_config(EvaluateConfig, "evaluate", sys.argv[1:] if argv is None else argv)
    with stage_run("evaluate", config_dict(cfg)):
        metrics = evaluate(cfg)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_artifact(str(Path(cfg.out_dir) / "samples.md"))
        mlflow.log_text((Path(cfg.out_dir) / "samples.md").read_text(), "samples.txt")
    print(f"evaluate: val loss {metrics['val_loss']:.4f}, perplexity {metrics['val_perplexity']:.2f}, "
          f"{metrics['val_bits_per_byte']:.4f} bits/byte over {metrics['scored_tokens']} tokens")


@task(name="evaluate", retries=0)
def evaluate_task(run: dict[str, str]) -> dict:
    return run_stage("evaluate", **run)


if __name__ == "__main__":
    main()
