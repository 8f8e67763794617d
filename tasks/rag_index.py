"""rag_index: the FAISS indexes over rag_embed's vectors, and the metadata the query path cites from.

Builds each index family in `kinds` (flat = exact, lsh, ivf, hnsw: forgeline/retrieval.py) over the
chunks of every document except those under `exclude` (ocr_reference/: the text-layer twin of the
scanned PDF, kept for rag_eval's OCR comparison, never served). `serve` names the one the query
path loads. Pages whose OCR word confidence is under `low_ocr_confidence` are flagged, per page, in
meta.parquet (`low_ocr_confidence` on each chunk that touches one), pages.parquet and summary.json:
indexed and answered from like every other page, never dropped, and the answer says so.

Writes out_dir/index_<kind>.faiss, vectors.npy and meta.parquet (row i = FAISS id i), pages.parquet
(document, page, ocr, confidence, flag), index.json (serve, params, encoder) and summary.json.

    python -m tasks.rag_index [key=value ...]
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefect import task

from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.retrieval import KINDS, IndexParams, build_index, save_index
from forgeline.workspace import run_stage


@dataclass
class RagIndexConfig:
    embed_dir: str = "data/rag_embed"          # chunks.parquet, vectors.npy, encoder.json
    documents: str = "data/rag_ingest/documents.parquet"  # per-page OCR confidence
    out_dir: str = "data/rag_index"
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    serve: str = "hnsw"                        # the index the query path loads
    exclude: list[str] = field(default_factory=lambda: ["ocr_reference/"])  # source prefixes kept out
    low_ocr_confidence: float = 90.0           # mean tesseract word confidence (0-100) under which a page is flagged
    lsh_bits: int = 3072
    ivf_nlist: int = 64
    ivf_nprobe: int = 8
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128
    threads: int = 2

    def check(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ConfigError(f"rag_index: kinds {bad or '[]'}: each one of {list(KINDS)}")
        if self.serve not in self.kinds:
            raise ConfigError(f"rag_index: serve={self.serve!r} is not among kinds {self.kinds}")
        if not 0 <= self.low_ocr_confidence <= 100:
            raise ConfigError("rag_index: low_ocr_confidence is a percentage (0-100)")

    def params(self) -> IndexParams:
        return IndexParams(self.lsh_bits, self.ivf_nlist, self.ivf_nprobe, self.hnsw_m, self.hnsw_ef_construction,
                           self.hnsw_ef_search, self.threads)


def page_table(documents, threshold: float) -> list[dict]:
    """One row per page of every document: OCR'd or not, its confidence, and the low-confidence flag."""
    rows = []
    for d in documents.to_dict("records"):
        for page, conf in enumerate(json.loads(d["page_ocr_confidence"] or "[]"), 1):
            rows.append({"doc_id": d["doc_id"], "source": d["source"], "page": page, "ocr": conf is not None,
                         "ocr_confidence": math.nan if conf is None else conf,
                         "low_ocr_confidence": conf is not None and conf < threshold})
    return rows


def rag_index(cfg: RagIndexConfig) -> dict:
    import numpy as np
    import pandas as pd

    t0 = time.perf_counter()
    src = Path(cfg.embed_dir)
    meta = pd.read_parquet(src / "chunks.parquet")
    vectors = np.load(src / "vectors.npy")
    keep = ~meta["source"].str.startswith(tuple(cfg.exclude)) if cfg.exclude else np.ones(len(meta), bool)
    meta, vectors = meta[keep].reset_index(drop=True), vectors[np.asarray(keep)]
    pages = pd.DataFrame(page_table(pd.read_parquet(cfg.documents), cfg.low_ocr_confidence))
    pages = pages[~pages["source"].str.startswith(tuple(cfg.exclude))] if cfg.exclude else pages
    flagged = {(r.doc_id, r.page) for r in pages.itertuples() if r.low_ocr_confidence}
    meta["low_ocr_confidence"] = [any((d, p) in flagged for p in range(a, b + 1))
                                  for d, a, b in zip(meta["doc_id"], meta["page_start"], meta["page_end"])]

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = cfg.params()
    build_s = {}
    for kind in cfg.kinds:
        t = time.perf_counter()
        save_index(build_index(vectors, kind, params), out / f"index_{kind}.faiss")
        build_s[kind] = round(time.perf_counter() - t, 3)
    meta.to_parquet(out / "meta.parquet", index=False)
    np.save(out / "vectors.npy", vectors)
    pages.to_parquet(out / "pages.parquet", index=False)
    encoder = json.loads((src / "encoder.json").read_text())
    (out / "index.json").write_text(json.dumps({"serve": cfg.serve, "kinds": cfg.kinds, "params": asdict(params),
                                                "encoder": encoder}, indent=2) + "\n")
    low = pages[pages["low_ocr_confidence"]]
    summary = {"chunks": len(meta), "documents": int(meta["doc_id"].nunique()), "pages": len(pages),
               "ocr_pages": int(pages["ocr"].sum()), "low_ocr_pages": len(low),
               "low_ocr_chunks": int(meta["low_ocr_confidence"].sum()),
               "flagged_pages": [{"document": r.source, "page": int(r.page), "ocr_confidence": r.ocr_confidence}
                                 for r in low.itertuples()],
               "build_seconds": build_s, "seconds": round(time.perf_counter() - t0, 3)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"rag_index: {len(meta)} chunks of {summary['documents']} documents, indexes {cfg.kinds} "
          f"(serve {cfg.serve}); {len(low)} page(s) under {cfg.low_ocr_confidence:g}% OCR confidence flagged: "
          + ", ".join(f"{p['document']} p. {p['page']} ({p['ocr_confidence']:.1f}%)" for p in summary["flagged_pages"]),
          flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(RagIndexConfig, "rag_index", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        summary = rag_index(cfg)
        mlflow.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        mlflow.log_artifacts(cfg.out_dir, artifact_path="rag_index")  # the indexes and their metadata


@task(name="rag_index", task_run_name="{stage}")
def rag_index_task(run: dict[str, str], stage: str = "rag_index") -> dict:
    return run_stage(stage, **run)


if __name__ == "__main__":
    main()
