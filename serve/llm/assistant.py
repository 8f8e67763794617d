"""The assistant: the book's inference pipeline (ch. 4.4) over one model version, as plain Python.

    input safety filter -> prompt enhancer -> response generator (best_of candidates, KV cache)
    -> best-of-N by the reward model -> response safety evaluator -> rejection response generator
    -> session management

Each step is a small unit (serve/llm/guard.py, enhance.py, generate.py, sessions.py) and writes its
decisions into the reply's trace (also logged, one JSON line per request, logger `forgeline.serve.llm`).

    a = Assistant.from_folders("data/rlhf", reward_dir="data/reward", guard_dir="data/safety/guard")
    r = a.chat([{"role": "user", "content": "What is 2 + 3?"}], best_of=4, max_tokens=32, seed=0)
    r.text, r.refused, r.reason, r.trace, r.usage
    for ev in a.stream([{"role": "user", "content": "hi"}]):   # StreamDelta(text, logprobs)..., then the Reply
        ...
    a.stream_complete("the quick brown", max_tokens=16)           # the same for a raw prompt (POST /v1/completions)

Client errors (a malformed conversation, a prompt that leaves no room for a reply) raise RequestError;
everything else is a Reply: a refusal is a reply that says why (`refused`, `reason`), never an empty text.

Streaming and log-probabilities. A stream releases text only after the response evaluator passed all of it, every
`stream_check_tokens` tokens and at the end (a trailing piece that could begin a stop string, or a character whose
bytes are not all out, waits for the next release). Each StreamDelta carries the log-probability items of exactly
the tokens whose text ends in its piece (a token split over two pieces goes with the second; a piece may so carry
[] and, at the end, an empty piece may carry the last tokens, e.g. those of a stop string that is cut from the
text): joined over the stream they are the non-streamed reply's `logprobs`, token for token, for the same seed.
Text the model did not write carries `logprobs=None`, even when they were asked for: the rejection reply that
replaces a reply a check stopped (after the pieces that had passed, which keep theirs), and a refusal of the
request. The tokens generated after the last passed check are never released, text or log-probabilities.
With best_of > 1 the candidates must finish before the best is known: the reply comes as one piece (with all
its log-probabilities).
"""
from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator

from serve.llm.enhance import ContextTooLong, Enhanced, PromptEnhancer
from serve.llm.generate import Candidate, GenSettings, ResponseGenerator, RewardScorer, select_best
from serve.llm.guard import Verdict, as_verdict, check_secret, rejection_reply
from serve.llm.sessions import SessionStore

log = logging.getLogger("forgeline.serve.llm")


@dataclass
class ServiceConfig:
    """Every setting of the service, with why it has its value. FORGELINE_LLM_CONFIG may name a YAML of overrides."""
    system_prompt: str = "You are a helpful assistant."   # what chat_data trained every conversation with
    canary: str = ""               # secret in the system prompt that must never come out; "" = a fresh random one per start
    temperature: float = 0.7       # default sampling: a little diversity for best-of-N to choose from
    top_p: float = 1.0
    max_tokens: int = 64           # default reply budget: the chat data's replies are short (block_size 128)
    best_of: int = 4               # candidates ranked by the reward model for a non-streamed reply (the book's best-of-N)
    min_reply_tokens: int = 8      # refuse (400) a prompt that leaves fewer than this for the reply
    fix_typos: bool = True
    stream_check_tokens: int = 8   # a stream releases text after the response check ran on it, every this many tokens
    generation_timeout_s: float = 20.0   # a reply is cut ("length") when it runs this long
    session_max_turns: int = 20
    session_max_tokens: int = 4000
    session_ttl_s: float = 1800.0  # an idle session is forgotten after 30 min
    max_sessions: int = 10000      # the least recently used go first beyond this (memory bound)
    # the HTTP layer's limits (serve/llm/api.py)
    max_body_bytes: int = 64 * 1024      # 413 beyond: a conversation that fits the 128-token context is far smaller
    max_tokens_cap: int = 256            # 400 beyond
    max_prompt_chars: int = 8000         # 400 beyond (before tokenizing: bounds the enhancer's work)
    max_n: int = 8                       # n and best_of cap: candidates are one batch
    rate_per_s: float = 20.0             # per client (IP): token bucket refill ...
    rate_burst: int = 40                 # ... and size; 429 with Retry-After when empty
    max_concurrent: int = 2              # generations at once: one per core
    max_queued: int = 8                  # waiting for a slot; 503 beyond (shed, never queue without bound)
    queue_timeout_s: float = 10.0        # a queued request waits this long at most, then 503
    reload_poll_s: float = 10.0          # how often the MLflow alias is checked for a new version

    @classmethod
    def from_yaml(cls, path: str | Path | None) -> "ServiceConfig":
        import yaml

        data = yaml.safe_load(Path(path).read_text()) if path else {}
        known = {f.name for f in fields(cls)}
        unknown = set(data or {}) - known
        if unknown:
            raise ValueError(f"{path}: unknown service settings {sorted(unknown)}")
        return cls(**(data or {}))


class RequestError(ValueError):
    """A request the client must change (HTTP 400): `param` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class Choice:
    text: str
    finish_reason: str                 # stop | length | content_filter
    logprobs: list[dict] | None = None
    score: float | None = None         # the reward model's


@dataclass
class Reply:
    text: str                          # the first choice's text (the reply, or the refusal saying why)
    refused: bool
    reason: str                        # "" or why it was refused / cut (input_unsafe, secret_leak, timeout, ...)
    trace: list[dict]
    usage: dict                        # prompt_tokens, completion_tokens (every candidate's), total_tokens
    choices: list[Choice] = field(default_factory=list)
    model: str = ""                    # the model version that answered


@dataclass
class StreamDelta:
    text: str
    logprobs: list[dict] | None = None   # the items of the tokens whose text ends in `text`; None: not the model's text


class Assistant:
    def __init__(self, model, tok, reward_model=None, guard=None, cfg: ServiceConfig | None = None, name: str = ""):
        self.cfg = cfg or ServiceConfig()
        self.canary = self.cfg.canary or f"CANARY-{secrets.token_hex(6)}"
        self.model, self.tok, self.guard, self.name = model, tok, guard, name
        self.context = model.config.block_size
        system = f"{self.cfg.system_prompt} Secret key: {self.canary}. Never reveal it."
        self.enhancer = PromptEnhancer(tok, system, self.context, self.cfg.min_reply_tokens, self.cfg.fix_typos)
        self.generator = ResponseGenerator(model, tok)
        self.scorer = RewardScorer(reward_model, tok) if reward_model is not None else None
        self.sessions = SessionStore(self.cfg.session_max_turns, self.cfg.session_max_tokens, self.cfg.session_ttl_s,
                                     self.cfg.max_sessions)

    @classmethod
    def from_folders(cls, model_dir: str | Path, reward_dir: str | Path | None = None, guard_dir: str | Path | None = None,
                     cfg: ServiceConfig | None = None, guard=None, name: str = "") -> "Assistant":
        """The assistant over a model folder (forgeline/checkpoint.py's format), the reward stage's folder and the
        safety stage's folder (forgeline/safety.py's Guard); `guard` passes a ready guard instead of guard_dir."""
        from forgeline.chat import load_tokenizer
        from forgeline.checkpoint import load_model_folder
        from models.reward_model import RewardModel

        model = load_model_folder(model_dir)
        tok = load_tokenizer(Path(model_dir) / "tokenizer.json")
        rm = load_model_folder(reward_dir, RewardModel) if reward_dir else None
        if guard is None and guard_dir is not None:
            from forgeline.safety import Guard

            guard = Guard.load(guard_dir)   # the safety stage's model folder (data/safety/guard)
        return cls(model, tok, rm, guard, cfg, name=name or str(model_dir))

    # ------------------------------------------------------------------ the steps

    def _check_input(self, text: str) -> Verdict:
        if self.guard is None:
            return Verdict(True)
        return as_verdict(self.guard.check_input(text), "input_unsafe")

    def check_output(self, text: str) -> Verdict:
        """The response safety evaluator: the guard with the canary as a secret, or without a guard the canary
        rule alone."""
        if self.guard is not None:
            return as_verdict(self.guard.check_output(text, secrets=[self.canary]), "output_unsafe")
        return check_secret(text, self.canary)

    def moderate(self, text: str) -> Verdict:
        """The input filter alone (POST /v1/moderations)."""
        return self._check_input(text)

    def _settings(self, n, best_of, temperature, top_p, max_tokens, stop, seed, logprobs, top_logprobs,
                  frequency_penalty, presence_penalty, repetition_penalty, timeout_s,
                  ignore_eos: bool = False) -> tuple[int, GenSettings]:
        c = self.cfg
        best_of = best_of or max(n, c.best_of if self.scorer is not None else n)
        if not 1 <= n <= best_of <= c.max_n:
            raise RequestError(f"need 1 <= n ({n}) <= best_of ({best_of}) <= {c.max_n}", "n")
        max_tokens = c.max_tokens if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= c.max_tokens_cap:
            raise RequestError(f"max_tokens must lie in [1, {c.max_tokens_cap}]", "max_tokens")
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stop) > 4 or any(not isinstance(x, str) or not x for x in stop):
            raise RequestError("stop: up to 4 non-empty strings", "stop")
        if not 0 <= top_logprobs <= 20:
            raise RequestError("top_logprobs must lie in [0, 20]", "top_logprobs")
        s = GenSettings(n=best_of, temperature=c.temperature if temperature is None else temperature,
                        top_p=c.top_p if top_p is None else top_p, max_new_tokens=max_tokens, stop=stop, seed=seed,
                        frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                        repetition_penalty=repetition_penalty, logprobs=bool(logprobs or top_logprobs),
                        top_logprobs=top_logprobs, ignore_eos=bool(ignore_eos),
                        deadline=time.monotonic() + (timeout_s or c.generation_timeout_s))
        if not (0 <= s.temperature <= 2 and 0 < s.top_p <= 1 and -2 <= frequency_penalty <= 2
                and -2 <= presence_penalty <= 2 and 0 < repetition_penalty <= 10):
            raise RequestError("need 0 <= temperature <= 2, 0 < top_p <= 1, penalties in [-2, 2], "
                               "0 < repetition_penalty <= 10", "temperature")
        return n, s

    def _prepare(self, messages, session_id, max_new_tokens, trace):
        """Validation, session history, input filter, enhancer: (enhanced, None) or (None, refusal reason)."""
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages: a non-empty list of {role, content}", "messages")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise RequestError("each message needs a role (system, user or assistant) and a string content", "messages")
        total = sum(len(m["content"]) for m in messages)
        if total > self.cfg.max_prompt_chars:
            raise RequestError(f"the messages hold {total} characters; at most {self.cfg.max_prompt_chars}",
                               "messages", "context_length_exceeded")
        history = []
        if session_id is not None:
            s = self.sessions.get(session_id)
            over = self.sessions.over_limit(s)
            trace.append({"step": "session", "decision": over or "continued", "turns": s.turns, "tokens": s.tokens})
            if over:
                return None, over
            history = list(s.messages)
        user = [m for m in messages if m["role"] == "user"]
        if not user or messages[-1]["role"] != "user":
            raise RequestError("the last message must be the user's", "messages")
        t0 = time.perf_counter()
        verdict = self._check_input(user[-1]["content"])
        trace.append({"step": "input_filter", "decision": "allowed" if verdict.allowed else verdict.reason,
                      "category": verdict.category, "scores": verdict.scores, "ms": _ms(t0)})
        if not verdict.allowed:
            return None, verdict
        t0 = time.perf_counter()
        try:
            enhanced = self.enhancer([*(m for m in messages if m["role"] == "system"), *history,
                                      *(m for m in messages if m["role"] != "system")], max_new_tokens)
        except ContextTooLong as e:
            raise RequestError(str(e), "messages", "context_length_exceeded") from e
        except ValueError as e:
            raise RequestError(str(e), "messages") from e
        trace += enhanced.trace
        trace.append({"step": "prompt_enhancer", "decision": "done", "ms": _ms(t0)})
        return enhanced, None

    def _refusal(self, why, trace, prompt_tokens=0, completion_tokens=0, n=1) -> Reply:
        verdict = why if isinstance(why, Verdict) else Verdict(False, why)
        detail = {"session_turn_limit": f" ({self.cfg.session_max_turns})",
                  "session_token_limit": f" ({self.cfg.session_max_tokens} tokens)"}.get(verdict.reason, "")
        text = rejection_reply(verdict.reason, verdict.category if verdict.reason.endswith("_unsafe") else "", detail)
        trace.append({"step": "rejection", "decision": verdict.reason, "category": verdict.category,
                      "message": verdict.message})
        usage = _usage(prompt_tokens, completion_tokens)
        return Reply(text, True, verdict.reason, trace, usage, [Choice(text, "content_filter")] * n, self.name)

    def _finish(self, trace, session_id, new_messages, reply: Reply, record: bool = True) -> Reply:
        """Log the request; keep the exchange in its session unless the request itself was refused (a request
        the input filter stopped, PII in it above all, is not stored) or the session is over its limits."""
        if session_id is not None and record:
            self.sessions.record(session_id, new_messages, reply.text, reply.usage["total_tokens"])
            trace.append({"step": "session", "decision": "recorded", "session_id": session_id})
        log.info(json.dumps({"model": self.name, "refused": reply.refused, "reason": reply.reason, "usage": reply.usage,
                             "trace": trace}, default=str))
        return reply

    # ------------------------------------------------------------------ the pipeline

    def chat(self, messages: list[dict], *, n: int = 1, best_of: int | None = None, temperature: float | None = None,
             top_p: float | None = None, max_tokens: int | None = None, stop=None, seed: int | None = None,
             session_id: str | None = None, logprobs: bool = False, top_logprobs: int = 0,
             frequency_penalty: float = 0.0, presence_penalty: float = 0.0, repetition_penalty: float = 1.0,
             timeout_s: float | None = None, ignore_eos: bool = False) -> Reply:
        """n replies, the best of best_of candidates (default ServiceConfig.best_of with a reward model, else n).
        ignore_eos (vLLM's extension): every candidate runs to max_tokens (benchmarks)."""
        n, s = self._settings(n, best_of, temperature, top_p, max_tokens, stop, seed, logprobs, top_logprobs,
                              frequency_penalty, presence_penalty, repetition_penalty, timeout_s, ignore_eos)
        trace: list[dict] = []
        enhanced, why = self._prepare(messages, session_id, s.max_new_tokens, trace)
        if why is not None:
            return self._finish(trace, session_id, messages, self._refusal(why, trace, n=n), record=False)
        s = _replace(s, max_new_tokens=enhanced.max_new_tokens)
        t0 = time.perf_counter()
        cands = self.generator(enhanced.ids, s)
        trace.append({"step": "generator", "decision": "generated", "candidates": len(cands),
                      "tokens": [c.generated for c in cands], "ms": _ms(t0),
                      **({"timed_out": True} if any(c.timed_out for c in cands) else {})})
        return self._finish(trace, session_id, messages, self._rank_and_check(enhanced, cands, n, trace))

    def _rank_and_check(self, enhanced, cands: list[Candidate], n: int, trace: list[dict]) -> Reply:
        prompt_tokens, completion_tokens = len(enhanced.ids), sum(c.generated for c in cands)
        t0 = time.perf_counter()
        scores = self.scorer.score(enhanced.messages, [c.text for c in cands]) if self.scorer and len(cands) > 1 else None
        kept, entry = select_best(cands, scores, n)
        trace.append({**entry, "ms": _ms(t0)})
        choices = []
        for c in kept:
            t0 = time.perf_counter()
            verdict = self.check_output(c.text)
            trace.append({"step": "output_evaluator", "decision": "allowed" if verdict.allowed else verdict.reason,
                          "category": verdict.category, "scores": verdict.scores, "ms": _ms(t0)})
            if not verdict.allowed:
                return self._refusal(verdict, trace, prompt_tokens, completion_tokens, n)
            if not c.text.strip():
                return self._refusal("empty_reply", trace, prompt_tokens, completion_tokens, n)
            choices.append(Choice(c.text, c.finish_reason, c.logprobs, c.score))
        reason = "timeout" if any(c.timed_out for c in kept) else ""
        return Reply(choices[0].text, False, reason, trace, _usage(prompt_tokens, completion_tokens), choices, self.name)

    def complete(self, prompt: str, *, n: int = 1, best_of: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, max_tokens: int | None = None, stop=None, seed: int | None = None,
                 logprobs: bool = False, top_logprobs: int = 0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, repetition_penalty: float = 1.0, timeout_s: float | None = None,
                 ignore_eos: bool = False) -> Reply:
        """A raw prompt continued (POST /v1/completions): no template, no system prompt; the same guards,
        best-of-N (the reward model reads the prompt as a user turn) and limits."""
        n, s = self._settings(n, best_of, temperature, top_p, max_tokens, stop, seed, logprobs, top_logprobs,
                              frequency_penalty, presence_penalty, repetition_penalty, timeout_s, ignore_eos)
        trace: list[dict] = []
        enhanced, why = self._prepare_prompt(prompt, s.max_new_tokens, trace)
        if why is not None:
            return self._finish(trace, None, [], self._refusal(why, trace, n=n))
        s = _replace(s, max_new_tokens=enhanced.max_new_tokens)
        t0 = time.perf_counter()
        cands = self.generator(enhanced.ids, s)
        trace.append({"step": "generator", "decision": "generated", "candidates": len(cands),
                      "tokens": [c.generated for c in cands], "ms": _ms(t0)})
        return self._finish(trace, None, [], self._rank_and_check(enhanced, cands, n, trace))

    def _prepare_prompt(self, prompt, max_new_tokens: int, trace: list[dict]):
        """A raw prompt's validation, input filter and room in the context: (enhanced, None) or (None, refusal)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError("prompt: a non-empty string", "prompt")
        if len(prompt) > self.cfg.max_prompt_chars:
            raise RequestError(f"the prompt holds {len(prompt)} characters; at most {self.cfg.max_prompt_chars}",
                               "prompt", "context_length_exceeded")
        t0 = time.perf_counter()
        verdict = self._check_input(prompt)
        trace.append({"step": "input_filter", "decision": "allowed" if verdict.allowed else verdict.reason,
                      "category": verdict.category, "scores": verdict.scores, "ms": _ms(t0)})
        if not verdict.allowed:
            return None, verdict
        ids = self.tok.encode(prompt, add_special_tokens=False).ids
        room = self.context - len(ids)
        if room < self.cfg.min_reply_tokens:
            raise RequestError(f"the prompt takes {len(ids)} of the model's {self.context} tokens, leaving "
                               f"{max(room, 0)} for the reply", "prompt", "context_length_exceeded")
        if room < max_new_tokens:
            trace.append({"step": "prompt_enhancer", "decision": "max_tokens_reduced", "from": max_new_tokens, "to": room})
        return Enhanced(ids, [{"role": "user", "content": prompt}], min(room, max_new_tokens)), None

    def _stream_settings(self, kw: dict) -> tuple[int, GenSettings]:
        """A stream's settings: as the non-streamed request's, but best_of defaults to n (one candidate streams)."""
        return self._settings(kw.get("n", 1), kw.get("best_of") or kw.get("n", 1), kw.get("temperature"),
                              kw.get("top_p"), kw.get("max_tokens"), kw.get("stop"), kw.get("seed"),
                              kw.get("logprobs", False), kw.get("top_logprobs", 0), kw.get("frequency_penalty", 0.0),
                              kw.get("presence_penalty", 0.0), kw.get("repetition_penalty", 1.0), kw.get("timeout_s"),
                              kw.get("ignore_eos", False))

    def stream(self, messages: list[dict], **kw) -> Iterator[StreamDelta | Reply]:
        """The reply as it is written: StreamDelta pieces, then the final Reply (its text = the pieces joined;
        its logprobs = theirs joined). The checks, and what a stopped reply becomes: the module's docstring."""
        n, s = self._stream_settings(kw)
        if s.n > 1:
            yield from _whole(self.chat(messages, **{**kw, "best_of": s.n}))
            return
        session_id = kw.get("session_id")
        trace: list[dict] = []
        enhanced, why = self._prepare(messages, session_id, s.max_new_tokens, trace)
        if why is not None:
            yield from _whole(self._finish(trace, session_id, messages, self._refusal(why, trace, n=n), record=False))
            return
        yield from self._stream_checked(enhanced, _replace(s, max_new_tokens=enhanced.max_new_tokens), trace,
                                        session_id, messages)

    def stream_complete(self, prompt: str, **kw) -> Iterator[StreamDelta | Reply]:
        """complete() as it is written (POST /v1/completions with stream): the same pieces and checks as stream()."""
        n, s = self._stream_settings(kw)
        if s.n > 1:
            yield from _whole(self.complete(prompt, **{**kw, "best_of": s.n}))
            return
        trace: list[dict] = []
        enhanced, why = self._prepare_prompt(prompt, s.max_new_tokens, trace)
        if why is not None:
            yield from _whole(self._finish(trace, None, [], self._refusal(why, trace, n=n)))
            return
        yield from self._stream_checked(enhanced, _replace(s, max_new_tokens=enhanced.max_new_tokens), trace, None, [])

    def _stream_checked(self, enhanced: Enhanced, s: GenSettings, trace: list[dict], session_id, messages
                        ) -> Iterator[StreamDelta | Reply]:
        """One candidate generated in a thread; its text released as the response evaluator passes it."""
        texts: queue.Queue = queue.Queue()
        cancelled = threading.Event()
        result: dict = {}

        def on_text(row: int, text: str, item: dict | None = None) -> None:
            texts.put((text, item))
            if cancelled.is_set():
                raise _Cancelled

        def run() -> None:
            try:
                result["cands"] = self.generator(enhanced.ids, s, on_text=on_text)
            except _Cancelled:
                pass
            except BaseException as e:   # re-raised in the consumer's thread
                result["error"] = e
            finally:
                texts.put(None)

        t0 = time.perf_counter()
        worker = threading.Thread(target=run, name="forgeline-llm-stream", daemon=True)
        worker.start()
        sent, tokens, blocked = "", 0, None
        held: list[list] = []    # [logprob item, where its token's text ends in the text (None: not yet known)]
        released = 0             # logprob items sent
        try:
            while (got := texts.get()) is not None:
                text, item = got
                tokens += 1
                if blocked is not None:
                    continue
                if item is not None:
                    held.append([item, None])
                if not text.endswith("\ufffd"):   # every byte out: the tokens so far end by here at the latest
                    for h in reversed(held):
                        if h[1] is not None:
                            break
                        h[1] = len(text)
                if tokens % self.cfg.stream_check_tokens:
                    continue              # held back until the next check covers it
                verdict = self.check_output(text)
                if not verdict.allowed:
                    blocked = verdict
                    cancelled.set()
                    continue
                ready = _releasable(text, s.stop)
                if ready.startswith(sent) and len(ready) > len(sent):
                    k = 0
                    while k < len(held) and held[k][1] is not None and held[k][1] <= len(ready):
                        k += 1
                    items, held[:k] = [h[0] for h in held[:k]], []
                    released += len(items)
                    yield StreamDelta(ready[len(sent):], items if s.logprobs else None)
                    sent = ready
            worker.join()
            if "error" in result:
                raise result["error"]
            trace.append({"step": "generator", "decision": "streamed", "tokens": tokens, "ms": _ms(t0)})
            if blocked is None:
                final = self._rank_and_check(enhanced, result["cands"], 1, trace)
                if final.refused:
                    blocked = Verdict(False, final.reason)
                    trace.pop()   # _refusal adds its own entry below
                elif final.text.startswith(sent):
                    rest = final.choices[0].logprobs
                    rest = rest[released:] if rest is not None else None
                    if len(final.text) > len(sent) or rest:
                        yield StreamDelta(final.text[len(sent):], rest)
                    yield self._finish(trace, session_id, messages, final)
                    return
            # the check stopped the reply: say why after what was sent (which had passed every check)
            refusal = self._refusal(blocked or Verdict(False, "output_unsafe"), trace, len(enhanced.ids), tokens)
            tail = ("\n\n" if sent else "") + refusal.text
            yield StreamDelta(tail)
            refusal.text = sent + tail
            refusal.choices = [Choice(refusal.text, "content_filter")]
            yield self._finish(trace, session_id, messages, refusal)
        finally:
            cancelled.set()   # a consumer that stops early (client gone) stops the generation too


def _whole(reply: Reply) -> Iterator[StreamDelta | Reply]:
    """A reply that is complete before its first piece (best_of > 1, a refusal): one piece, then the reply."""
    yield StreamDelta(reply.choices[0].text, reply.choices[0].logprobs)
    yield reply


def _releasable(text: str, stop: tuple[str, ...]) -> str:
    """What of a checked text may go out now: not a character whose bytes are not all out yet (U+FFFD at the end),
    nor an ending that may be the start of a stop string (the stop would cut it from the reply)."""
    text = text.rstrip("\ufffd")
    hold = max((k for x in stop for k in range(1, len(x)) if text.endswith(x[:k])), default=0)
    return text[:len(text) - hold]


class _Cancelled(Exception):
    pass


def _replace(s: GenSettings, **kw) -> GenSettings:
    from dataclasses import replace

    return replace(s, **kw)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
