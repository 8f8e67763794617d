"""compose_data: Smart Compose's corpora, split by document, and held-out (prefix, completion) pairs.

- **Domain** (what the phrase generator is fine-tuned on and scored on): the letters and dialogue
  in Austen's novels, the prose of this repo that reads most like email. A novel is cut into
  chapters (one document each); a paragraph is domain text when it holds quoted speech, or belongs
  to a letter: from a salutation paragraph ("My dear Lizzy," "Dear Sir,") to the first paragraph
  with a closing ("Yours", "Believe me", "I remain") at most LETTER_SPAN paragraphs on.
- **General** (pretraining, and the tokenizer): Brown-corpus documents, State of the Union
  addresses, and the remaining (narrative) paragraphs of the *train* chapters only.
- **Split** by document: each chapter goes to train/val/test by a hash of its id, so no held-out
  sentence has a neighbour in training; general documents split train/val the same way.
- **Pairs**: each held-out domain sentence of MIN_PREFIX_WORDS + 1 words or more is cut once, at
  a word boundary drawn with a seeded generator, into a prefix (the paragraph so far up to the cut,
  ending in the space the user just typed) and the completion (the rest of the sentence).

Writes data/compose_data/: general_chunks.parquet (the chunk schema tasks/tokenizer.py reads: one
chunk per document), domain.parquet (doc_id, split, text), pairs.parquet (split, doc_id, prefix,
completion), summary.json.

    python -m tasks.compose_data [key=value ...]
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from prefect import task

from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.workspace import run_stage

CHAPTER = re.compile(r"^\s*(?:chapter|CHAPTER|Chapter)\s+[\dIVXLCivxlc]+\.?\s*$", re.M)
SALUTATION = re.compile(r'^"?(?:My\s+)?(?:dear|Dear|DEAR|dearest|Dearest)\s+[A-Z][\w.]*(?:\s+[A-Z][\w.]*)?,|^"?(?:Sir|Madam),')
CLOSING = re.compile(r"\b(?:Yours|Your's|yours|Believe me|I remain|I am, dear|Adieu)\b")
LETTER_SPAN = 15            # paragraphs a letter may run past its salutation
SENTENCE_END = re.compile(r'(?<=[.!?])["\']?\s+(?=["\']?[A-Z])')
MIN_PREFIX_WORDS = 3        # the service triggers only after this many words (configs/compose_data.yaml)


@dataclass
class ComposeDataConfig:
    austen: list[str] = field(default_factory=lambda: ["data/raw/austen", "data/compose_raw/austen"])
    general: list[str] = field(default_factory=lambda: ["data/raw/brown", "data/raw/sotu", "data/compose_raw/brown"])
    out_dir: str = "data/compose_data"
    val_fraction: float = 0.1        # of chapters (and of general documents)
    test_fraction: float = 0.1       # of chapters
    min_prefix_words: int = MIN_PREFIX_WORDS
    context_chars: int = 400         # a pair's prefix keeps at most this much of the paragraph before the cut
    max_pairs: int = 600             # per held-out split, a seeded sample of the sentences
    seed: int = 1337

    def check(self) -> None:
        if not (0 < self.val_fraction and 0 < self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ConfigError("compose_data: need 0 < val_fraction, test_fraction and their sum < 1")
        if self.min_prefix_words < 1 or self.max_pairs < 1 or self.context_chars < 0:
            raise ConfigError("compose_data: min_prefix_words, max_pairs >= 1, context_chars >= 0")


def read_texts(folders: list[str]) -> dict[str, str]:
    """{relative path: text} of every .txt/.txt.gz under the folders, sorted."""
    out = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.txt*")):
            raw = path.read_bytes()
            out[str(path)] = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    if not out:
        raise ValueError(f"no .txt or .txt.gz files under {folders}")
    return out


def bucket(doc_id: str) -> float:
    """A stable number in [0, 1) for a document id: the split never depends on the file order."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 2**32


def paragraphs(text: str) -> list[str]:
    """Blank-line-separated paragraphs, lines unwrapped, Gutenberg's _italics_ marks dropped."""
    paras = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return [re.sub(r"_(\S[^_]*?)_", r"\1", p) for p in paras if p]


def domain_mask(paras: list[str]) -> list[bool]:
    """True for paragraphs of dialogue (a double quote) or of a letter (salutation .. closing)."""
    keep = ['"' in p for p in paras]
    for i, p in enumerate(paras):
        if SALUTATION.match(p):
            end = next((j for j in range(i, min(len(paras), i + LETTER_SPAN + 1)) if CLOSING.search(paras[j])), i)
            for j in range(i, end + 1):
                keep[j] = True
    return keep


def chapters(path: str, text: str) -> list[tuple[str, list[str]]]:
    """(doc_id, paragraphs) per chapter of a novel; the front matter before chapter 1 is dropped."""
    novel = Path(path).name.split(".")[0]
    starts = [m.end() for m in CHAPTER.finditer(text)]
    bodies = [text[s:e] for s, e in zip(starts, starts[1:] + [len(text)])]
    return [(f"austen/{novel}/ch{i:03d}", paragraphs(b)) for i, b in enumerate(bodies, 1)]


def sentences(paragraph: str) -> list[str]:
    return [s for s in SENTENCE_END.split(paragraph) if s]


def make_pairs(docs: list[tuple[str, str]], cfg: ComposeDataConfig, rng: random.Random) -> list[dict]:
    """One (prefix, completion) cut per sentence of at least min_prefix_words + 1 words."""
    pairs = []
    for doc_id, text in docs:
        for para in text.split("\n\n"):
            done = 0  # chars of the paragraph before this sentence
            for sent in sentences(para):
                start = para.index(sent, done)
                done = start + len(sent)
                words = sent.split(" ")
                if len(words) <= cfg.min_prefix_words:
                    continue
                k = rng.randint(cfg.min_prefix_words, len(words) - 1)  # words before the cut
                prefix = (para[:start] + " ".join(words[:k]) + " ")[-cfg.context_chars:]
                cut = prefix.find(" ") + 1 if len(prefix) == cfg.context_chars else 0
                pairs.append({"doc_id": doc_id, "prefix": prefix[cut:], "completion": " ".join(words[k:])})
    rng.shuffle(pairs)
    return pairs[:cfg.max_pairs]


def compose_data(cfg: ComposeDataConfig) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    domain, general = [], []
    for path, text in read_texts(cfg.austen).items():
        for doc_id, paras in chapters(path, text):
            b = bucket(doc_id)
            split = "val" if b < cfg.val_fraction else "test" if b < cfg.val_fraction + cfg.test_fraction else "train"
            mask = domain_mask(paras)
            mine = "\n\n".join(p for p, m in zip(paras, mask) if m)
            if mine:
                domain.append({"doc_id": doc_id, "split": split, "text": mine})
            narrative = "\n\n".join(p for p, m in zip(paras, mask) if not m)
            if split == "train" and narrative:
                general.append({"doc_id": doc_id, "split": "train", "text": narrative})
    for path, text in read_texts(cfg.general).items():
        # a Brown file holds many blank-line-separated documents; a SOTU file is one address
        docs = [d for d in re.split(r"\n\s*\n", text) if d.strip()] if "brown" in path else [text]
        for i, doc in enumerate(docs):
            doc_id = f"{path}#{i}"
            general.append({"doc_id": doc_id, "split": "val" if bucket(doc_id) < cfg.val_fraction else "train",
                            "text": doc.strip()})

    chunks = pd.DataFrame(general)
    chunks["start"], chunks["end"] = 0, chunks["text"].str.len()
    chunks[["doc_id", "start", "end", "split", "text"]].to_parquet(out / "general_chunks.parquet", index=False)
    dom = pd.DataFrame(domain)
    dom.to_parquet(out / "domain.parquet", index=False)
    rng = random.Random(cfg.seed)
    pairs = []
    for split in ("val", "test"):
        held = dom[dom["split"] == split]
        pairs += [{"split": split, **p} for p in make_pairs(list(zip(held["doc_id"], held["text"])), cfg, rng)]
    pd.DataFrame(pairs).to_parquet(out / "pairs.parquet", index=False)

    summary = {"general_docs": int(len(chunks)), "general_chars": int(chunks["end"].sum()),
               **{f"domain_{s}_docs": int((dom["split"] == s).sum()) for s in ("train", "val", "test")},
               **{f"domain_{s}_chars": int(dom.loc[dom["split"] == s, "text"].str.len().sum())
                  for s in ("train", "val", "test")},
               **{f"pairs_{s}": sum(p["split"] == s for p in pairs) for s in ("val", "test")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(ComposeDataConfig, "compose_data", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        summary = compose_data(cfg)
        mlflow.log_metrics(summary)
        mlflow.log_artifact(str(Path(cfg.out_dir) / "summary.json"))
    print(json.dumps(summary))


@task(name="compose_data", task_run_name="{stage}")
def compose_data_task(run: dict[str, str], stage: str = "compose_data") -> dict:
    return run_stage(stage, **run)


if __name__ == "__main__":
    main()
