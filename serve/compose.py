"""POST /v1/compose: Smart Compose, one request per keystroke (book chapter 2's serving path).

input -> triggering -> phrase generator -> filtering -> post-processing -> output:

- **Triggering** (`forgeline.compose.should_trigger`): only at a word boundary, after the minimum
  prefix, never mid-word, not right after a backspace or a rejected suggestion, and not while the
  keys come faster than the debounce. The client sends its state with each keystroke: `last_event`
  and `idle_ms` (how long since the previous key).
- **Phrase generator**: beam search (models/sampling.py) from the session's prompt cache. Every
  keystroke of a session extends the cache of the previous one, triggered or not, so at a word
  boundary only the newest token or two still run before the beams do.
- **Filtering**: the beam's mean log-probability per token must reach the threshold compose_eval
  tuned on validation (the model folder's compose.json); at most max_words words, cut at a word
  or sentence boundary.
- **Post-processing**: a suggestion is dropped when forgeline/safety.py's PII rules (e-mail, phone,
  card, SSN, IBAN, credentials) match in it or in the prefix's tail completed by it. The guard's
  classifier is not run per keystroke (an embedding per key would eat the latency budget).
- **Bad input**: a body that is not JSON, a prefix that is not a string, empty, or holding control
  characters: 400; a prefix over MAX_PREFIX_CHARS or a body over MAX_BODY_BYTES: 413. Never a 500.

    curl -s 127.0.0.1:8000/v1/compose -H 'content-type: application/json' \\
         -d '{"prefix": "My dear Lizzy, I am very ", "session_id": "tab-1", "idle_ms": 400}'

The model folder is data/compose_eval/model (FORGELINE_COMPOSE_MODEL overrides), loaded at the
first request; without it the endpoint answers 503.
"""
from __future__ import annotations

import json
import os
import threading
import time
import unicodedata
from collections import OrderedDict
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from forgeline.compose import Composer, should_trigger
from forgeline.paths import ROOT
from forgeline.safety import find_pii

MODEL_DIR = Path(os.environ.get("FORGELINE_COMPOSE_MODEL", ROOT / "data" / "compose_eval" / "model"))
MAX_PREFIX_CHARS = 4000       # a long e-mail; the model reads only its last context_tokens anyway
MAX_BODY_BYTES = 32_768
MAX_SESSIONS = 256            # prompt caches kept (least recently used dropped): ~0.2 MB each for `tiny`
PII_TAIL_CHARS = 64           # prefix characters checked together with the suggestion
REPLACEMENT = "\ufffd"         # what a decoder puts for bytes that were not text


class ComposeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prefix: StrictStr = Field(description="the text before the caret")
    session_id: StrictStr = Field("", max_length=128, description="one per compose box: its prompt cache")
    last_event: Literal["type", "backspace", "reject", "accept", "paste"] = "type"
    idle_ms: int = Field(1_000_000, ge=0, description="ms since the previous keystroke")


class ComposeResponse(BaseModel):
    suggestion: str | None      # the words to show after the caret (ghost text), or None
    triggered: bool
    reason: str                 # ok | not_word_boundary | prefix_too_short | after_backspace | after_reject
                                # | debounce | no_phrase | low_confidence | pii
    score: float | None         # the beam's mean log-probability per token
    threshold: float
    cached_tokens: int          # prompt tokens reused from the previous keystroke's cache
    computed_tokens: int        # prompt tokens run now
    latency_ms: float


def check_prefix(prefix: str) -> None:
    """400 for an empty or non-text prefix, 413 for an over-long one."""
    if len(prefix) > MAX_PREFIX_CHARS:
        raise HTTPException(413, f"prefix has {len(prefix)} characters; at most {MAX_PREFIX_CHARS}")
    if not prefix.strip():
        raise HTTPException(400, "prefix is empty")
    bad = next((c for c in prefix if c == REPLACEMENT
                or c not in "\n\t\r" and unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn")), None)
    if bad is not None:
        raise HTTPException(400, f"prefix is not text: it holds {ascii(bad)}")


def flags_pii(prefix: str, suggestion: str) -> bool:
    """PII in the suggestion, or in the prefix's tail that the suggestion completes."""
    tail = prefix[-PII_TAIL_CHARS:]
    return any(end > len(tail) for _, _, end in find_pii(tail + suggestion))


class ComposeService:
    """The model, its settings and the sessions' prompt caches; one keystroke at a time on the model."""

    def __init__(self, model_dir: str | Path = MODEL_DIR):
        self.model_dir = Path(model_dir)
        self.composer: Composer | None = None
        self.sessions: OrderedDict[str, object] = OrderedDict()
        self.lock = threading.Lock()

    def load(self) -> Composer:
        if self.composer is None:
            if not (self.model_dir / "model.safetensors").exists():
                raise HTTPException(503, f"no compose model at {self.model_dir}: run `forgeline run compose` first")
            self.composer = Composer.load(self.model_dir)
        return self.composer

    def handle(self, req: ComposeRequest) -> ComposeResponse:
        t0 = time.perf_counter()
        check_prefix(req.prefix)
        with self.lock:
            composer = self.load()
            s = composer.settings
            triggered, reason = should_trigger(req.prefix, req.last_event, req.idle_ms, s)
            prev = self.sessions.pop(req.session_id, None) if req.session_id else None
            cache, computed = composer.extend(req.prefix, prev)   # every keystroke: the next one reuses it
            proposal = None
            if triggered:
                proposal, cache, _ = composer.propose(req.prefix, cache)
                reason = "no_phrase" if proposal is None else "low_confidence" if proposal.score < s.threshold else "ok"
            if req.session_id:
                self.sessions[req.session_id] = cache
                while len(self.sessions) > MAX_SESSIONS:
                    self.sessions.popitem(last=False)
        suggestion = proposal.text if proposal is not None and reason == "ok" else None
        if suggestion is not None and flags_pii(req.prefix, suggestion):
            suggestion, reason = None, "pii"
        return ComposeResponse(suggestion=suggestion, triggered=triggered, reason=reason,
                               score=proposal.score if proposal else None, threshold=s.threshold,
                               cached_tokens=len(cache.tokens) - computed, computed_tokens=computed,
                               latency_ms=(time.perf_counter() - t0) * 1000)


def make_router(service: ComposeService) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/compose", response_model=ComposeResponse,
                 openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                     "schema": ComposeRequest.model_json_schema()}}}})
    async def compose(request: Request) -> ComposeResponse:
        """One keystroke: a suggestion to show after the caret, or why there is none."""
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"request body has {len(body)} bytes; at most {MAX_BODY_BYTES}")
        try:
            req = ComposeRequest.model_validate(json.loads(body))
        except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError and ValidationError are ValueErrors
            detail = e.errors(include_url=False, include_input=False) if isinstance(e, ValidationError) else str(e)
            raise HTTPException(400, detail) from None
        return await run_in_threadpool(service.handle, req)

    return router


router = make_router(ComposeService())
