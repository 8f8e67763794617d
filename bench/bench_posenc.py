"""Positional-encoding ablation: RoPE vs fixed sine-cosine vs learned, same training budget.

Each encoding trains the `tiny` preset from the same seed on the demo's token shards
(data/tokenizer, made by `bash scripts/demo.sh` or `dvc repro tokenizer`), then is scored on the
validation split at the training context and at 2x the training context (the claim under test:
fixed and rotary encodings extrapolate to longer contexts, learned ones cannot go past them).

    .venv/bin/python -m bench.bench_posenc [--steps 200]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from forgeline.checkpoint import load_model_folder
from tasks.evaluate import byte_lengths, score
from tasks.pretrain import PretrainConfig, pretrain

ENCODINGS = ["rope", "sincos", "learned"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--tokenizer-dir", default="data/tokenizer")
    parser.add_argument("--max-eval-tokens", type=int, default=100_000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    meta = json.loads((Path(args.tokenizer_dir) / "meta.json").read_text())
    val = np.asarray(np.memmap(Path(args.tokenizer_dir) / "val.bin", dtype=meta["dtype"], mode="r")
                     [:args.max_eval_tokens])
    lengths = byte_lengths(Tokenizer.from_file(str(Path(args.tokenizer_dir) / "tokenizer.json")))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for enc in ENCODINGS:
            cfg = PretrainConfig(tokenizer_dir=args.tokenizer_dir, out_dir=f"{tmp}/{enc}", ckpt_dir=f"{tmp}/ckpt",
                                 pos_encoding=enc, block_size=args.block_size, max_steps=args.steps,
                                 eval_interval=args.steps, ckpt_interval=args.steps, log_interval=50)
            t0 = time.perf_counter()
            pretrain(cfg)
            seconds = time.perf_counter() - t0
            model = load_model_folder(cfg.out_dir)
            row = {"encoding": enc, "train_seconds": round(seconds, 1)}
            for mult in (1, 2):
                ctx = args.block_size * mult
                try:
                    m = score(model, val, ctx, 8, lengths)
                    row[f"bpb@{mult}x"], row[f"ppl@{mult}x"] = round(m["val_bits_per_byte"], 4), round(m["val_perplexity"], 2)
                except ValueError as e:  # learned positions end at block_size
                    row[f"bpb@{mult}x"], row[f"ppl@{mult}x"] = None, None
                    row["note"] = str(e)[:80]
            rows.append(row)
            print(row, flush=True)
    plot(rows, args.block_size)
    print(f"\n| encoding | val bpb @ {args.block_size} | val bpb @ {2 * args.block_size} | ppl @ {args.block_size} | ppl @ {2 * args.block_size} |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['encoding']} | {r['bpb@1x']} | {r['bpb@2x'] if r['bpb@2x'] is not None else 'n/a'} | "
              f"{r['ppl@1x']} | {r['ppl@2x'] if r['ppl@2x'] is not None else 'n/a'} |")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "posenc.json").write_text(json.dumps({"steps": args.steps, "block_size": args.block_size,
                                                 "rows": rows}, indent=2))


def plot(rows: list[dict], block: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in rows:
        xs = [m * block for m in (1, 2) if r[f"bpb@{m}x"] is not None]
        ax.plot(xs, [r[f"bpb@{m}x"] for m in (1, 2) if r[f"bpb@{m}x"] is not None], "o-", label=r["encoding"])
    ax.set_xlabel("evaluation context (tokens)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(f"positional encodings, trained at {block} tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(__file__).parent / "results" / "posenc.png", dpi=110)


if __name__ == "__main__":
    main()
