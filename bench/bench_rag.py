"""RAG benchmarks (issue 16): ANN indexes at 100k x 384, end-to-end query latency, indexing throughput,
and retrieval quality on the golden set. Each part runs alone (each well under 5 minutes on 2 cores)
and updates its section of bench/results/rag.json.

- `ann`: the pipeline's real chunk embeddings (data/rag_embed/vectors.npy, MiniLM, 384-d) repeated with
  Gaussian noise to `--n` vectors (each copy x = normalise(v + N(0, sigma^2 I)), sigma 0.04 per dimension:
  a copy keeps cosine ~0.8 to its source, so the 10 nearest neighbours are not a tie between copies),
  queries = fresh noisy copies. Per index: recall@10 against exact search (flat) and queries/s, in one
  batch and one query at a time, over a sweep of each family's speed knob; the target is recall >= 0.97
  at >= 15x exact search's QPS.
- `latency`: the served query path (forgeline/grounding.answer on data/rag_index: embed the question,
  HNSW top-5, extractive answer with its sentence embeddings, faithfulness) on the 76 golden questions:
  p50 / p95 ms.
- `indexing`: rag_ingest (sandboxed parsing, OCR of the scan) + rag_chunk + rag_embed + rag_index on
  data/rag_raw into a temporary folder: pages/s, OCR included.
- `quality`: rag_eval's retrieval table on the golden set (every index x expansion, hybrid BM25),
  read from data/rag_eval/metrics.json (the stage's own output).

Needs the pipeline's outputs (`forgeline run rag`).

    flock /tmp/forgeline-heavy.lock .venv/bin/python -m bench.bench_rag --part ann [--n 100000]
    flock /tmp/forgeline-heavy.lock .venv/bin/python -m bench.bench_rag --part latency
    flock /tmp/forgeline-heavy.lock .venv/bin/python -m bench.bench_rag --part indexing
    .venv/bin/python -m bench.bench_rag --part quality
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import RESULTS, machine, write_result
from forgeline.paths import ROOT

DATA = ROOT / "data"
SWEEP = {"flat": [None], "hnsw": [16, 32, 64, 128], "ivf": [4, 8, 16, 32], "lsh": [None]}


def noisy_copies(vectors: np.ndarray, n: int, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = vectors[rng.integers(0, len(vectors), n)] + rng.normal(0, sigma, (n, vectors.shape[1])).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def timed_search(index, queries: np.ndarray, k: int, single: int) -> tuple[np.ndarray, float, float]:
    """(ids of the batch search, batch QPS, single-query QPS over the first `single` queries)."""
    from forgeline.retrieval import search

    search(index, queries[:8], k)  # warm up
    t = time.perf_counter()
    _, ids = search(index, queries, k)
    batch = len(queries) / (time.perf_counter() - t)
    t = time.perf_counter()
    for q in queries[:single]:
        search(index, q[None, :], k)
    return ids, batch, single / (time.perf_counter() - t)


def part_ann(n: int, n_queries: int, single: int, sigma: float, threads: int) -> dict:
    import faiss

    from forgeline.retrieval import IndexParams, build_index

    faiss.omp_set_num_threads(threads)
    real = np.load(DATA / "rag_embed" / "vectors.npy")
    base = noisy_copies(real, n, sigma, seed=0)
    queries = noisy_copies(real, n_queries, sigma, seed=1)
    params = IndexParams(lsh_bits=3072, ivf_nlist=1024, hnsw_m=32, hnsw_ef_construction=100, threads=threads)
    rows, exact = [], None
    for kind, knobs in SWEEP.items():
        t = time.perf_counter()
        index = build_index(base, kind, params)
        build_s = time.perf_counter() - t
        for knob in knobs:
            if kind == "hnsw":
                index.hnsw.efSearch = knob
            elif kind == "ivf":
                index.nprobe = knob
            ids, batch, one = timed_search(index, queries, 10, single)
            if kind == "flat":
                exact = ids
                ref_batch, ref_single = batch, one
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)]))
            rows.append({"index": kind, "knob": {"hnsw": "efSearch", "ivf": "nprobe"}.get(kind, ""), "value": knob,
                         "recall@10": recall, "qps_batch": batch, "qps_single": one,
                         "speedup_batch": batch / ref_batch, "speedup_single": one / ref_single,
                         "build_s": build_s, "target_met_single": recall >= 0.97 and one / ref_single >= 15,
                         "target_met_batch": recall >= 0.97 and batch / ref_batch >= 15})
            print(f"{kind:>5} {rows[-1]['knob']}={knob}: recall@10 {recall:.3f}, batch {batch:,.0f} q/s "
                  f"({batch / ref_batch:.1f}x), single {one:,.0f} q/s ({one / ref_single:.1f}x), build {build_s:.1f} s",
                  flush=True)
        del index
    return {"n": n, "dim": int(base.shape[1]), "source_vectors": len(real), "sigma": sigma, "queries": n_queries,
            "single_queries": single, "threads": threads, "params": {"lsh_bits": 3072, "ivf_nlist": 1024, "hnsw_m": 32,
                                                                   "hnsw_ef_construction": 100}, "rows": rows}


def part_latency(threads: int) -> dict:
    import torch

    from forgeline.config import load_config, read_yaml
    from forgeline.grounding import Corpus, answer, query_config
    from forgeline.retrieval import Encoder

    torch.set_num_threads(threads)
    golden = [json.loads(line) for line in (DATA / "groundtruth" / "rag_golden.jsonl").read_text().splitlines()]
    cfg = query_config(read_yaml(ROOT / "configs" / "rag_eval.yaml"))
    corpus = Corpus.from_index(DATA / "rag_index", Encoder(threads=threads))
    answer(golden[0]["question"], corpus, cfg)  # warm up
    ms = []
    for g in golden:
        t = time.perf_counter()
        answer(g["question"], corpus, cfg)
        ms.append(1000 * (time.perf_counter() - t))
    del load_config
    return {"queries": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(np.mean(ms)), "threads": threads, "index": json.loads(
                (DATA / "rag_index" / "index.json").read_text())["serve"], "top_k": cfg.top_k,
            "expansion": cfg.expansion, "hybrid": cfg.hybrid, "generator": cfg.generator}


def part_indexing(threads: int) -> dict:
    from forgeline.config import load_config
    from tasks.chunk import ChunkConfig, chunk
    from tasks.ingest import IngestConfig, ingest
    from tasks.rag_embed import RagEmbedConfig, rag_embed
    from tasks.rag_index import RagIndexConfig, rag_index

    with tempfile.TemporaryDirectory(prefix="bench-rag-") as tmp:
        d = {k: f"{tmp}/{k}" for k in ("ingest", "chunk", "embed", "index")}
        docs = f"{d['ingest']}/documents.parquet"
        t0 = time.perf_counter()
        s = ingest(load_config(IngestConfig, "rag_ingest", {"out_dir": d["ingest"], "ocr_workers": threads}))
        t1 = time.perf_counter()
        c = chunk(load_config(ChunkConfig, "rag_chunk", {"documents": docs, "out_dir": d["chunk"]}))
        e = rag_embed(load_config(RagEmbedConfig, "rag_embed", {"chunks": f"{d['chunk']}/chunks.parquet",
                                                               "documents": docs, "out_dir": d["embed"],
                                                               "threads": threads}))
        t2 = time.perf_counter()
        i = rag_index(load_config(RagIndexConfig, "rag_index", {"embed_dir": d["embed"], "documents": docs,
                                                               "out_dir": d["index"], "threads": threads}))
        t3 = time.perf_counter()
    return {"pages": s["pages"], "ocr_pages": s["ocr_pages"], "chunks": c["n_chunks"], "ingest_s": t1 - t0,
            "chunk_embed_s": t2 - t1, "index_s": t3 - t2, "index_build_s": i["build_seconds"], "total_s": t3 - t0,
            "pages_per_s": s["pages"] / (t3 - t0), "ingest_pages_per_s": s["pages"] / (t1 - t0),
            "embed_chunks_per_s": e["chunks_per_s"], "threads": threads}


def part_quality() -> dict:
    m = json.loads((DATA / "rag_eval" / "metrics.json").read_text())
    return {"questions": m["questions"], "retrieval": m["retrieval"], "answers": m["answers"], "ocr_effect": m["ocr_effect"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["ann", "latency", "indexing", "quality"], required=True)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--sigma", type=float, default=0.04)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    started = machine()
    if args.part == "ann":
        result = part_ann(args.n, args.queries, args.single, args.sigma, args.threads)
    elif args.part == "latency":
        result = part_latency(args.threads)
    elif args.part == "indexing":
        result = part_indexing(args.threads)
    else:
        result = part_quality()
    path = RESULTS / "rag.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    parts = old.get("parts", {})
    parts[args.part] = {**result, "machine_at_start": started, "machine_at_end": machine()}
    write_result("rag", {"parts": parts})
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1, default=str)[:3000])


if __name__ == "__main__":
    main()
