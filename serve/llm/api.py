"""OpenAI-compatible HTTP API over the assistant: the routes serve/app.py mounts as pipeline "llm".

    POST /v1/chat/completions   (stream: Server-Sent Events, as OpenAI's)    POST /v1/completions
    GET  /v1/models                                                        POST /v1/moderations

Parameters: model, messages | prompt, temperature, top_p, max_tokens (max_completion_tokens), stop, n, seed,
logprobs/top_logprobs, frequency_penalty, presence_penalty; extensions (the openai client's `extra_body`):
best_of, repetition_penalty, session_id, trace, ignore_eos (vLLM's). `usage` is in every answer (a stream's last chunk). Errors are
OpenAI's error object: 400 bad JSON or field, 404 unknown model, 413 body too large, 429 per-client rate limit
(with Retry-After), 503 when shedding load or when no model can be served, 500 with no stack trace.

Streams (`stream: true`) release text as the response check passes it (serve/llm/assistant.py's docstring): chat
chunks carry `choices[0].delta.content` and, with `logprobs`, `choices[0].logprobs.content` = the items of the tokens
whose text ends in that chunk (joined: the non-streamed reply's, for the same seed); completion chunks carry
`choices[0].text` and the legacy `logprobs` (tokens, token_logprobs, top_logprobs, text_offset) the same way.
A chunk of text the model did not write (a rejection reply) has `logprobs: null`. With n > 1 or best_of > 1 (both
default to 1 in a stream) the choices are complete before the first chunk: each comes whole, in one chunk; a
completion request with several prompts is answered whole too, one chunk per choice. Then a chunk with each
choice's finish_reason, then `choices: []` with `usage` (and the `forgeline` extension), then [DONE].

What it serves comes from the environment (read once, at the first request):
    FORGELINE_LLM_MODEL   a model folder or registry URI (default models:/forgeline-llm@champion, polled)
    FORGELINE_LLM_REWARD  the reward stage's folder (default data/reward when present)
    FORGELINE_LLM_GUARD   the safety stage's guard folder (default data/safety/guard when present)
    FORGELINE_LLM_CONFIG  a YAML of ServiceConfig overrides (serve/llm/assistant.py: limits, defaults)
    FORGELINE_LLM_LOG     level of the request log on stderr (default INFO: one JSON line per request with its trace)
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from forgeline.paths import ROOT
from serve.llm.assistant import Reply, RequestError, ServiceConfig, StreamDelta
from serve.llm.source import ModelHolder, ModelUnavailable

log = logging.getLogger("forgeline.serve.llm")
MODEL_ID = "forgeline-llm"
OPENAI_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
                     "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
                     "violence/graphic")


# ----------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")     # OpenAI parameters we do not serve are ignored, as vLLM does
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1)
    seed: int | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    ignore_eos: bool = False
    stream: bool = False
    trace: bool = False
    session_id: str | None = Field(None, max_length=128)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)


class CompletionBody(_Body):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ModerationBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: str | list[str]
    model: str | None = None


def _text(content) -> str:
    """A message's content: a string, or OpenAI's list of parts (text parts joined; others refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for p in content:
        if p.get("type") != "text" or not isinstance(p.get("text"), str):
            raise RequestError("only text content parts are served", "messages")
        parts.append(p["text"])
    return "\n".join(parts)


# ----------------------------------------------------------------------------- errors and limits


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type_, param, code, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}},
                            status_code=self.status, headers=self.headers)


class RateLimiter:
    """A token bucket per client: `rate` requests a second, bursts of `burst`."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 when the request may go, else the seconds until it could."""
        now = self.clock()
        if len(self.buckets) > 10000:    # forget clients whose buckets are full again
            self.buckets = {k: v for k, v in self.buckets.items() if v[0] + (now - v[1]) * self.rate < self.burst}
        tokens, last = self.buckets.get(key, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            self.buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
        self.buckets[key] = (tokens - 1, now)
        return 0.0


class Gate:
    """At most `slots` generations at once and `queued` waiting for one; beyond that, or after waiting
    `timeout_s`, a request is shed (503) instead of queueing without bound.

    A slot is a lease: `acquire` returns its key and `release(key)` ends it (twice is harmless). A lease older
    than `lease_s` is taken back, so a stream whose client left before its body ever started (no code of ours
    runs then to release it) cannot hold a slot for good."""

    def __init__(self, slots: int, queued: int, timeout_s: float, lease_s: float, clock=time.monotonic):
        self.slots, self.queued, self.timeout_s, self.lease_s, self.clock = slots, queued, timeout_s, lease_s, clock
        self.leases: dict[int, float] = {}
        self.waiting = 0
        self._next = 0
        self._cond: asyncio.Condition | None = None

    def _free(self) -> bool:
        now = self.clock()
        for key in [k for k, t in self.leases.items() if now - t > self.lease_s]:
            log.warning("generation slot %d held %.0f s: taken back", key, now - self.leases.pop(key))
        return len(self.leases) < self.slots

    async def acquire(self) -> int:
        self._cond = self._cond or asyncio.Condition()
        async with self._cond:
            if not self._free():
                if self.waiting >= self.queued:
                    raise APIError(503, "the server is at capacity; retry shortly", "server_error", code="overloaded",
                                   headers={"Retry-After": "1"})
                self.waiting += 1
                try:
                    await asyncio.wait_for(self._cond.wait_for(self._free), self.timeout_s)
                except TimeoutError:
                    raise APIError(503, "no generation slot came free in time; retry shortly", "server_error",
                                   code="overloaded", headers={"Retry-After": "1"}) from None
                finally:
                    self.waiting -= 1
            self._next += 1
            self.leases[self._next] = self.clock()
            return self._next

    async def release(self, key: int) -> None:
        async with self._cond:
            if self.leases.pop(key, None) is not None:
                self._cond.notify()


# ----------------------------------------------------------------------------- the service


@dataclass
class Service:
    holder: ModelHolder
    cfg: ServiceConfig

    def __post_init__(self):
        self.limiter = RateLimiter(self.cfg.rate_per_s, self.cfg.rate_burst)
        self.gate = Gate(self.cfg.max_concurrent, self.cfg.max_queued, self.cfg.queue_timeout_s,
                         lease_s=2 * self.cfg.generation_timeout_s + 30)

    @classmethod
    def from_env(cls) -> "Service":
        cfg = ServiceConfig.from_yaml(os.environ.get("FORGELINE_LLM_CONFIG"))
        if not log.handlers:   # uvicorn configures only its own loggers: the request traces get a handler here
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(os.environ.get("FORGELINE_LLM_LOG", "INFO"))

        def default(var: str, folder: str) -> str | None:
            return os.environ.get(var) or (str(ROOT / folder) if (ROOT / folder / "config.json").exists() else None)

        guard_dir = os.environ.get("FORGELINE_LLM_GUARD") or (
            str(ROOT / "data/safety/guard") if (ROOT / "data/safety/guard/guard.json").exists() else None)
        guard = None
        if guard_dir:
            from forgeline.safety import Guard

            try:
                guard = Guard.load(guard_dir)
            except Exception as e:   # served without a guard? no: every request answers 503 and says why
                raise ModelUnavailable(f"the guard {guard_dir} cannot be loaded: {e}") from e
        holder = ModelHolder(os.environ.get("FORGELINE_LLM_MODEL") or f"models:/{MODEL_ID}@champion",
                             default("FORGELINE_LLM_REWARD", "data/reward"), guard, cfg)
        return cls(holder, cfg)


_service: Service | None = None


def service() -> Service:
    global _service
    if _service is None:
        _service = Service.from_env()
    return _service


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds {limit}", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None


def _parse(model: type[BaseModel], data: Any):
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise APIError(400, f"{param}: {err['msg']}", param=param, code="invalid_value") from None


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _check_model(name: str) -> None:
    if name not in (MODEL_ID, f"{MODEL_ID}@champion"):
        raise APIError(404, f"The model `{name}` does not exist (this server serves `{MODEL_ID}`)", param="model",
                       code="model_not_found")


def _settings(body: _Body, max_tokens: int | None) -> dict:
    return dict(n=body.n, best_of=body.best_of, temperature=body.temperature, top_p=body.top_p, max_tokens=max_tokens,
                stop=body.stop, seed=body.seed, frequency_penalty=body.frequency_penalty,
                presence_penalty=body.presence_penalty, repetition_penalty=body.repetition_penalty,
                session_id=body.session_id, ignore_eos=body.ignore_eos)


def _validate(assistant, kw: dict) -> None:
    """A stream's settings checked before it opens, so a bad one is a 400, not an error inside the stream."""
    assistant._settings(**{k: kw[k] for k in ("n", "best_of", "temperature", "top_p", "max_tokens", "stop", "seed",
                                              "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty",
                                              "repetition_penalty")}, timeout_s=None)


def _legacy_logprobs(items: list[dict] | None, offset: int) -> tuple[dict | None, int]:
    """Chat logprob items as /v1/completions' logprobs object, its text offsets from `offset`; and the next offset."""
    if items is None:
        return None, offset
    lp = {"tokens": [t["token"] for t in items], "token_logprobs": [t["logprob"] for t in items],
          "top_logprobs": [{x["token"]: x["logprob"] for x in t["top_logprobs"]} for t in items], "text_offset": []}
    for t in items:
        lp["text_offset"].append(offset)
        offset += len(t["token"])
    return lp, offset


def _extension(reply: Reply, trace: bool) -> dict:
    out = {"refused": reply.refused, "reason": reply.reason, "model_version": reply.model}
    return {"forgeline": {**out, "trace": reply.trace}} if trace else {"forgeline": out}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def guarded(handler):
    """Run a route: limits first (429), then its work; an APIError or RequestError becomes OpenAI's error
    object, anything unexpected a 500 that says nothing of the code (logged here with its traceback)."""
    async def route(request: Request):
        try:
            svc = service()
            wait = svc.limiter.take(_client(request))
            if wait > 0:
                raise APIError(429, "rate limit reached for this client; retry after the time in Retry-After",
                               "requests", code="rate_limit_exceeded", headers={"Retry-After": str(math.ceil(wait))})
            return await handler(request, svc)
        except APIError as e:
            return e.response()
        except RequestError as e:
            return APIError(400, str(e), param=e.param, code=e.code).response()
        except ModelUnavailable as e:
            return APIError(503, f"no model to serve: {e}", "server_error", code="model_unavailable",
                            headers={"Retry-After": "10"}).response()
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
        return APIError(500, "internal error (logged on the server)", "server_error").response()

    route.__name__ = handler.__name__
    route.__doc__ = handler.__doc__
    return route


router = APIRouter()


@router.get("/v1/models")
@guarded
async def list_models(request: Request, svc: Service):
    """The served model, when one is loaded or loadable."""
    try:
        assistant = await run_in_threadpool(svc.holder.current)
    except ModelUnavailable:
        return {"object": "list", "data": []}
    return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "forgeline",
                                        "version": assistant.name}]}


@router.post("/v1/moderations")
@guarded
async def moderations(request: Request, svc: Service):
    """The input safety filter on each input: OpenAI's categories (the guard's own category is added)."""
    body = _parse(ModerationBody, await _read_json(request, svc.cfg.max_body_bytes))
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or sum(map(len, texts)) > svc.cfg.max_prompt_chars:
        raise APIError(400, f"input: 1 to {svc.cfg.max_prompt_chars} characters in all", param="input")
    assistant = await run_in_threadpool(svc.holder.current)
    results = []
    for text in texts:
        v = await run_in_threadpool(assistant.moderate, text)
        flagged_cat = v.category or v.reason
        cats = {c: (not v.allowed and (c == flagged_cat or c.split("/")[0] == flagged_cat)) for c in OPENAI_CATEGORIES}
        scores = {c: float(v.scores.get(c, 1.0 if cats[c] else 0.0)) for c in OPENAI_CATEGORIES}
        if not v.allowed and flagged_cat and flagged_cat not in cats:
            cats[flagged_cat] = True
            scores[flagged_cat] = float(v.scores.get(flagged_cat, 1.0))
        results.append({"flagged": not v.allowed, "categories": cats, "category_scores": scores})
    return {"id": f"modr-{uuid.uuid4().hex}", "model": "forgeline-guard", "results": results}


@router.post("/v1/chat/completions")
@guarded
async def chat_completions(request: Request, svc: Service):
    """A chat reply through the whole pipeline; `stream: true` sends it as Server-Sent Events."""
    body = _parse(ChatBody, await _read_json(request, svc.cfg.max_body_bytes))
    _check_model(body.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)} for m in body.messages]
    kw = _settings(body, body.max_completion_tokens or body.max_tokens)
    kw.update(logprobs=body.logprobs, top_logprobs=body.top_logprobs)
    assistant = await run_in_threadpool(svc.holder.current)   # this request's model, to its end
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "created": created, "model": MODEL_ID, "system_fingerprint": assistant.name}
    if body.stream:
        _validate(assistant, kw)
        slot = await svc.gate.acquire()
        return StreamingResponse(_stream_chat(svc, slot, assistant, messages, kw, head, body.trace),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    slot = await svc.gate.acquire()
    try:
        reply = await run_in_threadpool(lambda: assistant.chat(messages, **kw))
    finally:
        await svc.gate.release(slot)
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                "logprobs": _chat_logprobs(c.logprobs)} for i, c in enumerate(reply.choices)]
    return {**head, "object": "chat.completion", "choices": choices, "usage": reply.usage, **_extension(reply, body.trace)}


def _stream_error(e: Exception) -> str:
    """An error after a stream's headers went: OpenAI's error object as an event (a RequestError says what was wrong)."""
    bad = isinstance(e, RequestError)
    if bad:
        log.info("stream refused: %s", e)
    else:
        log.exception("stream failed")
    return _sse({"error": {"message": str(e) if bad else "internal error (logged on the server)",
                           "type": "invalid_request_error" if bad else "server_error",
                           "param": getattr(e, "param", None), "code": getattr(e, "code", None)}})


def _chat_logprobs(items: list[dict] | None) -> dict | None:
    return {"content": items} if items is not None else None


async def _stream_chat(svc: Service, slot: int, assistant, messages, kw, head, trace: bool):
    chunk = {**head, "object": "chat.completion.chunk"}
    events = assistant.stream(messages, **kw)
    try:
        yield _sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        async for ev in iterate_in_threadpool(events):
            if isinstance(ev, StreamDelta):
                if ev.text or ev.logprobs:
                    yield _sse({**chunk, "choices": [{"index": 0, "delta": {"content": ev.text}, "finish_reason": None,
                                                      "logprobs": _chat_logprobs(ev.logprobs)}]})
                continue
            reply: Reply = ev
            for i, c in enumerate(reply.choices):
                if i:   # n > 1: the other choices, whole
                    yield _sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": c.text},
                                                      "finish_reason": None, "logprobs": _chat_logprobs(c.logprobs)}]})
                yield _sse({**chunk, "choices": [{"index": i, "delta": {}, "finish_reason": c.finish_reason}]})
            yield _sse({**chunk, "choices": [], "usage": reply.usage, **_extension(reply, trace)})
        yield _sse("[DONE]")
    except Exception as e:   # the headers are gone: the error goes into the stream, as OpenAI's does
        yield _stream_error(e)
    finally:
        try:
            events.close()      # stops the generation when the client went away mid-stream
        except ValueError:      # still inside next() in the thread pool: it ends at max_tokens or its deadline
            pass
        await svc.gate.release(slot)


@router.post("/v1/completions")
@guarded
async def completions(request: Request, svc: Service):
    """Text completion of a raw prompt (no chat template), through the same guards, best-of-N and limits."""
    body = _parse(CompletionBody, await _read_json(request, svc.cfg.max_body_bytes))
    _check_model(body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not 1 <= len(prompts) <= svc.cfg.max_n:
        raise APIError(400, f"prompt: 1 to {svc.cfg.max_n} prompts", param="prompt")
    kw = _settings(body, body.max_tokens or 16)   # OpenAI's default for completions
    kw.pop("session_id")
    kw.update(logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0)
    assistant = await run_in_threadpool(svc.holder.current)
    if body.stream and len(prompts) == 1:   # token by token (whole choices with n or best_of > 1)
        _validate(assistant, kw)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": MODEL_ID, "system_fingerprint": assistant.name}
        slot = await svc.gate.acquire()
        return StreamingResponse(_stream_completion(svc, slot, assistant, prompts[0], kw, head, body.echo, body.trace),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    slot = await svc.gate.acquire()
    try:
        replies = [await run_in_threadpool(lambda p=p: assistant.complete(p, **kw)) for p in prompts]
    finally:
        await svc.gate.release(slot)
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for p, reply in zip(prompts, replies):
        for c in reply.choices:
            lp, _ = _legacy_logprobs(c.logprobs, len(p) if body.echo else 0)
            choices.append({"index": len(choices), "text": (p if body.echo else "") + c.text, "logprobs": lp,
                            "finish_reason": c.finish_reason})
        usage = {k: usage[k] + reply.usage[k] for k in usage}
    out = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": MODEL_ID,
           "system_fingerprint": assistant.name, "choices": choices, "usage": usage,
           **_extension(replies[0], body.trace)}
    if body.stream:   # several prompts: one chunk per choice, whole, then usage
        async def events():
            for ch in choices:
                yield _sse({**{k: out[k] for k in ("id", "object", "created", "model")}, "choices": [ch]})
            yield _sse({**{k: out[k] for k in ("id", "object", "created", "model")}, "choices": [], "usage": usage})
            yield _sse("[DONE]")
        return StreamingResponse(events(), media_type="text/event-stream")
    return out


async def _stream_completion(svc: Service, slot: int, assistant, prompt: str, kw: dict, head: dict, echo: bool,
                             trace: bool):
    events = assistant.stream_complete(prompt, **kw)
    lead = prompt if echo else ""    # echo: the prompt leads the first chunk, and the text offsets count it
    offset = len(lead)
    try:
        async for ev in iterate_in_threadpool(events):
            if isinstance(ev, StreamDelta):
                if ev.text or ev.logprobs or lead:
                    lp, offset = _legacy_logprobs(ev.logprobs, offset)
                    yield _sse({**head, "choices": [{"index": 0, "text": lead + ev.text, "logprobs": lp,
                                                     "finish_reason": None}]})
                    lead = ""
                continue
            reply: Reply = ev
            for i, c in enumerate(reply.choices):
                if i:   # n > 1: the other choices, whole
                    lp, _ = _legacy_logprobs(c.logprobs, len(prompt) if echo else 0)
                    yield _sse({**head, "choices": [{"index": i, "text": (prompt if echo else "") + c.text,
                                                     "logprobs": lp, "finish_reason": None}]})
                yield _sse({**head, "choices": [{"index": i, "text": "", "logprobs": None,
                                                 "finish_reason": c.finish_reason}]})
            yield _sse({**head, "choices": [], "usage": reply.usage, **_extension(reply, trace)})
        yield _sse("[DONE]")
    except Exception as e:
        yield _stream_error(e)
    finally:
        try:
            events.close()
        except ValueError:
            pass
        await svc.gate.release(slot)
