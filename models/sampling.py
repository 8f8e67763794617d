"""Decoding for models with the models/gpt.py interface: greedy, sampling and beam search.

Every generator in Forgeline calls `generate`. It takes a model with the `GPT.hidden(idx, kv_cache,
positions, mask)` trunk (extending a `models.gpt.KVCache`) and an `lm_head`, and a list of prompts
(token id lists, any lengths). Settings live in one `GenerationConfig`:

- greedy (temperature=0) or sampling: repetition penalty (Keskar et al. 2019, CTRL, §4.1), OpenAI's
  frequency and presence penalties (on the tokens generated so far), then temperature, top-k (Fan et al. 2018), top-p / nucleus (Holtzman et al. 2020, arXiv:1904.09751);
- beam search (num_beams > 1) with length penalty, n-best (num_return_sequences) and early
  stopping, following transformers' beam search rules so both give the same beams on the same weights;
- stop tokens, a left-padded batch of prompts of different lengths, one KV cache per batch, and a
  seed (a private torch.Generator: the global RNG is left alone);
- `on_step`, called with each step's tokens and raw logits: streaming, log-probabilities, stop
  strings and deadlines live in the caller (serve/llm), which can end any row.

    from models.sampling import GenerationConfig, generate
    cfg = GenerationConfig(max_new_tokens=48, temperature=0.8, top_p=0.95, stop_tokens=(1,), seed=0)
    outs = generate(model, [[17, 5, 9], [4]], cfg)      # one list of new tokens per prompt

Prompts of different lengths are left-padded into one batch and run through `padded_forward`
below: `GPT.hidden` with per-row positions that start at 0 on each row's first real token and a
mask that hides pad keys. Equal-length batches run the trunk as it is. Either way only the last
position goes through the LM head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from models.gpt import KVCache


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0          # 0 = greedy (argmax); ignored by beam search
    top_k: int = 0                    # keep the k most likely tokens; 0 = off
    top_p: float = 1.0                # keep the smallest set of tokens whose probability reaches p; 1 = off
    repetition_penalty: float = 1.0   # CTRL: a seen token's logit is divided (>0) or multiplied (<0) by it
    frequency_penalty: float = 0.0    # OpenAI: logit -= this * times the token was generated so far
    presence_penalty: float = 0.0     # OpenAI: logit -= this once the token was generated at all
    num_beams: int = 1                # > 1: beam search (deterministic)
    length_penalty: float = 1.0       # beam score = sum log p / generated_length ** length_penalty
    early_stopping: bool | Literal["never"] = False  # as transformers: True, False (heuristic) or "never"
    num_return_sequences: int = 1     # n-best beams, or independent samples, per prompt
    stop_tokens: tuple[int, ...] = ()  # a row ends at (and includes) the first of these
    pad_token_id: int = 0             # fills left padding
    seed: int | None = None           # None: the global torch RNG

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.num_return_sequences < 1:
            raise ValueError("max_new_tokens, num_beams and num_return_sequences must be >= 1")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError("need temperature >= 0, top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences={self.num_return_sequences} > num_beams={self.num_beams}")
        if not (-2 <= self.frequency_penalty <= 2 and -2 <= self.presence_penalty <= 2):
            raise ValueError("frequency_penalty and presence_penalty must lie in [-2, 2] (OpenAI's range)")
        if self.num_beams > 1 and (self.frequency_penalty or self.presence_penalty):
            raise ValueError("frequency/presence penalties apply to sampling, not beam search")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping={self.early_stopping!r}: True, False or 'never'")
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))


@dataclass
class Hypothesis:
    tokens: list[int]   # new tokens, ending with a stop token if one was produced
    score: float        # sum of token log-probabilities / len(tokens) ** length_penalty


# ----------------------------------------------------------------------------- logits processing


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on tokens already in the sequence: logits (N, V), seen (N, V) bool.

    A seen token's logit l becomes l / penalty if l > 0, else l * penalty, so penalty > 1 always
    lowers its probability (as transformers' RepetitionPenaltyLogitsProcessor).
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence(logits: torch.Tensor, counts: torch.Tensor, frequency: float,
                             presence: float) -> torch.Tensor:
    """OpenAI's penalties: logits (N, V) minus frequency * count minus presence * (count > 0), where
    counts (N, V) is how often each token was generated so far (the prompt does not count)."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set all but the k largest logits of each row to -inf (ties with the k-th survive)."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p; -inf elsewhere.

    Sorted by probability, token i stays when the mass of the tokens before it is < p, so the
    most likely token always stays and the kept set is the shortest prefix with mass >= p.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, cfg: GenerationConfig,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """Repetition penalty, frequency/presence penalties (counts (N, V) of generated tokens), temperature,
    top-k, top-p, in that order (transformers' order, OpenAI's penalties with the repetition one); fp32 (N, V)."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if counts is not None:
        logits = apply_frequency_presence(logits, counts, cfg.frequency_penalty, cfg.presence_penalty)
    if cfg.temperature == 0:
        return logits
    logits = logits / cfg.temperature
    return top_p_filter(top_k_filter(logits, cfg.top_k), cfg.top_p)


def sample_rows(probs: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs (N, V) by inverse transform: the first token whose cumulative
    probability exceeds a uniform draw. One random number per row: torch.multinomial draws V
    exponentials per row, which took a quarter of a sampled decode step at V=4096.
    A token of probability 0 is never drawn (its cumulative mass equals its predecessor's)."""
    cdf = probs.double().cumsum(dim=-1)                                    # fp64: 4096 fp32 terms drift
    u = torch.rand(probs.size(0), 1, generator=gen, device=probs.device, dtype=torch.float64) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(1)
    # u can round up to the total mass: fall back to the row's last token with nonzero probability
    last = (probs > 0).cumsum(dim=-1).argmax(dim=-1)
    return torch.minimum(idx, last)


# ----------------------------------------------------------------------------- batched forward


def padded_forward(model, idx: torch.Tensor, cache: KVCache, pos: torch.Tensor,
                   key_valid: torch.Tensor) -> torch.Tensor:
    """GPT forward for a left-padded batch: last-position logits (B, V).

    idx (B, T) new tokens at cache slots cache.length.., pos (B, T) their positions within each
    row's own sequence, key_valid (B, cache.max_len) False at pad slots. A query sees the earlier
    non-pad keys and itself (a pad query seeing only itself keeps its row finite; no real query
    ever sees it). Only the last position goes through the LM head.
    """
    start, T = cache.length, idx.size(1)
    slots = torch.arange(start + T, device=idx.device)
    query_slots = slots[start:, None]                                        # (T, 1)
    mask = (slots[None, :] <= query_slots) & (key_valid[:, None, :start + T] | (slots[None, :] == query_slots))
    h = model.hidden(idx, cache, positions=pos, mask=mask[:, None])          # mask (B, 1, T, S)
    return model.lm_head(h[:, -1])


class _Batch:
    """Prompts as one left-padded batch sharing a KV cache: forward new tokens, reorder rows."""

    def __init__(self, model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad: int,
                 prompt_cache: PromptCache | None = None):
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self.model = model
        self.cached_logits = None
        if prompt_cache is not None:
            self._from_prompt_cache(prompts, max_new_tokens, prompt_cache)
            return
        lengths = torch.tensor([len(p) for p in prompts])
        width = int(lengths.max())
        total = width + max_new_tokens
        if model.config.pos_encoding == "learned" and total > model.config.block_size:
            raise ValueError(f"{total} tokens exceed block_size={model.config.block_size} "
                             "(learned positions cannot extrapolate)")
        device = next(model.parameters()).device
        self.prompt = torch.full((len(prompts), width), pad, dtype=torch.long)
        for i, p in enumerate(prompts):
            self.prompt[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        self.prompt = self.prompt.to(device)
        self.cache = KVCache(model.config.n_layer, total)
        self.ragged = bool((lengths != width).any())
        if self.ragged:
            self.offset = (width - lengths).to(device)                    # pad slots before row i's tokens
            self.key_valid = torch.arange(total, device=device)[None, :] >= self.offset[:, None]

    def _from_prompt_cache(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, pc: PromptCache) -> None:
        """One prompt whose keys and values `pc` already holds: prefill then runs nothing. The batch
        gets its own KVCache over pc's tensors; it writes only past pc's prompt (and reorder copies),
        so pc stays valid for the next call."""
        if len(prompts) != 1 or list(prompts[0]) != pc.tokens:
            raise ValueError("a prompt cache serves exactly the one prompt it holds")
        width = len(pc.tokens)
        if width + max_new_tokens > pc.cache.max_len:
            raise ValueError(f"prompt cache holds {pc.cache.max_len} positions; need {width + max_new_tokens}")
        device = pc.logits.device
        self.prompt = torch.as_tensor([pc.tokens], dtype=torch.long, device=device)
        self.cache = KVCache(len(pc.cache.k), pc.cache.max_len)
        self.cache.k, self.cache.v, self.cache.length = list(pc.cache.k), list(pc.cache.v), width
        self.ragged = False
        self.cached_logits = pc.logits

    def prefill(self, copies: int = 1) -> torch.Tensor:
        """Run the prompts once, then give each `copies` rows (beams, samples) sharing its cache:
        next-token logits (N * copies, V), copies of a prompt adjacent."""
        logits = self.cached_logits if self.cached_logits is not None else self.forward(self.prompt)
        if copies > 1:
            rows = torch.arange(self.prompt.size(0), device=self.prompt.device).repeat_interleave(copies)
            self.reorder(rows)
            self.prompt, logits = self.prompt[rows], logits[rows]
        return logits

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (N, T) new tokens -> next-token logits (N, V), fp32."""
        if not self.ragged:
            # the trunk, then the LM head on the last position only: on a 40-token prompt the
            # head over every position would cost more than the 4-layer trunk of `tiny`
            return self.model.lm_head(self.model.hidden(idx, self.cache)[:, -1]).float()
        slots = torch.arange(self.cache.length, self.cache.length + idx.size(1), device=idx.device)
        pos = (slots[None, :] - self.offset[:, None]).clamp(min=0)
        return padded_forward(self.model, idx, self.cache, pos, self.key_valid).float()

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep cache rows `rows` (N,), in that order (beam search's parents)."""
        for i in range(len(self.cache.k)):
            if self.cache.k[i] is not None:
                self.cache.k[i] = self.cache.k[i].index_select(0, rows)
                self.cache.v[i] = self.cache.v[i].index_select(0, rows)
        if self.ragged:
            self.offset, self.key_valid = self.offset[rows], self.key_valid[rows]

    def seen(self, vocab_size: int) -> torch.Tensor:
        """(N, V) bool: which tokens each prompt contains (pads excluded), for the repetition penalty."""
        real = self.key_valid[:, :self.prompt.size(1)] if self.ragged else torch.ones_like(self.prompt, dtype=torch.bool)
        counts = torch.zeros(self.prompt.size(0), vocab_size, dtype=torch.long, device=self.prompt.device)
        return counts.scatter_add_(1, self.prompt, real.long()) > 0


# ----------------------------------------------------------------------------- sampling / greedy


# on_step(rows, tokens, logits) -> rows to end now, or None: rows (L,) the output rows still generating,
# tokens (L,) the token each just drew, logits (L, V) the raw fp32 logits it drew from (before penalties
# and temperature). An ended row keeps this step's token.
StepHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "Sequence[int] | None"]


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, batch_size: int = 0,
             on_step: StepHook | None = None) -> list[list[int]]:
    """New tokens for each prompt: len(prompts) * num_return_sequences lists, prompt-major.

    Each list ends at its first stop token (included), after max_new_tokens, or where `on_step`
    ended it. num_beams > 1: the n-best beams of `beam_search` (no on_step). Call model.eval()
    first, or dropout perturbs the logits. batch_size > 0 decodes at most that many prompts at a
    time (the KV cache grows with the batch); the batches draw in turn from one generator seeded
    by cfg.seed; on_step's rows are then numbered within each batch.
    """
    if cfg.num_beams > 1:
        if on_step is not None:
            raise ValueError("on_step is for greedy and sampled decoding, not beam search")
        return [h.tokens for hyps in beam_search(model, prompts, cfg) for h in hyps]
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    size = batch_size or max(1, len(prompts))
    return [g for b in range(0, len(prompts), size) for g in _sample(model, prompts[b:b + size], cfg, gen, on_step)]


def _sample(model, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, gen: torch.Generator | None,
            on_step: StepHook | None = None) -> list[list[int]]:
    """Greedy or sampled continuations of one batch of prompts (see `generate`)."""
    batch = _Batch(model, prompts, cfg.max_new_tokens, cfg.pad_token_id)
    device = batch.prompt.device
    stops = torch.tensor(cfg.stop_tokens, dtype=torch.long, device=device)
    N = len(prompts) * cfg.num_return_sequences
    out = torch.full((N, cfg.max_new_tokens), cfg.pad_token_id, dtype=torch.long, device=device)
    lengths = torch.full((N,), cfg.max_new_tokens, dtype=torch.long, device=device)
    live = torch.arange(N, device=device)      # the output row of each batch row still generating

    logits = batch.prefill(cfg.num_return_sequences)
    seen = batch.seen(logits.size(-1)) if cfg.repetition_penalty != 1.0 else None
    penalised = cfg.frequency_penalty != 0 or cfg.presence_penalty != 0
    counts = torch.zeros(N, logits.size(-1), dtype=logits.dtype, device=device) if penalised else None
    for t in range(cfg.max_new_tokens):
        raw = logits
        logits = process_logits(logits, seen, cfg, counts)
        nxt = logits.argmax(dim=-1) if cfg.temperature == 0 else sample_rows(logits.softmax(dim=-1), gen)
        out[live, t] = nxt
        ended = list(on_step(live, nxt, raw) or ()) if on_step is not None else []
        if t + 1 == cfg.max_new_tokens:
            break
        if len(cfg.stop_tokens) or ended:
            going = ~torch.isin(nxt, stops) if len(cfg.stop_tokens) else torch.ones_like(nxt, dtype=torch.bool)
            if ended:
                going &= ~torch.isin(live, torch.as_tensor(list(ended), dtype=torch.long, device=device))
            if not bool(going.all()):
                # a row that stopped leaves the batch (and its cache): replies end at different
                # lengths, and the batch then shrinks instead of decoding pads to max_new_tokens
                lengths[live[~going]] = t + 1
                if not bool(going.any()):
                    break
                rows = going.nonzero().squeeze(1)
                batch.reorder(rows)
                live, nxt = live[rows], nxt[rows]
                seen = seen[rows] if seen is not None else None
                counts = counts[rows] if counts is not None else None
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        if counts is not None:
            counts[torch.arange(len(nxt), device=device), nxt] += 1
        logits = batch.forward(nxt[:, None])
    return [out[i, :n].tolist() for i, n in enumerate(lengths.tolist())]


# ----------------------------------------------------------------------------- a prompt cache kept between calls


@dataclass
class PromptCache:
    """One prompt's KV cache (batch 1) kept between calls: Smart Compose keeps the previous keystroke's.

    tokens: the prompt it holds; cache: its keys and values (room for cache.max_len positions);
    logits: (1, V) fp32 next-token logits after the prompt.
    """
    tokens: list[int]
    cache: KVCache
    logits: torch.Tensor


@torch.no_grad()
def extend_prompt_cache(model, prompt: Sequence[int], prev: PromptCache | None, capacity: int
                        ) -> tuple[PromptCache, int]:
    """A PromptCache for `prompt` that reuses `prev` for the longest token prefix they share: only
    the tokens after it run through the model (a typed character usually changes the last token or
    adds one; a backspace drops some). Returns (cache, tokens computed). `prev` is spent: its
    KVCache is truncated and extended in place. capacity: positions to allocate for a fresh cache
    (prompt + new tokens to come); a prev with less room than the prompt is not reused.
    """
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("the prompt needs at least one token")
    common = 0
    if prev is not None and prev.cache.max_len >= len(prompt):
        while common < min(len(prompt), len(prev.tokens)) and prompt[common] == prev.tokens[common]:
            common += 1
        if common == len(prompt) == len(prev.tokens):
            return prev, 0
        common = min(common, len(prompt) - 1)  # the last token runs again: its logits are the output
    if common == 0:
        cache = KVCache(model.config.n_layer, max(capacity, len(prompt)))
    else:
        cache = prev.cache
        cache.length = common                  # slots past it are overwritten before they are read
    device = next(model.parameters()).device
    h = model.hidden(torch.as_tensor([prompt[common:]], dtype=torch.long, device=device), cache)
    return PromptCache(prompt, cache, model.lm_head(h[:, -1]).float()), len(prompt) - common


# ----------------------------------------------------------------------------- beam search


@torch.no_grad()
def beam_search(model, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
                prompt_cache: PromptCache | None = None) -> list[list[Hypothesis]]:
    """The num_return_sequences best finished hypotheses for each prompt, best first.

    prompt_cache: the one prompt's keys, values and next-token logits (`extend_prompt_cache`), so
    the search starts without a prompt pass; it gives the beams the uncached search gives.

    Per step, every live beam proposes its continuations; of the K = max(2, 1 + #stop tokens) *
    num_beams best by summed log-probability, those ending in a stop token (or at max_new_tokens)
    among the top num_beams become finished hypotheses, scored sum log p / length ** length_penalty
    (length counts the new tokens, the stop token included); the best num_beams unfinished ones
    stay live. Stopping (transformers' rules): early_stopping=True ends a prompt once num_beams
    hypotheses are finished; False once the best live beam, scored at its current length, cannot
    beat the worst finished one; "never" scores it at max_new_tokens when length_penalty > 0
    (with length_penalty=0 that is exact beam search). The repetition penalty applies to the
    log-probabilities; temperature, top-k and top-p do not apply.
    """
    nb, n_new = cfg.num_beams, cfg.max_new_tokens
    B = len(prompts)
    batch = _Batch(model, prompts, n_new, cfg.pad_token_id, prompt_cache)
    device = batch.prompt.device
    stops = torch.tensor(cfg.stop_tokens, dtype=torch.long, device=device)
    K = max(2, 1 + len(cfg.stop_tokens)) * nb
    lp, early = cfg.length_penalty, cfg.early_stopping
    top_nb = torch.arange(K, device=device) < nb                    # only these may finish

    live_tokens = torch.full((B, nb, n_new), cfg.pad_token_id, dtype=torch.long, device=device)
    live_scores = torch.zeros(B, nb, device=device)
    live_scores[:, 1:] = -1e9                                       # step 1 expands beam 0 only
    fin_tokens = live_tokens.clone()
    fin_scores = torch.full((B, nb), -1e9, device=device)
    fin_len = torch.zeros(B, nb, dtype=torch.long, device=device)
    fin_done = torch.zeros(B, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)

    logits = batch.prefill(nb)                                      # (B * nb, V)
    V = logits.size(-1)
    seen = batch.seen(V) if cfg.repetition_penalty != 1.0 else None
    row_offset = torch.arange(B, device=device)[:, None] * nb
    for t in range(n_new):
        logp = F.log_softmax(logits, dim=-1)
        if seen is not None:
            logp = apply_repetition_penalty(logp, seen, cfg.repetition_penalty)
        cand = (logp.view(B, nb, V) + live_scores[:, :, None]).view(B, nb * V)
        top_scores, top_idx = torch.topk(cand, K)                   # (B, K), best first
        parent, token = top_idx // V, top_idx % V
        last = t + 1 == n_new
        hits = torch.ones_like(token, dtype=torch.bool) if last else torch.isin(token, stops)  # (B, K)

        # live beams: the best nb candidates that did not finish
        running = top_scores + hits.float() * -1e9
        keep = torch.topk(running, nb).indices

        # finished hypotheses: merge the new ones (top nb candidates only) into the best nb so far.
        # Skipped when none finished this step: the merge would then keep fin_* as they are.
        just_done = hits & top_nb
        if last or bool(just_done.any()):
            cand_tokens = live_tokens.gather(1, parent[:, :, None].expand(-1, -1, n_new))
            cand_tokens[:, :, t] = token
            new_scores = top_scores / ((t + 1) ** lp)
            new_scores = new_scores + (fin_done.all(dim=-1, keepdim=True) & (early is True)).float() * -1e9
            new_scores = new_scores + (~improvable).float() * -1e9
            new_scores = new_scores + (~just_done).float() * -1e9
            merged_scores = torch.cat((fin_scores, new_scores), dim=1)
            best = torch.topk(merged_scores, nb).indices
            fin_scores = merged_scores.gather(1, best)
            fin_tokens = torch.cat((fin_tokens, cand_tokens), dim=1).gather(1, best[:, :, None].expand(-1, -1, n_new))
            fin_len = torch.cat((fin_len, torch.full_like(token, t + 1)), dim=1).gather(1, best)
            fin_done = torch.cat((fin_done, just_done), dim=1).gather(1, best)
        if last:
            break

        live_parent = parent.gather(1, keep)
        live_scores = running.gather(1, keep)
        live_tokens = live_tokens.gather(1, live_parent[:, :, None].expand(-1, -1, n_new))
        nxt = token.gather(1, keep)                                 # (B, nb)
        live_tokens[:, :, t] = nxt

        # stop when no live beam can improve any prompt's finished set; only a prompt whose nb
        # finished slots are all filled can stop (an empty slot's worst score is -1e9)
        full = fin_done.all(dim=-1, keepdim=True)
        if bool(full.any()):
            best_len = n_new if (early == "never" and lp > 0) else t + 1
            best_possible = live_scores[:, :1] / (best_len ** lp)
            worst = torch.where(fin_done, fin_scores.min(dim=-1, keepdim=True).values, -1e9)
            improvable = improvable & (best_possible > worst).any(dim=-1, keepdim=True)
            if not bool(improvable.any()) or (early is True and bool(full.all())):
                break
        if bool(hits.all()):  # every candidate finished (a vocabulary of stop tokens): nothing to extend
            break
        rows = (live_parent + row_offset).flatten()
        batch.reorder(rows)
        nxt = nxt.flatten()
        if seen is not None:
            seen = seen[rows].scatter_(1, nxt[:, None], True)
        logits = batch.forward(nxt[:, None])

    n = cfg.num_return_sequences
    return [[Hypothesis(fin_tokens[b, j, :int(fin_len[b, j])].tolist(), float(fin_scores[b, j]))
             for j in range(n)] for b in range(B)]
