"""mt_data: translation pairs and monolingual text from the shipped parallel catalogs, split by document.

Reads data/mt_raw/*.tsv.gz (english<TAB>target; gettext catalogs, the Debian Handbook, Debian
Reference: data/README.md), and per pair:

- drops what is not a sentence: format strings (`%s`, `%(name)s`, `{0}`, `${x}`), markup (`<b>`,
  `&amp;`), fewer than `min_words` words (UI labels such as "Cancel"), no letter at the start,
  untranslated copies (target == source), more than `max_words` words (paragraphs too long to train on);
- drops pairs whose character-length ratio target/source lies outside [min_ratio, max_ratio];
- deduplicates on (target language, normalised source);
- assigns each row a **document**: a chapter of Debian Reference (its rows from one "Table of
  Contents" row to the next), else a block of `block_rows` consecutive rows of its file (the files
  are catalogs and chapters concatenated in order), and splits documents, never rows, into
  train/val/test by a hash of the document id. A test source sentence found in a train or val
  document is dropped there (the handbook's English is the same in the fr and es files).

Writes data/mt_data/pairs.parquet (pair_id, doc_id, corpus, src_lang, tgt_lang, src, tgt, split),
mono.parquet (the monolingual text of train/val documents, both languages, one row per
(language, document) in the chunk layout tasks/tokenizer.py reads: doc_id, start, end, split, text;
test documents are left out) and summary.json (counts per filter, split and direction).

    python -m tasks.mt_data [key=value ...]
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from prefect import task

from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.workspace import run_stage


@dataclass
class MTDataConfig:
    raw_dir: str = "data/mt_raw"            # <corpus>_en_<lang>[-REGION].tsv.gz
    out_dir: str = "data/mt_data"
    languages: list[str] = field(default_factory=lambda: ["fr", "es"])  # target languages (source: en)
    min_words: int = 3                      # shorter sources are UI labels, not sentences
    max_words: int = 40                     # longer ones are paragraphs
    min_ratio: float = 0.5                  # target/source length in characters
    max_ratio: float = 2.2
    block_rows: int = 200                   # rows per document where the file marks no chapters
    test_share: float = 0.1                 # share of documents held out for mt_eval
    val_share: float = 0.05                 # share of documents for validation losses
    seed: int = 0                           # salt of the document hash

    def check(self) -> None:
        if not 1 <= self.min_words <= self.max_words:
            raise ConfigError("mt_data: need 1 <= min_words <= max_words")
        if not 0 < self.min_ratio <= 1 <= self.max_ratio:
            raise ConfigError("mt_data: need 0 < min_ratio <= 1 <= max_ratio")
        if not (0 < self.test_share < 1 and 0 <= self.val_share < 1 and self.test_share + self.val_share < 1):
            raise ConfigError("mt_data: test_share and val_share are shares summing below 1")
        if self.block_rows < 1 or not self.languages:
            raise ConfigError("mt_data: need block_rows >= 1 and at least one language")


FORMAT = re.compile(r"%(\(\w+\))?[-+ #0]*(\d+|\*)?(\.\d+)?[hlLqjzt]*[sdiufFeEgGxXoOcpn%]|\{\w*(:[^}]*)?\}|\$\{|\$\w+")
MARKUP = re.compile(r"<[/!?]?[A-Za-z][^>]*>|&[A-Za-z]+;|&#\d+;")
WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")
FILE = re.compile(r"(?P<corpus>[a-z]+)_en_(?P<lang>[a-z]{2})(-[A-Z]{2})?\.tsv\.gz")
CHAPTER = "Table of Contents"  # Debian Reference starts every chapter with it


def words(text: str) -> list[str]:
    return WORD.findall(text)


def drop_reason(src: str, tgt: str, cfg: MTDataConfig) -> str | None:
    """Why a pair is not a training sentence pair, or None when it is one."""
    src, tgt = src.strip(), tgt.strip()
    if not src or not tgt:
        return "empty"
    if FORMAT.search(src) or FORMAT.search(tgt):
        return "format_string"
    if MARKUP.search(src) or MARKUP.search(tgt):
        return "markup"
    n = len(words(src))
    if n < cfg.min_words:
        return "label"
    if n > cfg.max_words:
        return "too_long"
    if not src[0].isalpha() and src[0] not in "\"'“‘(":
        return "not_a_sentence"
    if tgt == src:
        return "untranslated"
    if not cfg.min_ratio <= len(tgt) / len(src) <= cfg.max_ratio:
        return "length_ratio"
    return None


def is_text(line: str) -> bool:
    """Good enough for monolingual pretraining: words, no format strings or markup."""
    return bool(line.strip()) and not FORMAT.search(line) and not MARKUP.search(line) and len(words(line)) >= 2


def read_raw(raw_dir: str, languages: list[str], block_rows: int) -> pd.DataFrame:
    """Every row of every shipped file with its corpus, target language and document id."""
    frames = []
    for path in sorted(Path(raw_dir).glob("*.tsv.gz")):
        m = FILE.fullmatch(path.name)
        if m is None or m["lang"] not in languages:
            continue
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [line.rstrip("\n").split("\t") for line in f]
        src = [r[0] if r else "" for r in rows]
        tgt = [r[1] if len(r) > 1 else "" for r in rows]
        if m["corpus"] == "debref":  # real chapters
            chapters, n = [], -1
            for s in src:
                n += s.strip() == CHAPTER
                chapters.append(max(n, 0))
            docs = [f"debref:ch{c:02d}" for c in chapters]
        else:  # catalogs and chapters in file order: blocks of consecutive rows
            docs = [f"{m['corpus']}:{m['lang']}:b{i // block_rows:03d}" for i in range(len(rows))]
        frames.append(pd.DataFrame({"corpus": m["corpus"], "tgt_lang": m["lang"], "doc_id": docs,
                                    "src": src, "tgt": tgt, "row": range(len(rows))}))
    if not frames:
        raise FileNotFoundError(f"{raw_dir}: no <corpus>_en_<lang>.tsv.gz for languages {languages}")
    return pd.concat(frames, ignore_index=True)


def split_of(doc_id: str, cfg: MTDataConfig) -> str:
    """A document's split: a stable function of its id and the seed, never of its rows."""
    u = int.from_bytes(hashlib.sha256(f"{cfg.seed}:{doc_id}".encode()).digest()[:8], "big") / 2**64
    return "test" if u < cfg.test_share else "val" if u < cfg.test_share + cfg.val_share else "train"


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def build_pairs(raw: pd.DataFrame, cfg: MTDataConfig) -> tuple[pd.DataFrame, dict]:
    """Filtered, deduplicated pairs with their split; counts of what each step removed."""
    df = raw.copy()
    df["split"] = [split_of(d, cfg) for d in df["doc_id"]]
    df["reason"] = [drop_reason(s, t, cfg) for s, t in zip(df["src"], df["tgt"])]
    counts = {"rows": len(df), **{f"dropped_{k}": int(v) for k, v in df["reason"].value_counts().items()}}
    df = df[df["reason"].isna()].drop(columns="reason")
    df["src"], df["tgt"] = df["src"].str.strip(), df["tgt"].str.strip()
    df["key"] = df["tgt_lang"] + "\t" + df["src"].map(normalise)
    # duplicates: keep a test copy when there is one (so the held-out set stays as large as it can be)
    order = df["split"].map({"test": 0, "val": 1, "train": 2})
    before = len(df)
    df = df.assign(_o=order).sort_values(["_o", "corpus", "tgt_lang", "row"], kind="stable")
    df = df.drop_duplicates("key").drop(columns=["_o", "key"])
    counts["dropped_duplicate"] = before - len(df)
    # a test source sentence (any language) is not trained on, not even as another pair's source
    test_src = set(df.loc[df["split"] == "test", "src"].map(normalise))
    leak = (df["split"] != "test") & df["src"].map(normalise).isin(test_src)
    counts["dropped_test_source_elsewhere"] = int(leak.sum())
    df = df[~leak].sort_values(["tgt_lang", "corpus", "row"], kind="stable").reset_index(drop=True)
    df.insert(0, "pair_id", [f"{c}:{lang}:{r}" for c, lang, r in zip(df["corpus"], df["tgt_lang"], df["row"])])
    df.insert(3, "src_lang", "en")
    return df.drop(columns="row"), counts


def build_mono(raw: pd.DataFrame, pairs: pd.DataFrame, cfg: MTDataConfig) -> pd.DataFrame:
    """Monolingual text of the train and val documents, both languages, in the chunk layout."""
    test_text = set(pairs.loc[pairs["split"] == "test", "src"].map(normalise)) | \
        set(pairs.loc[pairs["split"] == "test", "tgt"].map(normalise))
    rows, seen = [], set()
    raw = raw.assign(split=[split_of(d, cfg) for d in raw["doc_id"]])
    for (doc_id, lang), part in raw[raw["split"] != "test"].groupby(["doc_id", "tgt_lang"], sort=True):
        split = part["split"].iloc[0]
        for side, col in (("en", "src"), (lang, "tgt")):
            lines = []
            for line in part[col]:
                line = line.strip()
                key = (side, normalise(line))
                if is_text(line) and key not in seen and key[1] not in test_text:
                    seen.add(key)
                    lines.append(line)
            if lines:
                text = "\n".join(lines)
                rows.append({"doc_id": f"{side}|{doc_id}", "lang": side, "split": split, "start": 0,
                             "end": len(text), "text": text})
    return pd.DataFrame(rows, columns=["doc_id", "lang", "split", "start", "end", "text"])


def mt_data(cfg: MTDataConfig) -> dict:
    raw = read_raw(cfg.raw_dir, cfg.languages, cfg.block_rows)
    pairs, counts = build_pairs(raw, cfg)
    mono = build_mono(raw, pairs, cfg)
    docs = pairs.groupby("split")["doc_id"].agg(lambda d: set(d))
    for a, b in (("train", "test"), ("val", "test"), ("train", "val")):
        assert not docs.get(a, set()) & docs.get(b, set()), f"a document in both {a} and {b}"
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs.to_parquet(out / "pairs.parquet", index=False)
    mono.to_parquet(out / "mono.parquet", index=False)
    summary = {
        **counts, "pairs": len(pairs),
        "pairs_by_split": {f"en-{lang}": {s: int(n) for s, n in part["split"].value_counts().items()}
                           for lang, part in pairs.groupby("tgt_lang")},
        "documents_by_split": {s: len(d) for s, d in docs.items()},
        "mono_chars": {lang: int(part["text"].str.len().sum()) for lang, part in mono.groupby("lang")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(MTDataConfig, "mt_data", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        summary = mt_data(cfg)
        mlflow.log_metrics({k: v for k, v in summary.items() if isinstance(v, int)})
        mlflow.log_artifact(str(Path(cfg.out_dir) / "summary.json"))
    print(json.dumps(summary))


@task(name="mt_data", task_run_name="{stage}")
def mt_data_task(run: dict[str, str], stage: str = "mt_data") -> dict:
    return run_stage(stage, **run)


if __name__ == "__main__":
    main()
