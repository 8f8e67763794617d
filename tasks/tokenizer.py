"""Tokenizer: train a byte-level BPE on the train split and write token shards for pretraining.

Each document is rebuilt from its chunks (offset order, overlaps counted once) and encoded as
plain text: a special-token string inside a document is encoded byte by byte, never as the
special token. The BPE (HF `tokenizers`, GPT-2 pre-tokenizer regex, no normalizer, so
decode(encode(s)) == s for any str) learns from train documents only. `train.bin` and `val.bin`
are flat arrays of token ids, each document followed by <|endoftext|>, read with
`np.memmap(path, dtype=meta["dtype"], mode="r")`. bytes_per_token in meta.json is the val
split's UTF-8 bytes over its tokens, <|endoftext|> separators not counted.

    python -m tasks.tokenizer [key=value ...]
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from prefect import task

from forgeline.chat import EOT, SPECIAL_TOKENS  # reserved at ids 0..5 for the chat template
from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.workspace import run_stage



@dataclass
class TokenizerConfig:
    chunks: str = "data/chunk/chunks.parquet"  # chunk output: doc_id, start, end, split, text
    out_dir: str = "data/tokenizer"            # tokenizer.json, train.bin, val.bin, meta.json
    vocab_size: int = 4096                     # including the 256 byte tokens and the special tokens
    min_frequency: int = 2                     # a pair must occur this often to be merged

    def check(self) -> None:
        smallest = 256 + len(SPECIAL_TOKENS)
        if not smallest <= self.vocab_size <= 2**32:
            raise ConfigError(f"tokenizer: vocab_size must be in [{smallest}, 2**32], got {self.vocab_size}")
        if self.min_frequency < 1:
            raise ConfigError(f"tokenizer: min_frequency must be >= 1, got {self.min_frequency}")


def rebuild_documents(chunks: pd.DataFrame) -> dict[str, dict[str, str]]:
    """{split: {doc_id: text}}, doc_ids sorted; each text is its chunks joined in offset order
    with overlaps taken once. Chunks tile a document except for dropped whitespace-only spans,
    so the text is the document's, less those."""
    out: dict[str, dict[str, str]] = {"train": {}, "val": {}}
    chunks = chunks.sort_values(["doc_id", "start", "end"], kind="stable")
    for (doc_id, split), part in chunks.groupby(["doc_id", "split"], sort=True):
        pieces, covered = [], 0
        for start, end, text in zip(part["start"], part["end"], part["text"]):
            if end > covered:
                pieces.append(text[max(0, covered - start):])
                covered = end
        out[split][doc_id] = "".join(pieces)
    return out


# The end of a word: the GPT-2 pre-tokenizer regex (no lookbehind; no match runs from a
# non-space character into whitespace) always has a match boundary there, and the text on either
# side scans the same alone as in the whole, so cutting there changes no token.
SAFE_CUT = re.compile(r"\S(?=\s)")


def line_pieces(text: str, size: int = 1 << 16) -> list[str]:
    """`text` cut at the first SAFE_CUT past every `size` chars. Encoding or training on the
    pieces gives what the whole text gives, but many pieces keep all the threads busy."""
    pieces, p = [], 0
    while p < len(text):
        m = SAFE_CUT.search(text, p + size)
        q = m.end() if m else len(text)
        pieces.append(text[p:q])
        p = q
    return pieces


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              show_progress: bool = False) -> Tokenizer:
    """A byte-level BPE with SPECIAL_TOKENS at ids 0..5. Deterministic for a given input."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # keeps decode exact
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((piece for text in texts for piece in line_pieces(text)), trainer)
    return tok


def encode_documents(tok: Tokenizer, texts: list[str], dtype: np.dtype,
                     batch: int = 256) -> tuple[np.ndarray, int]:
    """Token ids of `texts`, each followed by <|endoftext|>; also the count without those."""
    eot = np.array([tok.token_to_id(EOT)], dtype=dtype)
    arrays: list[np.ndarray] = []
    pieces: list[str] = []
    last: set[int] = set()  # indices in `pieces` that end a document

    def flush() -> None:
        for k, enc in enumerate(tok.encode_batch_fast(pieces, add_special_tokens=False)):
            arrays.append(np.asarray(enc.ids, dtype=dtype))
            if k in last:
                arrays.append(eot)
        pieces.clear()
        last.clear()

    tok.encode_special_tokens = True  # "<|user|>" in a document is text, not a turn marker
    try:
        for text in texts:
            pieces.extend(line_pieces(text) or [""])
            last.add(len(pieces) - 1)
            if len(pieces) >= batch:
                flush()
        flush()
    finally:
        tok.encode_special_tokens = False
    ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
    return ids, len(ids) - len(texts)


def tokenizer(cfg: TokenizerConfig) -> dict:
    """Train on the train split, write tokenizer.json, train.bin, val.bin, meta.json."""
    docs = rebuild_documents(pd.read_parquet(cfg.chunks, columns=["doc_id", "start", "end", "split", "text"]))
    train_texts, val_texts = list(docs["train"].values()), list(docs["val"].values())
    if not train_texts:
        raise ValueError(f"{cfg.chunks}: no train chunks to learn a tokenizer from")
    train_bytes = sum(len(t.encode()) for t in train_texts)
    val_bytes = sum(len(t.encode()) for t in val_texts)

    t0 = time.perf_counter()
    tok = train_bpe(train_texts, cfg.vocab_size, cfg.min_frequency, show_progress=True)
    train_seconds = time.perf_counter() - t0
    vocab_size = tok.get_vocab_size()  # below cfg.vocab_size when the corpus runs out of pairs

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    n_tokens, n_text_tokens = {}, {}
    for split, texts in (("train", train_texts), ("val", val_texts)):
        ids, n_text_tokens[split] = encode_documents(tok, texts, dtype)
        ids.tofile(out / f"{split}.bin")
        n_tokens[split] = len(ids)
    bytes_per_token = val_bytes / n_text_tokens["val"] if n_text_tokens["val"] else None

    meta = {
        "dtype": dtype.name, "vocab_size": vocab_size, "vocab_size_requested": cfg.vocab_size,
        "special_tokens": {t: tok.token_to_id(t) for t in SPECIAL_TOKENS},
        "n_tokens": n_tokens,  # including one <|endoftext|> per document
        "n_docs": {"train": len(train_texts), "val": len(val_texts)},
        "n_bytes": {"train": train_bytes, "val": val_bytes},
        "bytes_per_token": bytes_per_token,  # val split; None without val documents
        "train_seconds": round(train_seconds, 3),
        "train_mb_per_s": round(train_bytes / 1e6 / train_seconds, 3),
        "tokenizers_version": tokenizers.__version__,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(TokenizerConfig, "tokenizer", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        meta = tokenizer(cfg)
        metrics = {"vocab_size": meta["vocab_size"], "train_tokens": meta["n_tokens"]["train"],
                   "val_tokens": meta["n_tokens"]["val"], "train_seconds": meta["train_seconds"],
                   "train_mb_per_s": meta["train_mb_per_s"]}
        if meta["bytes_per_token"] is not None:
            metrics["val_bytes_per_token"] = meta["bytes_per_token"]
        mlflow.log_metrics(metrics)
        for name in ("tokenizer.json", "meta.json"):
            mlflow.log_artifact(str(Path(cfg.out_dir) / name))
    print(json.dumps(meta))


@task(name="tokenizer", task_run_name="{stage}")
def tokenizer_task(run: dict[str, str], stage: str = "tokenizer") -> dict:
    return run_stage(stage, **run)


if __name__ == "__main__":
    main()
