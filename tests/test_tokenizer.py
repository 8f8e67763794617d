"""tasks/tokenizer.py: reserved special tokens, exact byte-level round trips, shards, bytes/token."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tokenizers import Tokenizer, pre_tokenizers

from forgeline.config import ConfigError, load_config
from tasks.chunk import ChunkConfig, chunk
from tasks.tokenizer import (EOT, SPECIAL_TOKENS, TokenizerConfig, encode_documents, line_pieces,
                             rebuild_documents, tokenizer)
from tests.conftest import run_in
from tests.test_chunk import DOCS, prose, write_ingest_table

TRAIN_ONLY, VAL_ONLY = "quokkaquokka", "zyzzyvazyzzyva"  # each repeated in one split only


def corpus() -> dict[str, str]:
    docs = {f"novel-{i:02d}": prose(100 + i, 12, chapters=True) for i in range(24)}
    docs |= {k: v for k, v in DOCS.items()}
    docs["literal-specials"] = "A document that quotes <|endoftext|> and <|user|> as text.\n" + prose(7, 3)
    return docs


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """chunks.parquet of corpus() (with overlaps) and the tokenizer stage run on it, vocab 400."""
    root = tmp_path_factory.mktemp("tok")
    docs = corpus()
    ccfg = ChunkConfig(documents=str(root / "documents.parquet"), out_dir=str(root / "chunk"),
                       chunk_size=300, chunk_overlap=60, val_fraction=0.2)
    pd.DataFrame({"doc_id": list(docs), "text": list(docs.values())}).to_parquet(ccfg.documents)
    chunk(ccfg)
    chunks = pd.read_parquet(root / "chunk" / "chunks.parquet")
    split = chunks.groupby("doc_id")["split"].first().to_dict()
    # plant a word in each split, so the test can tell which split the BPE learned from
    for doc_id, word in ((min(d for d in split if split[d] == "train"), TRAIN_ONLY),
                         (min(d for d in split if split[d] == "val"), VAL_ONLY)):
        docs[doc_id] += (" " + word) * 200 + "\n"
    pd.DataFrame({"doc_id": list(docs), "text": list(docs.values())}).to_parquet(ccfg.documents)
    chunk(ccfg)
    cfg = TokenizerConfig(chunks=str(root / "chunk" / "chunks.parquet"), out_dir=str(root / "tok"),
                          vocab_size=400)
    meta = tokenizer(cfg)
    return dict(root=root, docs=docs, split=split, cfg=cfg, meta=meta,
                tok=Tokenizer.from_file(str(root / "tok" / "tokenizer.json")))


def test_special_tokens_have_reserved_ids_and_stay_whole(stage):
    tok, meta = stage["tok"], stage["meta"]
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert meta["special_tokens"] == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.encode(t).ids == [i]
    ids = tok.encode("<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>").ids
    assert ids[0] == 2 and ids.count(5) == 2 and ids[-1] == 4 and 3 in ids
    assert meta["vocab_size"] == tok.get_vocab_size() == 400


def random_text(rng: random.Random, n: int) -> str:
    ranges = [(0x00, 0x7F), (0x80, 0x24F), (0x370, 0x3FF), (0x590, 0x6FF), (0x900, 0x97F),
              (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF),
              (0x0300, 0x036F), (0xE000, 0xF8FF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        c = rng.randint(lo, hi)
        out.append(chr(c) if not 0xD800 <= c <= 0xDFFF else "?")  # lone surrogates are not UTF-8
    return "".join(out)


def test_encode_decode_round_trips_any_unicode(stage):
    tok = stage["tok"]
    rng = random.Random(0)
    samples = [random_text(rng, rng.randint(1, 200)) for _ in range(300)]
    samples += ["", " ", "  leading and trailing  ", "\r\n\t\x00\x0b\x0c", "e\u0301 vs \u00e9",
                "👩‍👩‍👧 ZWJ family", "مرحبا بالعالم", "日本語のテキスト", "\ufeffBOM", "a" * 5000]
    for s in samples:
        assert tok.decode(tok.encode(s).ids, skip_special_tokens=False) == s


def test_special_token_text_inside_documents_is_not_special(stage):
    tok = stage["tok"]
    tok.encode_special_tokens = True
    try:
        ids = tok.encode("quotes <|endoftext|> and <|user|>").ids
    finally:
        tok.encode_special_tokens = False
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert tok.decode(ids) == "quotes <|endoftext|> and <|user|>"


def test_shards_have_dtype_length_and_decode_to_the_documents(stage):
    tok, meta, docs, split = stage["tok"], stage["meta"], stage["docs"], stage["split"]
    out = Path(stage["cfg"].out_dir)
    assert meta["dtype"] == "uint16"
    for name in ("train", "val"):
        ids = np.memmap(out / f"{name}.bin", dtype=meta["dtype"], mode="r")
        assert (out / f"{name}.bin").stat().st_size == 2 * meta["n_tokens"][name] == 2 * len(ids)
        names = sorted(d for d in docs if split.get(d) == name)
        assert meta["n_docs"][name] == len(names) > 0
        # one <|endoftext|> per document, after it; overlaps between chunks counted once
        assert int((ids == 1).sum()) == len(names) and ids[-1] == 1
        assert tok.decode(ids.tolist(), skip_special_tokens=False) == "".join(docs[d] + EOT for d in names)


def test_val_bytes_per_token_matches_an_independent_count(stage):
    meta, docs, split = stage["meta"], stage["docs"], stage["split"]
    tok = Tokenizer.from_file(str(Path(stage["cfg"].out_dir) / "tokenizer.json"))
    tok.encode_special_tokens = True
    val = [docs[d] for d in docs if split.get(d) == "val"]
    n_bytes = sum(len(t.encode("utf-8")) for t in val)
    n_tokens = sum(len(tok.encode(t).ids) for t in val)
    assert meta["n_bytes"]["val"] == n_bytes
    assert meta["n_tokens"]["val"] == n_tokens + len(val)  # + one <|endoftext|> each
    assert meta["bytes_per_token"] == pytest.approx(n_bytes / n_tokens, rel=1e-12)
    assert 1.0 < meta["bytes_per_token"] < 8.0


def test_learns_from_the_train_split_only(stage):
    vocab = stage["tok"].get_vocab()
    assert "Ġ" + TRAIN_ONLY in vocab  # Ġ: byte-level space
    assert not any(VAL_ONLY[:6] in t for t in vocab)


def test_training_is_deterministic(stage, tmp_path):
    again = TokenizerConfig(chunks=stage["cfg"].chunks, out_dir=str(tmp_path), vocab_size=400)
    tokenizer(again)
    first = Path(stage["cfg"].out_dir)
    for name in ("tokenizer.json", "train.bin", "val.bin"):
        assert (tmp_path / name).read_bytes() == (first / name).read_bytes(), name


def test_cutting_into_pieces_changes_no_token(stage):
    # long documents are trained on and encoded in pieces, for the threads; tokens must not change
    rng = random.Random(1)
    atoms = ["word", "42", " ", "  ", "\n", "\r\n", "\n\n", "\t", "'s", "'ll", ".", "é", "🙂",
             "<|end|>"]
    text = "".join(rng.choice(atoms) for _ in range(60_000))
    pieces = line_pieces(text, size=100)
    assert len(pieces) > 100 and "".join(pieces) == text
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    whole = [w for w, _ in pre.pre_tokenize_str(text)]
    assert [w for p in pieces for w, _ in pre.pre_tokenize_str(p)] == whole
    tok = stage["tok"]
    ids, n = encode_documents(tok, [text, "short"], np.dtype(np.uint16))
    tok.encode_special_tokens = True
    try:
        expected = tok.encode(text).ids + [1] + tok.encode("short").ids + [1]
    finally:
        tok.encode_special_tokens = False
    assert ids.tolist() == expected and n == len(expected) - 2


def test_rebuild_documents_takes_overlaps_once():
    text = "abcdefghij"
    chunks = pd.DataFrame({"doc_id": ["d"] * 3, "split": ["val"] * 3, "start": [4, 0, 2],
                           "end": [10, 4, 7]})
    chunks["text"] = [text[s:e] for s, e in zip(chunks["start"], chunks["end"])]
    assert rebuild_documents(chunks) == {"train": {}, "val": {"d": text}}


def test_config_yaml_loads_and_bad_values_fail():
    assert load_config(TokenizerConfig, "tokenizer").vocab_size == 4096
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(TokenizerConfig, "tokenizer", ["vocab=100"])
    with pytest.raises(ConfigError, match="vocab_size"):
        load_config(TokenizerConfig, "tokenizer", ["vocab_size=100"])


@pytest.mark.slow
def test_cli_chunk_then_tokenizer_log_to_mlflow(stage, workspace):
    """`python -m tasks.validate`, `tasks.chunk` and `tasks.tokenizer` by hand, in that order (chunk
    refuses documents validate has not passed), run and log into the workspace's store."""
    docs = write_ingest_table(workspace / "documents.parquet", stage["docs"])
    run_in(workspace, "-m", "tasks.validate", f"documents={docs}", "min_chars=1")  # DOCS has a short one
    run_in(workspace, "-m", "tasks.chunk", f"documents={docs}", "out_dir=data/chunk", "chunk_size=500")
    run_in(workspace, "-m", "tasks.tokenizer", "vocab_size=300")
    meta = json.loads((workspace / "data/tokenizer/meta.json").read_text())
    assert meta["vocab_size"] == 300 and (workspace / "data/tokenizer/train.bin").exists()
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()])}
    assert runs["chunk"].data.metrics["n_chunks"] > 0
    assert runs["tokenizer"].data.metrics["val_bytes_per_token"] == pytest.approx(meta["bytes_per_token"])
    assert runs["tokenizer"].data.params["vocab_size"] == "300"
