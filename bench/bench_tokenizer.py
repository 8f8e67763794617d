"""Tokenizer training throughput (MB/s of UTF-8 text) at the stage's default vocab size.

Trains the stage's byte-level BPE (tasks.tokenizer.train_bpe) on the text files of the shipped
sample (data/raw/: the Python docs, the Debian handbook, the Brown corpus and eight State of the
Union addresses, ~1.3 MB), `--repeats` times, and reports the median; then encodes the same text
the way the stage writes shards and measures bytes/token on the held-out novel (Persuasion, also
in the sample). Only data in the repo: a fresh clone runs it as is. Prints a markdown table row
and writes bench/results/tokenizer.json.

    .venv/bin/python -m bench.bench_tokenizer [--repeats 5]
"""
from __future__ import annotations

import argparse
import gzip
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import tokenizers

from bench import machine, write_result
from forgeline.paths import ROOT
from tasks.tokenizer import TokenizerConfig, encode_documents, train_bpe

RAW = ROOT / "data" / "raw"
HELD_OUT = RAW / "austen" / "persuasion.txt.gz"


def read(path: Path) -> str:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    started = machine()
    files = sorted(p for p in RAW.rglob("*.txt.gz") if p != HELD_OUT)
    texts = [read(p) for p in files]
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
    held_out = read(HELD_OUT)
    _, n_tokens = encode_documents(tok, [held_out], np.dtype(np.uint16))

    train_s = statistics.median(seconds)
    result = {
        "files": [str(p.relative_to(ROOT)) for p in files], "mb": round(mb, 2), "vocab_size": vocab_size,
        "train_s": [round(s, 2) for s in seconds], "train_s_median": round(train_s, 2),
        "train_mb_per_s": round(mb / train_s, 2),
        "encode_mb_per_s": round(mb / encode_s, 2), "train_tokens": int(len(ids)),
        "bytes_per_token_held_out": round(len(held_out.encode()) / n_tokens, 3),
        "held_out": str(HELD_OUT.relative_to(ROOT)),
        "python": platform.python_version(), "tokenizers": tokenizers.__version__,
    }
    print(f"| text (MB) | vocab | train (s, median of {args.repeats}) | train MB/s | encode MB/s "
          "| bytes/token (held out) |")
    print("|---|---|---|---|---|---|")
    print(f"| {result['mb']} | {vocab_size} | {result['train_s_median']} | {result['train_mb_per_s']} "
          f"| {result['encode_mb_per_s']} | {result['bytes_per_token_held_out']} |")
    write_result("tokenizer", result, started)


if __name__ == "__main__":
    main()
