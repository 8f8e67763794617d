"""Build data/compose_raw/ (Smart Compose's own prose, beside the shipped sample data/raw/) from ../shared/data.

    .venv/bin/python scripts/make_compose_data.py [--shared ../shared/data]

Four Austen novels whole (the letter/dialogue domain; *Persuasion* comes from data/raw/austen) and
100 Brown-corpus documents that data/raw/brown's head does not hold (general prose). Reproducible:
novels copied byte for byte, Brown written gzip mtime 0. Provenance: data/README.md.
"""
from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # run as a plain script: forgeline is not on sys.path
OUT = ROOT / "data" / "compose_raw"
NOVELS = ("emma", "northangerabbey", "prideprejudice", "sensesensibility")
BROWN_DOCS = range(100, 200)  # blank-line-separated documents; data/raw/brown holds about the first 25


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    corpus = Path(ap.parse_args(argv).shared) / "corpus"
    (OUT / "austen").mkdir(parents=True, exist_ok=True)
    (OUT / "brown").mkdir(parents=True, exist_ok=True)
    for novel in NOVELS:
        shutil.copyfile(corpus / f"austen_{novel}.txt.gz", OUT / "austen" / f"{novel}.txt.gz")
    docs = [d for d in gzip.decompress((corpus / "brown.txt.gz").read_bytes()).decode("utf-8").split("\n\n") if d.strip()]
    text = "\n\n".join(docs[i].strip() for i in BROWN_DOCS) + "\n"
    (OUT / "brown" / "brown_100_199.txt.gz").write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))


if __name__ == "__main__":
    main()
