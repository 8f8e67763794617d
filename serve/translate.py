"""POST /v1/translate: the translation pipeline's model (data/mt_train) behind one route.

The text is split into sentences (after . ! ? followed by whitespace, and at line breaks), the
sentences are translated in batches (models/seq2seq.py's `translate`: greedy for beam 1, else
beam search with the length penalty mt_eval used), and each comes back with its confidence: the
mean log-probability per generated token (0 is certain; below about -1.5 read it as doubtful).

400s, each naming the problem: a source or target language the model does not translate
(source must be "en"; targets are the model's language tokens), an empty text, more than
MAX_CHARS characters or MAX_SENTENCES sentences, a sentence over the model's max_len tokens,
beam outside 1..MAX_BEAM. Without a model folder the route answers 503.

    curl -s 127.0.0.1:8000/v1/translate -H 'content-type: application/json' \\
         -d '{"text": "The file could not be opened. Check the permissions.", "source": "en", "target": "fr", "beam": 4}'

The model folder is data/mt_train (FORGELINE_MT_MODEL overrides), loaded at the first request.
"""
from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import torch
from fastapi import APIRouter, HTTPException
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from safetensors.torch import load_model

from forgeline.chat import load_tokenizer
from forgeline.paths import ROOT
from models.seq2seq import Seq2Seq, Seq2SeqConfig, translate

MODEL_DIR = Path(os.environ.get("FORGELINE_MT_MODEL", ROOT / "data" / "mt_train"))
SOURCE = "en"            # the pairs are English -> target
MAX_CHARS = 5000         # a page of text: ~2 s of beam-4 on one core
MAX_SENTENCES = 64
MAX_BEAM = 8
LENGTH_PENALTY = 0.6     # configs/mt_eval.yaml's, what the README figures were measured with
BATCH = 16               # sentences decoded together
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n+\s*")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: cut after . ! ? followed by whitespace, and at line breaks; empty pieces dropped."""
    return [s.strip() for s in SENTENCE_END.split(text) if s.strip()]


class TranslateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr = Field(description="the text to translate: one or more sentences")
    source: StrictStr = Field(SOURCE, description="source language code")
    target: StrictStr = Field(description="target language code, e.g. fr or es")
    beam: int = Field(4, description=f"beam width, 1 (greedy) to {MAX_BEAM}")


class Sentence(BaseModel):
    source: str
    translation: str
    confidence: float     # mean log-probability per generated token (EOS included)


class TranslateResponse(BaseModel):
    translation: str      # the sentences' translations joined by spaces
    sentences: list[Sentence]
    source: str
    target: str
    beam: int


class _Model:
    """The model and tokenizer, loaded once (thread-safe) at the first request."""

    def __init__(self, path: Path):
        self.path, self.lock, self.loaded = path, threading.Lock(), None

    def get(self) -> tuple[Seq2Seq, object]:
        with self.lock:
            if self.loaded is None:
                if not (self.path / "model.safetensors").is_file():
                    raise HTTPException(503, f"no translation model at {self.path}: run `forgeline run translate`")
                model = Seq2Seq(Seq2SeqConfig(**json.loads((self.path / "config.json").read_text())))
                load_model(model, str(self.path / "model.safetensors"))
                self.loaded = model.eval(), load_tokenizer(self.path / "tokenizer.json")
            return self.loaded


MODEL = _Model(MODEL_DIR)
router = APIRouter()


def check_request(req: TranslateRequest, model: Seq2Seq, tok) -> list[str]:
    """The request's sentences, or a 400 naming what is wrong with it."""
    targets = sorted(lang for lang in model.config.lang_ids if lang != SOURCE)
    if req.source != SOURCE or req.target not in targets:
        raise HTTPException(400, f"unsupported language pair {req.source}->{req.target}; "
                                 f"supported: {', '.join(f'{SOURCE}->{t}' for t in targets)}")
    if not 1 <= req.beam <= MAX_BEAM:
        raise HTTPException(400, f"beam={req.beam}: must be 1 to {MAX_BEAM}")
    if len(req.text) > MAX_CHARS:
        raise HTTPException(400, f"text has {len(req.text)} characters; at most {MAX_CHARS}")
    sentences = split_sentences(req.text)
    if not sentences:
        raise HTTPException(400, "text is empty")
    if len(sentences) > MAX_SENTENCES:
        raise HTTPException(400, f"text has {len(sentences)} sentences; at most {MAX_SENTENCES}")
    limit = model.config.max_len - 2  # the target-language token and EOS take two places
    for i, enc in enumerate(tok.encode_batch_fast(sentences, add_special_tokens=False)):
        if len(enc.ids) > limit:
            raise HTTPException(400, f"sentence {i + 1} has {len(enc.ids)} tokens; at most {limit}")
    return sentences


@router.post("/v1/translate", response_model=TranslateResponse)
async def translate_text(req: TranslateRequest) -> TranslateResponse:
    model, tok = await run_in_threadpool(MODEL.get)
    sentences = check_request(req, model, tok)

    def run() -> tuple[list[str], list[float]]:
        with torch.inference_mode():
            return translate(model, tok, sentences, req.target, req.beam, LENGTH_PENALTY, BATCH)

    texts, confidence = await run_in_threadpool(run)
    return TranslateResponse(translation=" ".join(texts), source=req.source, target=req.target, beam=req.beam,
                             sentences=[Sentence(source=s, translation=t, confidence=round(c, 4))
                                        for s, t, c in zip(sentences, texts, confidence)])
