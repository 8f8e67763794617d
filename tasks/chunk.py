"""Chunk: split each ingested document into spans for retrieval and for the tokenizer.

Three splitters, chosen by `splitter`: `recursive` (length-based, by a hierarchy of separators),
`regex` (pieces between matches of `break_regex`, packed up to `chunk_size`; a chunk always starts
at a match of `heading_regex`) and `markdown` (blocks between headings, ATX `#` or reST/setext
underlined; fenced, indented and reST literal code blocks are kept whole unless one alone is over
`chunk_size`). Every chunk is an exact slice `doc.text[start:end]`, and apart from `chunk_overlap`
the chunks of a document tile it (whitespace-only spans are dropped), so a later stage can
rebuild the document from them. A document goes wholly to train or to val, by a hash of its
`doc_id`. Writes out_dir/chunks.parquet (chunk_id, doc_id, start, end, splitter, split, n_chars,
section = heading path or "", text) and out_dir/summary.json.

The Great Expectations gate holds however the stage is started (the flow, `dvc repro` alone, by
hand): before any work `main()` reads `validation` (validate's result.json) and exits non-zero
unless it says the suite passed on this very documents table (same sha256). A missing report
fails too: chunking documents nobody validated is what the gate exists to prevent.

Length is measured in `length_unit`: `chars`, or `tokens` = the words and punctuation marks
(`\\w+|[^\\w\\s]`) that start inside a span (a cheap stand-in for BPE tokens; whitespace is free).
`chunk_size` is a hard limit, except for an atom that contains none of the `separators` (possible
only when "" is left out of them): it becomes a chunk of its own, over the limit.

    python -m tasks.chunk [key=value ...]      # after python -m tasks.validate
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from tqdm import tqdm

from prefect import task

from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.workspace import run_stage

# A chunk may end after a paragraph break or a sentence end (not after "Mr." and the like).
BREAK_REGEX = (r"\n[ \t]*\n\s*|(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)(?<!\bvs)"
               r"(?<!\be\.g)(?<!\bi\.e)[.!?]+[\"')\]\u201d\u2019]*\s+")
# A chunk must start at a chapter heading ("Chapter 1", "CHAPTER XII", "Book II", ...).
HEADING_REGEX = (r"(?m)^[ \t]*(?:CHAPTER|Chapter|BOOK|Book|PART|Part|VOLUME|Volume)[ \t]+"
                 r"(?:[IVXLCDM]+|\d+)\b.*$")


@dataclass
class ChunkConfig:
    documents: str = "data/ingest/documents.parquet"  # ingest output; uses doc_id and text
    validation: str = "data/validate/result.json"     # validate's verdict on `documents`: the gate
    out_dir: str = "data/chunk"                       # chunks.parquet, summary.json
    splitter: Literal["recursive", "regex", "markdown"] = "recursive"
    length_unit: Literal["chars", "tokens"] = "chars"  # tokens: regex words + punctuation, not BPE
    chunk_size: int = 1000                            # most a chunk may hold, in length_unit
    chunk_overlap: int = 100                          # most two neighbouring chunks share, in length_unit
    # recursive: tried in order, the coarsest that occurs first; "" cuts anywhere. The other
    # splitters use them to cut pieces that are over chunk_size on their own.
    separators: list[str] = field(default_factory=lambda: ["\n\n", "\n", ". ", " ", ""])
    break_regex: str = BREAK_REGEX                    # regex: a chunk may end after any match
    heading_regex: str = HEADING_REGEX                # regex: a chunk must start at any match; "" = none
    val_fraction: float = 0.1                         # share of documents (by doc_id hash) in val

    def check(self) -> None:
        if self.chunk_size < 1:
            raise ConfigError(f"chunk: chunk_size must be >= 1, got {self.chunk_size}")
        if not 0 <= self.chunk_overlap < self.chunk_size:
            raise ConfigError(f"chunk: need 0 <= chunk_overlap < chunk_size, got "
                              f"{self.chunk_overlap} and {self.chunk_size}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"chunk: val_fraction must be in [0, 1), got {self.val_fraction}")
        if not self.separators:
            raise ConfigError("chunk: separators must not be empty")
        for name in ("break_regex", "heading_regex"):
            pattern = getattr(self, name)
            if name == "heading_regex" and pattern == "":
                continue
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"chunk: {name} does not compile: {e}") from None
            if compiled.fullmatch(""):
                raise ConfigError(f"chunk: {name} {pattern!r} matches the empty string")


# ---------------------------------------------------------------------------- length
TOKEN_RE = re.compile(r"\w+|[^\w\s]")


class Length:
    """Length of text[s:e] in a unit that adds up over adjacent spans.

    chars: e - s. tokens: how many matches of TOKEN_RE start in [s, e), from a prefix count.
    """

    def __init__(self, text: str, unit: str):
        self.n = len(text)
        self.cum = None
        if unit == "tokens":
            starts = np.fromiter((m.start() for m in TOKEN_RE.finditer(text)), dtype=np.int64)
            self.cum = np.zeros(self.n + 1, dtype=np.int64)  # cum[i] = tokens starting before i
            self.cum[1:] = np.cumsum(np.bincount(starts, minlength=self.n))

    def __call__(self, s: int, e: int) -> int:
        return e - s if self.cum is None else int(self.cum[e] - self.cum[s])

    def back(self, e: int, k: int) -> int:
        """Smallest p with length(p, e) <= k."""
        if self.cum is None:
            return max(0, e - k)
        return int(np.searchsorted(self.cum, self.cum[e] - k, "left"))

    def forward(self, s: int, k: int) -> int:
        """Largest p with length(s, p) <= k, at most n."""
        if self.cum is None:
            return min(self.n, s + k)
        return int(np.searchsorted(self.cum, self.cum[s] + k, "right")) - 1


# ---------------------------------------------------------------------------- atoms and packing
def split_after(text: str, s: int, e: int, sep: str) -> list[tuple[int, int]]:
    """Cut [s, e) after each occurrence of `sep`: contiguous pieces, separators kept at the end."""
    pieces, p = [], s
    while (q := text.find(sep, p, e)) != -1:
        pieces.append((p, q + len(sep)))
        p = q + len(sep)
    if p < e:
        pieces.append((p, e))
    return pieces


def split_recursive(text: str, s: int, e: int, separators: list[str], size: int,
                    length: Length) -> list[tuple[int, int]]:
    """Contiguous atoms covering [s, e), each within `size`, cut at the coarsest separator that
    occurs; a piece still too long is cut at the next one. Without "" a piece that contains no
    separator stays whole (an unsplittable atom, over `size`)."""
    if length(s, e) <= size:
        return [(s, e)]
    for i, sep in enumerate(separators):
        if sep == "":  # hard cut into windows of `size`
            atoms, p = [], s
            while p < e:
                q = min(e, max(p + 1, length.forward(p, size)))
                atoms.append((p, q))
                p = q
            return atoms
        if text.find(sep, s, e) != -1:
            break
    else:
        return [(s, e)]
    atoms = []
    for a, b in split_after(text, s, e, sep):
        atoms.extend(split_recursive(text, a, b, separators[i + 1:], size, length))
    return atoms


def pack(atoms: list[tuple[int, int]], size: int, overlap: int, length: Length,
         cuts: list[int], hard: set[int] = frozenset()) -> list[tuple[int, int]]:
    """Join contiguous atoms greedily into chunks within `size`.

    A chunk ends before the atom that would overflow it or that starts at a `hard` position.
    The next chunk starts back at the earliest of `cuts` (sorted positions where a chunk may
    start) that keeps the shared part within `overlap` and the new chunk within `size`; with
    no such cut the chunks only touch. Never across a hard position.
    """
    if not atoms:
        return []
    spans: list[tuple[int, int]] = []
    s = e = atoms[0][0]
    for a, b in atoms:
        if e > s and (a in hard or length(s, b) > size):
            spans.append((s, e))
            s = a
            if overlap and a not in hard:
                lo = max(length.back(e, overlap), length.back(b, size))
                i = bisect_left(cuts, lo)
                if i < len(cuts) and cuts[i] < a:
                    s = cuts[i]  # > previous start, as length(s, b) <= size < length(prev, b)
        e = b
    spans.append((s, e))
    return spans


def word_starts(text: str) -> list[int]:
    return [m.start() for m in re.finditer(r"\S+", text)]


# ---------------------------------------------------------------------------- the three splitters
def split_recursive_doc(text: str, cfg: ChunkConfig, length: Length):
    atoms = split_recursive(text, 0, len(text), cfg.separators, cfg.chunk_size, length)
    return pack(atoms, cfg.chunk_size, cfg.chunk_overlap, length, word_starts(text)), []


def split_regex_doc(text: str, cfg: ChunkConfig, length: Length):
    headings = []
    if cfg.heading_regex:
        headings = [(m.start(), m.group(0).strip()) for m in re.finditer(cfg.heading_regex, text)]
    hard = {h[0] for h in headings}
    bounds = sorted({0, len(text)} | hard | {m.end() for m in re.finditer(cfg.break_regex, text)})
    atoms = []
    for a, b in zip(bounds, bounds[1:]):
        atoms.extend(split_recursive(text, a, b, cfg.separators, cfg.chunk_size, length))
    return pack(atoms, cfg.chunk_size, cfg.chunk_overlap, length, word_starts(text), hard), headings


FENCE_RE = re.compile(r" {0,3}(`{3,}|~{3,})")
ATX_RE = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*")
ADORN_RE = re.compile(r"([=\-~^\"'`#*+:.<>_])\1{2,}[ \t]*")  # reST/setext heading underline
LITERAL_INTRO_RE = re.compile(r".*::[ \t]*|[ \t]*\.\. +(?:code-block|code|sourcecode|doctest|testcode)::.*")


def indent(line: str) -> int:
    return len(line.expandtabs(4)) - len(line.expandtabs(4).lstrip(" "))


def markdown_blocks(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, int, str]]]:
    """Blocks (start, kind) with kind text|code|heading, and headings (start, level, title).

    A block runs to the next block's start (trailing blank lines included). Code: ``` or ~~~
    fences (to the closing fence, or the end if unclosed), runs of lines indented 4+ after a
    blank line, reST literal blocks (indented lines after `::` or `.. code-block::`), and
    doctest paragraphs (`>>>`). Headings: ATX `#`; reST/setext title + underline after a blank
    line, or overline + title + underline; underline styles get levels in order of first use.
    """
    lines = [(m.start(), m.group(0).rstrip("\r\n")) for m in re.finditer(r"[^\n]*\n|[^\n]+$", text)]
    blocks: list[tuple[int, str]] = []
    headings: list[tuple[int, int, str]] = []
    styles: dict[tuple[str, bool], int] = {}
    prev_blank, in_para, literal_indent = True, False, None
    i, n = 0, len(lines)

    def adorned(k: int) -> bool:
        return k < n and ADORN_RE.fullmatch(lines[k][1]) is not None

    def add_heading(pos: int, style: tuple[str, bool], title: str) -> None:
        level = styles.setdefault(style, len(styles) + 1)
        headings.append((pos, level, title.strip()))
        blocks.append((pos, "heading"))

    while i < n:
        pos, line = lines[i]
        if not line.strip():
            prev_blank, in_para = True, False
            i += 1
            continue
        in_para_before, in_para = in_para, False
        if literal_indent is not None and indent(line) > literal_indent:  # reST literal block
            while i + 1 < n and (not lines[i + 1][1].strip() or indent(lines[i + 1][1]) > literal_indent):
                i += 1
            while not lines[i][1].strip():  # trailing blank lines are not code
                i -= 1
            blocks.append((pos, "code"))
        elif m := FENCE_RE.match(line):
            fence = m.group(1)
            close = re.compile(r" {0,3}" + re.escape(fence[0]) + "{%d,}[ \t]*" % len(fence))
            i += 1
            while i < n and not close.fullmatch(lines[i][1]):
                i += 1
            blocks.append((pos, "code"))
        elif prev_blank and indent(line) >= 4:  # indented code block
            while i + 1 < n and (not lines[i + 1][1].strip() or indent(lines[i + 1][1]) >= 4):
                i += 1
            while not lines[i][1].strip():  # trailing blank lines are not code
                i -= 1
            blocks.append((pos, "code"))
        elif prev_blank and adorned(i) and i + 2 < n and lines[i + 1][1].strip() \
                and lines[i + 2][1].rstrip() == line.rstrip():  # overline, title, underline
            add_heading(pos, (line[0], True), lines[i + 1][1])
            i += 2
        elif prev_blank and indent(line) < 4 and not adorned(i) and adorned(i + 1) and (
                lines[i + 1][1][0] in "=-" or len(lines[i + 1][1].rstrip()) >= len(line.strip())):
            # title + underline: setext (= or -), or reST (underline at least as long as the
            # title, which tells "Some text:" followed by a ``` or ~~~ fence from a heading)
            add_heading(pos, (lines[i + 1][1][0], False), line)
            i += 1
        elif m := ATX_RE.fullmatch(line):
            headings.append((pos, len(m.group(1)), (m.group(2) or "").strip()))
            blocks.append((pos, "heading"))
        else:  # a paragraph line
            if not in_para_before:
                blocks.append((pos, "code" if line.lstrip().startswith(">>>") else "text"))
            in_para = True
        literal_indent = indent(line) if in_para and LITERAL_INTRO_RE.fullmatch(line) else None
        prev_blank = False
        i += 1
    if blocks and blocks[0][0] > 0:
        blocks[0] = (0, blocks[0][1])  # leading blank lines join the first block
    return blocks, headings


def split_markdown_doc(text: str, cfg: ChunkConfig, length: Length):
    blocks, raw_headings = markdown_blocks(text)
    headings, stack = [], []  # (position, "Title > Sub > Subsub")
    for pos, level, title in raw_headings:
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title))
        headings.append((pos, " > ".join(t for _, t in stack)))
    hard = {h[0] for h in headings}
    code_separators = ["\n\n", "\n", ""]
    ends = [b[0] for b in blocks[1:]] + [len(text)]
    atoms = []
    for (a, kind), b in zip(blocks, ends):
        seps = code_separators if kind == "code" else cfg.separators
        c = a + len(text[a:b].rstrip())  # trailing blank lines: no reason to cut a block
        if length(a, b) > cfg.chunk_size >= length(a, c):
            atoms.append((a, c))
            a = c
        atoms.extend(split_recursive(text, a, b, seps, cfg.chunk_size, length))
    # overlap starts only at an atom's start: never inside a code block kept whole
    cuts = [a for a, _ in atoms]
    return pack(atoms, cfg.chunk_size, cfg.chunk_overlap, length, cuts, hard), headings


SPLITTERS = {"recursive": split_recursive_doc, "regex": split_regex_doc, "markdown": split_markdown_doc}


def split_text(text: str, cfg: ChunkConfig) -> list[tuple[int, int, str]]:
    """(start, end, section) of each chunk of `text`, in offset order; whitespace-only dropped."""
    if not text:
        return []
    length = Length(text, cfg.length_unit)
    spans, headings = SPLITTERS[cfg.splitter](text, cfg, length)  # headings: (position, path)
    positions = [pos for pos, _ in headings]  # sorted; the path in force at s is the last <= s
    return [(s, e, headings[i][1] if (i := bisect_right(positions, s) - 1) >= 0 else "")
            for s, e in spans if not text[s:e].isspace()]


# ---------------------------------------------------------------------------- train/val split
def doc_hash(doc_id: str) -> float:
    """A stable number in [0, 1) per document."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64


def assign_splits(doc_ids: list[str], val_fraction: float) -> dict[str, str]:
    """doc_id -> "train"|"val": val when its hash < val_fraction. With two or more documents
    and val_fraction > 0 each split gets at least one: the smallest hash goes to val, the
    largest to train. A single document is train only."""
    h = {d: doc_hash(d) for d in doc_ids}
    split = {d: "val" if h[d] < val_fraction else "train" for d in doc_ids}
    if len(doc_ids) >= 2 and val_fraction > 0:
        if "val" not in split.values():
            split[min(doc_ids, key=h.get)] = "val"
        if "train" not in split.values():
            split[max(doc_ids, key=h.get)] = "train"
    elif len(doc_ids) == 1:
        split[doc_ids[0]] = "train"
    return split


def chunk_id(doc_id: str, start: int, end: int) -> str:
    return hashlib.sha256(f"{doc_id}:{start}:{end}".encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- the gate
class GateClosed(RuntimeError):
    """The documents have not passed validation: chunk refuses to run."""


def check_gate(cfg: ChunkConfig) -> None:
    """Raise GateClosed unless `cfg.validation` says the suite passed on `cfg.documents` as it is now."""
    report = Path(cfg.validation)
    if not report.is_file():
        raise GateClosed(f"chunk: no validation report {report}: run validate first "
                         f"(python -m tasks.validate)")
    result = json.loads(report.read_text())
    if not result.get("success"):
        failed = [f"  - {f['expectation']}({f['column'] or 'table'}): {f['unexpected_count']} unexpected"
                  for f in result.get("failures", [])]
        raise GateClosed(f"chunk: validation FAILED on {cfg.documents} ({report}); not chunking. "
                         f"Fix the data (or configs/validate.yaml) and rerun validate.\n" + "\n".join(failed))
    with open(cfg.documents, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    if result.get("documents_sha256") != sha:
        raise GateClosed(f"chunk: {report} is about another version of {cfg.documents} (sha256 "
                         f"{result.get('documents_sha256')}, now {sha}): rerun validate first")


# ---------------------------------------------------------------------------- stage
COLUMNS = ["chunk_id", "doc_id", "start", "end", "splitter", "split", "n_chars", "section", "text"]


def chunk(cfg: ChunkConfig) -> dict:
    """Chunk every document of `cfg.documents`; write chunks.parquet and summary.json."""
    t0 = time.perf_counter()
    docs = pd.read_parquet(cfg.documents, columns=["doc_id", "text"])
    dup = docs["doc_id"][docs["doc_id"].duplicated()]
    if len(dup):
        raise ValueError(f"{cfg.documents}: duplicate doc_id {dup.iloc[0]!r}")
    docs = docs.sort_values("doc_id", kind="stable")  # output independent of ingest order

    rows = []
    for doc_id, text in tqdm(zip(docs["doc_id"], docs["text"]), total=len(docs), desc="chunk",
                             unit="doc", mininterval=2):
        text = text if isinstance(text, str) else ""  # a missing text is NaN or None
        for s, e, section in split_text(text, cfg):
            rows.append((chunk_id(doc_id, s, e), doc_id, s, e, cfg.splitter, "", e - s, section, text[s:e]))
    df = pd.DataFrame(rows, columns=COLUMNS).astype(
        {"start": "int64", "end": "int64", "n_chars": "int64", "text": "str", "section": "str"})
    split = assign_splits(sorted(set(df["doc_id"])), cfg.val_fraction)
    df["split"] = df["doc_id"].map(split).astype("str")

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out / "chunks.parquet", index=False)

    n = df["n_chars"]
    summary = {
        "n_docs": len(docs), "n_docs_chunked": int(df["doc_id"].nunique()), "n_chunks": len(df),
        "chunk_chars_mean": float(n.mean()) if len(df) else 0.0,
        "chunk_chars_min": int(n.min()) if len(df) else 0,
        "chunk_chars_max": int(n.max()) if len(df) else 0,
    }
    for name in ("train", "val"):
        part = df[df["split"] == name]
        summary |= {f"{name}_docs": int(part["doc_id"].nunique()), f"{name}_chunks": len(part),
                    f"{name}_chars": int(part["n_chars"].sum())}
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    (out / "summary.json").write_text(json.dumps(
        {"splitter": cfg.splitter, "length_unit": cfg.length_unit, **summary}, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(ChunkConfig, "chunk", sys.argv[1:] if argv is None else argv)
    try:
        check_gate(cfg)
    except GateClosed as e:  # before the MLflow run and any output: nothing to clean up
        print(e, file=sys.stderr)
        sys.exit(1)
    with stage_run(stage, config_dict(cfg)):
        summary = chunk(cfg)
        mlflow.log_metrics(summary)
        mlflow.log_artifact(str(Path(cfg.out_dir) / "summary.json"))
    print(json.dumps(summary))


@task(name="chunk", task_run_name="{stage}")
def chunk_task(run: dict[str, str], stage: str = "chunk") -> dict:
    return run_stage(stage, **run)


if __name__ == "__main__":
    main()
