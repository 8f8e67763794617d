"""tasks/chunk.py: exact offsets, size and overlap limits, code kept whole, stable splits."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from forgeline.config import ConfigError, load_config
from tasks.chunk import ChunkConfig, GateClosed, Length, assign_splits, check_gate, chunk, doc_hash, main, split_text
from tasks.validate import ValidateConfig, ValidationFailed, validate

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("the a of and to in was that it her she had not be Anne Elliot Kellynch naval baronet "
         "café naïve ☃ 東京 Ωmega e.g. Mr. Mrs. (aside) \"quoted\"").split()


def prose(seed: int, paragraphs: int = 25, chapters: bool = False) -> str:
    """Paragraphs of random sentences, some hard-wrapped, optionally under 'Chapter N' lines."""
    rng = random.Random(seed)
    out = []
    for p in range(paragraphs):
        if chapters and p % 8 == 0:
            out.append(f"Chapter {p // 8 + 1}")
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))).capitalize()
                     + rng.choice([".", "!", "?", '."']) for _ in range(rng.randint(1, 9))]
        para = " ".join(sentences)
        if rng.random() < 0.5:  # hard-wrapped like Gutenberg text
            para = re.sub(r"(.{60,70}?) ", r"\1\n", para)
        out.append(para)
    return "\n\n".join(out) + "\n"


FENCE = "```python\n# a comment, not a heading\ndef f(x):\n\n    return x + 1\n```\n"
MARKDOWN = """# Guide

Intro text that says what this guide is for. It has two sentences.

## Install

Run the installer. Then check the version.

```bash
# not a heading either
pip install forgeline

forgeline --version
```

### From source

Clone the repository and build it:

    git clone example
    make install

Reference
=========

A reST-style section, underlined.

Options
-------

~~~
a tilde fence with ``` inside
~~~
"""


def markdown_doc(seed: int, sections: int = 12) -> str:
    rng = random.Random(seed)
    parts = []
    for s in range(sections):
        parts.append(f"{'#' * rng.randint(1, 3)} Section {s}\n\n{prose(seed + s, rng.randint(1, 3))}\n")
        if rng.random() < 0.7:
            parts.append(FENCE.replace("x + 1", f"x + {s}") + "\n")
        parts.append(prose(seed * 7 + s, 1) + "\n")
    return MARKDOWN + "\n" + "".join(parts)


DOCS = {
    "austen": prose(1, chapters=True),
    "long-word": prose(2, 5) + "x" * 2500 + "\n\n" + prose(3, 5),
    "crlf": prose(4, 6).replace("\n", "\r\n"),
    "markdown": markdown_doc(5),
    "tiny": "Hi.",
}


def chunks_of(text: str, **kw) -> list[tuple[int, int, str]]:
    return split_text(text, ChunkConfig(**kw))


# ---------------------------------------------------------------------------- offsets and sizes
@pytest.mark.parametrize("unit", ["chars", "tokens"])
@pytest.mark.parametrize("splitter", ["recursive", "regex", "markdown"])
def test_chunks_are_exact_slices_within_size(splitter, unit):
    size = 300 if unit == "chars" else 60
    for name, text in DOCS.items():
        length = Length(text, unit)
        chunks = chunks_of(text, splitter=splitter, length_unit=unit, chunk_size=size,
                           chunk_overlap=size // 5)
        assert chunks, name
        for s, e, _ in chunks:
            assert 0 <= s < e <= len(text)
            assert length(s, e) <= size, (name, text[s:e])
        # every non-whitespace character is in some chunk
        covered = set()
        for s, e, _ in chunks:
            covered.update(range(s, e))
        assert all(i in covered for i, c in enumerate(text) if not c.isspace()), name


@pytest.mark.parametrize("splitter", ["recursive", "regex", "markdown"])
def test_without_overlap_chunks_tile_the_document(splitter):
    for name, text in DOCS.items():
        chunks = chunks_of(text, splitter=splitter, chunk_size=250, chunk_overlap=0)
        assert chunks[0][0] == 0 and chunks[-1][1] == len(text), name
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:])), name
        assert "".join(text[s:e] for s, e, _ in chunks) == text


@pytest.mark.parametrize("unit,size,overlap", [("chars", 200, 40), ("tokens", 50, 10)])
def test_recursive_overlap_is_bounded_and_used(unit, size, overlap):
    text = DOCS["austen"]
    length = Length(text, unit)
    chunks = chunks_of(text, length_unit=unit, chunk_size=size, chunk_overlap=overlap)
    shared = [length(b[0], a[1]) for a, b in zip(chunks, chunks[1:])]
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(chunks, chunks[1:]))  # progress
    assert all(0 <= k <= overlap for k in shared)
    assert sum(k > 0 for k in shared) > 0.8 * len(shared)  # word-level cuts: overlap almost always
    assert all(b[0] <= a[1] for a, b in zip(chunks, chunks[1:]))  # no gaps
    # an overlap starts at a word
    assert all(text[b[0] - 1].isspace() for a, b in zip(chunks, chunks[1:]) if b[0] < a[1])


def test_unsplittable_atom_is_the_only_chunk_over_size():
    # without "" among the separators a run with no separator cannot be cut
    text = DOCS["long-word"]
    chunks = chunks_of(text, separators=["\n\n", "\n", " "], chunk_size=300, chunk_overlap=0)
    over = [text[s:e] for s, e, _ in chunks if e - s > 300]
    assert len(over) == 1 and over[0].strip() == "x" * 2500
    # with "" it is cut into windows of chunk_size
    assert max(e - s for s, e, _ in chunks_of(text, chunk_size=300)) <= 300


def test_tokens_unit_counts_words_and_punctuation():
    length = Length("Hello, world!  It's  café.", "tokens")
    assert length(0, 26) == 9  # Hello , world ! It ' s café .  (café is one \\w+ run)
    assert length(0, 5) + length(5, 26) == length(0, 26)  # additive


# ---------------------------------------------------------------------------- markdown
def fences(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"(?ms)^(```|~~~).*?^\1[ \t]*$", text)]


@pytest.mark.parametrize("overlap", [0, 60])
def test_markdown_never_cuts_inside_a_fenced_block(overlap):
    text = DOCS["markdown"]
    spans = fences(text)
    assert len(spans) >= 5
    chunks = chunks_of(text, splitter="markdown", chunk_size=250, chunk_overlap=overlap)
    for a, b in spans:
        assert b - a < 250
        assert not any(a < pos < b for s, e, _ in chunks for pos in (s, e)), text[a:b]
        assert any(s <= a and b <= e for s, e, _ in chunks)


def test_markdown_splits_a_code_block_over_size_at_lines():
    code = "```\n" + "".join(f"line_{i} = {i} * {i}  # some code\n" for i in range(40)) + "```\n"
    text = "# Big\n\n" + code + "\nAfter.\n"
    chunks = chunks_of(text, splitter="markdown", chunk_size=200, chunk_overlap=0)
    assert max(e - s for s, e, _ in chunks) <= 200
    assert all(text[e - 1] == "\n" for s, e, _ in chunks[:-1])  # cut after whole lines


def test_markdown_sections_and_heading_path():
    chunks = chunks_of(MARKDOWN, splitter="markdown", chunk_size=120, chunk_overlap=0)
    by_section = {}
    for s, e, section in chunks:
        by_section.setdefault(section, []).append(MARKDOWN[s:e])
    assert list(by_section) == ["Guide", "Guide > Install", "Guide > Install > From source",
                                "Reference", "Reference > Options"]
    # every heading starts a chunk; the fence's "# not a heading" does not
    assert all(texts[0].lstrip().startswith(("#", "Reference", "Options")) for texts in by_section.values())
    assert any("# not a heading either" in t for t in by_section["Guide > Install"])


def test_markdown_fence_right_after_a_paragraph_is_not_a_heading_underline():
    from tasks.chunk import markdown_blocks
    text = "Run this:\n```\nx = 1\n\ny = 2\n```\n\nTitle\n~~~~~\n\nText.\n"
    blocks, headings = markdown_blocks(text)
    assert [h[2] for h in headings] == ["Title"]  # reST: underline as long as the title
    assert (text.index("```"), "code") in blocks


# ---------------------------------------------------------------------------- regex
def test_regex_starts_a_chunk_at_each_chapter_heading():
    text = DOCS["austen"]
    chunks = chunks_of(text, splitter="regex", chunk_size=400, chunk_overlap=50)
    starts = {s: section for s, _, section in chunks}
    headings = [m for m in re.finditer(r"(?m)^Chapter \d+$", text)]
    assert len(headings) == 4
    for m in headings:
        assert starts.get(m.start()) == m.group(0)
    # no chunk reaches across a heading
    assert not any(s < m.start() < e for s, e, _ in chunks for m in headings)


def test_regex_ends_chunks_at_sentence_or_paragraph_breaks():
    text = prose(11, 30)
    chunks = chunks_of(text, splitter="regex", chunk_size=400, chunk_overlap=0)
    for s, e, _ in chunks[:-1]:
        assert re.search(r"[.!?][\"')]*\s+$", text[s:e]), text[s:e][-40:]
        assert not text[s:e].rstrip().endswith(("Mr.", "Mrs."))


# ---------------------------------------------------------------------------- train/val
def test_split_by_hash_is_independent_of_other_documents():
    ids = [f"doc-{i}" for i in range(2000)]
    split = assign_splits(ids, 0.1)
    assert 0.08 < sum(v == "val" for v in split.values()) / len(ids) < 0.12
    subset = assign_splits(ids[::7], 0.1)
    assert all(split[d] == subset[d] for d in ids[::7])
    assert all((doc_hash(d) < 0.1) == (split[d] == "val") for d in ids)


def test_tiny_corpus_still_gets_a_val_document():
    ids = ["a", "b", "c"]
    split = assign_splits(ids, 0.01)
    assert sorted(split.values()) == ["train", "train", "val"]
    assert split[min(ids, key=doc_hash)] == "val"
    assert assign_splits(["only"], 0.5) == {"only": "train"}
    assert set(assign_splits(ids, 0.0).values()) == {"train"}
    assert "train" in assign_splits(ids, 0.999).values()


def write_docs(path, docs: dict[str, str]):
    pd.DataFrame({"doc_id": list(docs), "text": list(docs.values())}).to_parquet(path)
    return str(path)


def test_chunk_stage_output_is_stable_and_order_independent(tmp_path):
    names = list(DOCS)
    a = write_docs(tmp_path / "a.parquet", DOCS)
    b = write_docs(tmp_path / "b.parquet", {k: DOCS[k] for k in reversed(names)})
    sa = chunk(ChunkConfig(documents=a, out_dir=str(tmp_path / "out_a"), chunk_size=300))
    sb = chunk(ChunkConfig(documents=b, out_dir=str(tmp_path / "out_b"), chunk_size=300))
    da = pd.read_parquet(tmp_path / "out_a" / "chunks.parquet")
    db = pd.read_parquet(tmp_path / "out_b" / "chunks.parquet")
    pd.testing.assert_frame_equal(da, db)
    assert {k: v for k, v in sa.items() if k != "seconds"} == {k: v for k, v in sb.items() if k != "seconds"}
    assert da.groupby("doc_id")["split"].nunique().max() == 1  # no document in both splits
    assert set(da["split"]) == {"train", "val"}


def test_chunk_stage_schema_and_summary(tmp_path):
    docs = dict(DOCS, empty="", blank=" \n\n ")
    path = write_docs(tmp_path / "docs.parquet", docs)
    summary = chunk(ChunkConfig(documents=path, out_dir=str(tmp_path / "out"), splitter="markdown",
                                chunk_size=300, chunk_overlap=30))
    df = pd.read_parquet(tmp_path / "out" / "chunks.parquet")
    assert list(df.columns) == ["chunk_id", "doc_id", "start", "end", "splitter", "split",
                                "n_chars", "section", "text"]
    assert df["chunk_id"].is_unique and (df["splitter"] == "markdown").all()
    assert (df["n_chars"] == df["text"].str.len()).all() and (df["n_chars"] <= 300).all()
    assert all(docs[r.doc_id][r.start:r.end] == r.text for r in df.itertuples())
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["splitter"] == "markdown" and on_disk["n_chunks"] == len(df) == summary["n_chunks"]
    assert summary["n_docs"] == 7 and summary["n_docs_chunked"] == 5  # empty and blank: no chunks
    assert summary["train_chunks"] + summary["val_chunks"] == len(df)
    assert summary["train_chars"] + summary["val_chars"] == df["n_chars"].sum()
    assert summary["chunk_chars_max"] == df["n_chars"].max() <= 300


# ---------------------------------------------------------------------------- the validation gate
def write_ingest_table(path, docs: dict[str, str]) -> str:
    """`docs` as ingest's documents table, with the columns validate checks; returns the path."""
    texts = list(docs.values())
    pd.DataFrame({"doc_id": list(docs), "text": texts,
                  "sha256": [hashlib.sha256(t.encode()).hexdigest() for t in texts],
                  "ocr_confidence": [None] * len(texts), "printable_ratio": [1.0] * len(texts),
                  }).to_parquet(path)
    return str(path)


def validated(tmp_path, min_chars: int = 1) -> ChunkConfig:
    """DOCS as an ingest table, run through the real validate stage; the chunk config that reads it."""
    write_ingest_table(tmp_path / "documents.parquet", DOCS)
    vcfg = ValidateConfig(documents=str(tmp_path / "documents.parquet"), out_dir=str(tmp_path / "validate"),
                          min_chars=min_chars)
    try:
        validate(vcfg)
    except ValidationFailed:
        pass  # result.json says so; that is what chunk reads
    return ChunkConfig(documents=vcfg.documents, validation=str(tmp_path / "validate" / "result.json"),
                       out_dir=str(tmp_path / "chunk"))


def run_main(cfg: ChunkConfig, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main([f"documents={cfg.documents}", f"validation={cfg.validation}", f"out_dir={cfg.out_dir}"])
    return exit_.value.code, capsys.readouterr().err


def test_gate_passes_documents_validate_passed(tmp_path):
    check_gate(validated(tmp_path))  # no exception


def test_gate_refuses_failed_validation_before_any_work(tmp_path, capsys):
    cfg = validated(tmp_path, min_chars=10**6)  # every document too short: the suite fails
    code, err = run_main(cfg, capsys)
    assert code == 1 and "validation FAILED" in err
    assert "expect_column_value_lengths_to_be_between(text)" in err  # names the failed expectation
    assert not Path(cfg.out_dir).exists()


def test_gate_refuses_when_validate_has_not_run(tmp_path, capsys):
    cfg = validated(tmp_path)
    Path(cfg.validation).unlink()
    code, err = run_main(cfg, capsys)
    assert code == 1 and "run validate first" in err and not Path(cfg.out_dir).exists()


def test_gate_refuses_a_report_about_other_documents(tmp_path):
    cfg = validated(tmp_path)
    pd.read_parquet(cfg.documents).iloc[:1].to_parquet(cfg.documents)  # ingest reran, validate did not
    with pytest.raises(GateClosed, match="another version"):
        check_gate(cfg)


def test_stage_run_by_hand_exits_nonzero_on_a_failed_gate(tmp_path):
    """`python -m tasks.chunk` (what DVC runs) stops with the message on stderr, exit status 1."""
    cfg = validated(tmp_path, min_chars=10**6)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    env.pop("FORGELINE_RUN_ID", None)
    proc = subprocess.run([sys.executable, "-m", "tasks.chunk", f"documents={cfg.documents}",
                           f"validation={cfg.validation}", f"out_dir={cfg.out_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "validation FAILED" in proc.stderr, proc.stderr[-2000:]
    assert not Path(cfg.out_dir).exists() and not (tmp_path / "mlflow.db").exists()


# ---------------------------------------------------------------------------- config
def test_yaml_loads_and_bad_configs_fail():
    assert load_config(ChunkConfig, "chunk").chunk_size > load_config(ChunkConfig, "chunk").chunk_overlap
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(ChunkConfig, "chunk", ["chunk_sise=10"])
    with pytest.raises(ConfigError, match="chunk_overlap < chunk_size"):
        load_config(ChunkConfig, "chunk", ["chunk_size=100", "chunk_overlap=100"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(ChunkConfig, "chunk", ["splitter=semantic"])
    with pytest.raises(ConfigError, match="does not compile"):
        load_config(ChunkConfig, "chunk", ["break_regex=(unclosed"])
    with pytest.raises(ConfigError, match="empty string"):
        load_config(ChunkConfig, "chunk", [r"break_regex=\s*"])
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config(ChunkConfig, "chunk", ["val_fraction=1.0"])
