"""Tokenizer training throughput (MB/s of UTF-8 text) at the stage's default vocab size.

Trains the stage's byte-level BPE (tasks.tokenizer.train_bpe) on a few decompressed corpus files
(~18 MB: Python docs, the Brown corpus, Emma), `--repeats` times, and reports the median; then
encodes the same text the way the stage writes shards and measures bytes/token on a held-out
novel. Prints a markdown table row and writes bench/results/tokenizer.json.

    .venv/bin/python -m bench.bench_tokenizer [--repeats 3] [--corpus ../shared/data/corpus]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import tokenizers

from forgeline.paths import ROOT
from tasks.tokenizer import TokenizerConfig, encode_documents, train_bpe

FILES = ["pydocs", "brown", "austen_emma"]
HELD_OUT = "austen_persuasion"


def read(corpus: Path, name: str) -> str:
    with gzip.open(corpus / f"{name}.txt.gz", "rt", encoding="utf-8") as f:
        return f.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "data" / "corpus")
    args = parser.parse_args()

    texts = [read(args.corpus, name) for name in FILES]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    vocab_size = TokenizerConfig().vocab_size
    seconds = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        tok = train_bpe(texts, vocab_size)
        seconds.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    ids, _ = encode_documents(tok, texts, np.dtype(np.uint16))
    encode_s = time.perf_counter() - t0
    held_out = read(args.corpus, HELD_OUT)
    _, n_tokens = encode_documents(tok, [held_out], np.dtype(np.uint16))

    train_s = statistics.median(seconds)
    result = {
        "files": FILES, "mb": round(mb, 2), "vocab_size": vocab_size,
        "train_s": [round(s, 2) for s in seconds], "train_s_median": round(train_s, 2),
        "train_mb_per_s": round(mb / train_s, 2),
        "encode_mb_per_s": round(mb / encode_s, 2), "train_tokens": int(len(ids)),
        "bytes_per_token_held_out": round(len(held_out.encode()) / n_tokens, 3), "held_out": HELD_OUT,
        "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(), "tokenizers": tokenizers.__version__,
    }
    print(f"| text (MB) | vocab | train (s, median of {args.repeats}) | train MB/s | encode MB/s "
          "| bytes/token (held out) |")
    print("|---|---|---|---|---|---|")
    print(f"| {result['mb']} | {vocab_size} | {result['train_s_median']} | {result['train_mb_per_s']} "
          f"| {result['encode_mb_per_s']} | {result['bytes_per_token_held_out']} |")
    out = Path(__file__).parent / "results" / "tokenizer.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
