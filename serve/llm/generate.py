"""The response generator and best-of-N (book ch. 4.4): candidates through models/sampling.py (one batch, one
KV cache), stop strings, log-probabilities, a deadline and a text callback for streaming; then the reward model
(models/reward_model.py, the `reward` stage's folder) ranks them.

    gen = ResponseGenerator(model, tok)
    cands = gen(prompt_ids, GenSettings(n=4, temperature=0.8, max_new_tokens=64))
    best = select_best(cands, RewardScorer(rm, tok).score(messages, [c.text for c in cands]), n=1)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from forgeline.chat import END, EOT, collate_sequences, encode_reply
from models.sampling import GenerationConfig, generate


@dataclass(frozen=True)
class GenSettings:
    n: int = 1                          # candidates generated (best_of)
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()          # a candidate ends before the first of these strings
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    deadline: float | None = None       # time.monotonic() after which every candidate ends ("length")
    ignore_eos: bool = False            # <|end|> does not end a candidate: all run to max_new_tokens (benchmarks)


@dataclass
class Candidate:
    text: str
    tokens: list[int]                   # generated tokens kept (up to the stop, <|end|> excluded)
    finish_reason: str                  # stop | length
    generated: int                      # tokens the model produced for it (usage counts these)
    logprobs: list[dict] | None = None  # OpenAI's content items: token, logprob, bytes, top_logprobs
    score: float | None = None          # the reward model's, once ranked
    timed_out: bool = False


@dataclass
class _Row:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    text: str = ""
    done: str | None = None             # why it ended early: "stop" (string or <|end|>) or "timeout"


class ResponseGenerator:
    def __init__(self, model, tok):
        self.model, self.tok = model, tok
        self.stop_ids = tuple(i for i in (tok.token_to_id(END), tok.token_to_id(EOT)) if i is not None)
        self.raw = _raw_bytes(tok)

    def _token_item(self, tid: int, logp: float) -> dict:
        """OpenAI's item: `bytes` are the token's own (part of a character, maybe), None for a special token
        (not in the text)."""
        return {"token": self.tok.decode([tid], skip_special_tokens=False), "logprob": logp, "bytes": self.raw[tid]}

    def __call__(self, prompt_ids: list[int], s: GenSettings,
                 on_text: Callable[[int, str], None] | None = None) -> list[Candidate]:
        """s.n candidates for one prompt. on_text(row, text so far, item) after each token of each live row;
        item is that token's log-probability item (the one its candidate's `logprobs` holds), None without s.logprobs."""
        cfg = GenerationConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                               repetition_penalty=s.repetition_penalty, frequency_penalty=s.frequency_penalty,
                               presence_penalty=s.presence_penalty, num_return_sequences=s.n,
                               stop_tokens=() if s.ignore_eos else self.stop_ids, seed=s.seed)
        rows = [_Row() for _ in range(s.n)]

        def on_step(live: torch.Tensor, tokens: torch.Tensor, logits: torch.Tensor):
            ended = []
            lp = torch.log_softmax(logits, dim=-1) if s.logprobs else None
            late = s.deadline is not None and time.monotonic() > s.deadline
            for j, (r, t) in enumerate(zip(live.tolist(), tokens.tolist())):
                row = rows[r]
                if t in self.stop_ids and not s.ignore_eos:
                    row.done = "stop"
                    continue
                row.tokens.append(t)
                item = None
                if lp is not None:
                    item = self._token_item(t, float(lp[j, t]))
                    if s.top_logprobs:
                        top = torch.topk(lp[j], s.top_logprobs)
                        item["top_logprobs"] = [self._token_item(i, float(v)) for v, i in zip(top.values.tolist(), top.indices.tolist())]
                    else:
                        item["top_logprobs"] = []
                    row.logprobs.append(item)
                text = self.tok.decode(row.tokens, skip_special_tokens=True)
                cut = min((text.find(x) for x in s.stop if x in text), default=-1)
                if cut >= 0:
                    row.text, row.done = text[:cut], "stop"
                    ended.append(r)
                else:
                    row.text = text
                    if late:
                        row.done = "timeout"
                        ended.append(r)
                if on_text is not None:
                    on_text(r, row.text, item)
            return ended

        outs = generate(self.model, [prompt_ids], cfg, on_step=on_step)
        cands = []
        for row, out in zip(rows, outs):
            reason = "stop" if row.done == "stop" else "length"
            cands.append(Candidate(row.text, row.tokens, reason, len(out), row.logprobs if s.logprobs else None,
                                   timed_out=row.done == "timeout"))
        return cands


def _raw_bytes(tok) -> list[list[int] | None]:
    """Each token id's bytes, read through the byte-level BPE's alphabet (GPT-2's bytes_to_unicode: printable
    bytes stand for themselves, the other 68 for chr(256 + k) in byte order); None for special tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    byte_of = {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    raw: list[list[int] | None] = [None] * tok.get_vocab_size()
    for piece, i in tok.get_vocab().items():
        raw[i] = None if piece in special else [byte_of[c] for c in piece]
    return raw


class RewardScorer:
    """The reward model's score of each reply to one conversation: the scalar at the reply's <|end|>."""

    def __init__(self, rm, tok):
        self.rm, self.tok = rm, tok
        self.context = rm.gpt.config.block_size
        self.pad = tok.token_to_id("<|pad|>") or 0

    @torch.no_grad()
    def score(self, messages: list[dict], replies: list[str]) -> list[float]:
        seqs = [encode_reply(self.tok, messages, r)[-self.context:] for r in replies]
        idx, last = collate_sequences(seqs, self.pad)
        return [float(x) for x in self.rm(idx, last)]


def select_best(cands: list[Candidate], scores: list[float] | None, n: int) -> tuple[list[Candidate], dict]:
    """The n best candidates by reward (all of them when there is no reward model: the first n), and the
    trace entry saying which were kept and why."""
    if scores is None:
        return cands[:n], {"step": "best_of_n", "decision": "no_reward_model", "candidates": len(cands), "kept": n}
    for c, sc in zip(cands, scores):
        c.score = sc if math.isfinite(sc) else float("-inf")
    order = sorted(range(len(cands)), key=lambda i: -cands[i].score)
    return [cands[i] for i in order[:n]], {"step": "best_of_n", "decision": "ranked_by_reward",
                                           "scores": [round(s, 4) for s in scores], "kept": order[:n]}
