"""An encoder-decoder transformer for translation, with greedy and beam-search decoding.

Vaswani et al. 2017, "Attention Is All You Need" (the architecture, sine-cosine positions); pre-norm
blocks as in Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"; beam
search with the GNMT length penalty, Wu et al. 2016, lp(Y) = ((5 + |Y|) / 6)^alpha.

Reads bottom-up: attention -> feed-forward -> encoder block -> decoder block -> config -> model ->
decoding. The decoder keeps a KV cache: each self-attention layer appends one step's keys and
values, and each cross-attention layer's keys and values of the encoder output are computed once
per source (`Seq2Seq.cross_kv`). `use_cache=False` recomputes the whole decoder over the prefix at
every step instead (the reference the cache is checked and benchmarked against).

Token ids: the shared BPE's ids, then BOS, MASK and one target-language token per language
(`Seq2SeqConfig.for_tokenizer`). Encoder input = [<2xx>] + source + [EOS]; decoder input = [BOS] +
target, decoder output = target + [EOS]; PAD fills batches and is never attended to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Multi-head attention; queries from x, keys and values from x or given (cross-attention)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.dropout = dropout

    def heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, Dh)
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_head).transpose(1, 2)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(x).chunk(2, dim=-1)
        return self.heads(k), self.heads(v)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D); k, v (B, H, S, Dh); mask bool, broadcastable to (B, H, T, S), True = may attend."""
        y = F.scaled_dot_product_attention(self.heads(self.q(x)), k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        B, _, T, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.up, self.down, self.drop = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.gelu(self.up(x))))


class EncoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d_model), Attention(d_model, n_heads, dropout)
        self.norm2, self.ff = nn.LayerNorm(d_model), FeedForward(d_model, d_ff, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, *self.attn.project_kv(h), mask)
        return x + self.ff(self.norm2(x))


class DecoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(d_model), Attention(d_model, n_heads, dropout)
        self.norm2, self.cross_attn = nn.LayerNorm(d_model), Attention(d_model, n_heads, dropout)
        self.norm3, self.ff = nn.LayerNorm(d_model), FeedForward(d_model, d_ff, dropout)

    def forward(self, x: torch.Tensor, cross: tuple[torch.Tensor, torch.Tensor], mem_mask: torch.Tensor,
                self_mask: torch.Tensor | None, cache: list | None = None) -> torch.Tensor:
        """cache: None (whole prefix given, causal mask), or [k, v] of the steps so far, extended here."""
        h = self.norm1(x)
        k, v = self.self_attn.project_kv(h)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        x = x + self.self_attn(h, k, v, self_mask)
        x = x + self.cross_attn(self.norm2(x), *cross, mem_mask)
        return x + self.ff(self.norm3(x))


@dataclass
class Seq2SeqConfig:
    vocab_size: int                  # BPE vocabulary + BOS, MASK and the language tokens
    bos_id: int
    mask_id: int
    lang_ids: dict[str, int] = field(default_factory=dict)  # target language -> its token
    pad_id: int = 0                  # <|pad|> of the shared tokenizer
    eos_id: int = 1                  # <|endoftext|>
    d_model: int = 128
    n_heads: int = 4
    n_enc_layers: int = 3
    n_dec_layers: int = 3
    d_ff: int = 512
    max_len: int = 128               # longest sequence on either side, tokens (sine-cosine: a soft limit)
    dropout: float = 0.1

    @classmethod
    def for_tokenizer(cls, tok_vocab: int, languages: list[str], **dims) -> "Seq2SeqConfig":
        """Special ids after the tokenizer's: BOS, MASK, then <2xx> per language in the given order."""
        return cls(vocab_size=tok_vocab + 2 + len(languages), bos_id=tok_vocab, mask_id=tok_vocab + 1,
                   lang_ids={lang: tok_vocab + 2 + i for i, lang in enumerate(languages)}, **dims)


def sincos(n: int, d: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(n, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * inv), torch.cos(pos * inv)
    return pe


class Seq2Seq(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_id)
        self.register_buffer("pos", sincos(4 * c.max_len, c.d_model), persistent=False)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(EncoderBlock(c.d_model, c.n_heads, c.d_ff, c.dropout) for _ in range(c.n_enc_layers))
        self.decoder = nn.ModuleList(DecoderBlock(c.d_model, c.n_heads, c.d_ff, c.dropout) for _ in range(c.n_dec_layers))
        self.enc_norm, self.dec_norm = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied (Press & Wolf 2017)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _embed(self, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return self.drop(self.embed(ids) * math.sqrt(self.config.d_model) + self.pos[offset:offset + ids.size(1)])

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) -> memory (B, S, D) and its key mask (B, 1, 1, S), True on real tokens."""
        mask = (src != self.config.pad_id)[:, None, None, :]
        x = self._embed(src)
        for block in self.encoder:
            x = block(x, mask)
        return self.enc_norm(x), mask

    def cross_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention keys and values of the encoder output: once per source."""
        return [block.cross_attn.project_kv(memory) for block in self.decoder]

    def decode(self, tgt: torch.Tensor, cross: list, mem_mask: torch.Tensor, cache: list | None = None,
               offset: int = 0) -> torch.Tensor:
        """Decoder logits (B, T, V) for tgt (B, T) at positions offset.. ; with `cache` (a list of per-layer
        [k, v], empty at the first step) the steps before are read from it and this step's added."""
        T = tgt.size(1)
        if cache is None:  # whole prefix: causal, and pads never attended to as keys
            causal = torch.ones(T, T, dtype=torch.bool, device=tgt.device).tril()
            self_mask = causal[None, None] & (tgt != self.config.pad_id)[:, None, None, :] | torch.eye(
                T, dtype=torch.bool, device=tgt.device)
        else:  # one new step attends to every cached step and itself
            self_mask = None
        x = self._embed(tgt, offset)
        for i, block in enumerate(self.decoder):
            x = block(x, cross[i], mem_mask, self_mask, None if cache is None else cache[i])
        return self.head(self.dec_norm(x))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor,
                tgt_out: torch.Tensor | None = None, label_smoothing: float = 0.0):
        """Teacher forcing: logits (B, T, V) and, given tgt_out, the mean cross-entropy over non-pad targets."""
        memory, mem_mask = self.encode(src)
        logits = self.decode(tgt_in, self.cross_kv(memory), mem_mask)
        if tgt_out is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=self.config.pad_id,
                               label_smoothing=label_smoothing)
        return logits, loss

    def configure_optimizers(self, weight_decay: float, lr: float, betas: tuple[float, float]):
        decay = [p for p in self.parameters() if p.dim() >= 2]
        rest = [p for p in self.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                  {"params": rest, "weight_decay": 0.0}], lr=lr, betas=betas)


# ----------------------------------------------------------------------------- inputs


def encoder_input(ids: list[int], target_lang: str, config: Seq2SeqConfig) -> list[int]:
    """[<2xx>] + ids + [EOS], the source cut to fit max_len."""
    return [config.lang_ids[target_lang], *ids[:config.max_len - 2], config.eos_id]


def pad_batch(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


# ----------------------------------------------------------------------------- decoding


class _Stepper:
    """One decoding step at a time for a batch of rows, with or without the KV cache."""

    def __init__(self, model: Seq2Seq, memory: torch.Tensor, mem_mask: torch.Tensor, use_cache: bool):
        self.model, self.mem_mask, self.use_cache = model, mem_mask, use_cache
        self.memory = memory
        self.cross = model.cross_kv(memory) if use_cache else None
        self.cache = [[] for _ in model.decoder] if use_cache else None
        c = model.config  # never generated: PAD (a no-cache decoder would mask it as a key), BOS, MASK, <2xx>
        self.banned = torch.tensor([c.pad_id, c.bos_id, c.mask_id, *c.lang_ids.values()], device=memory.device)

    def logits(self, prefix: torch.Tensor) -> torch.Tensor:
        """Next-token logits (R, V) after prefix (R, t)."""
        if self.use_cache:
            t = prefix.size(1) - 1
            logits = self.model.decode(prefix[:, -1:], self.cross, self.mem_mask, self.cache, offset=t)[:, -1]
        else:  # no cache: the whole decoder over the whole prefix, cross K/V included, every step
            logits = self.model.decode(prefix, self.model.cross_kv(self.memory), self.mem_mask)[:, -1]
        return logits.index_fill(-1, self.banned, float("-inf"))

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (beam search: the beams that survive, in their new order)."""
        self.memory, self.mem_mask = self.memory[rows], self.mem_mask[rows]
        if self.use_cache:
            self.cross = [(k[rows], v[rows]) for k, v in self.cross]
            for layer in self.cache:
                layer[:] = [t[rows] for t in layer]


@torch.no_grad()
def greedy(model: Seq2Seq, src: torch.Tensor, max_new: int, use_cache: bool = True) -> tuple[list[list[int]], list[float]]:
    """Greedy decoding of each source row: target ids (EOS excluded) and the mean log-prob per
    generated token (EOS included): the length-normalised log-probability."""
    c = model.config
    memory, mem_mask = model.encode(src)
    step = _Stepper(model, memory, mem_mask, use_cache)
    B = src.size(0)
    prefix = torch.full((B, 1), c.bos_id, dtype=torch.long, device=src.device)
    logp_sum = torch.zeros(B, device=src.device)
    length = torch.zeros(B, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    for _ in range(max_new):
        logp = F.log_softmax(step.logits(prefix).float(), dim=-1)
        best, tok = logp.max(dim=-1)
        tok = torch.where(done, torch.full_like(tok, c.pad_id), tok)
        logp_sum += torch.where(done, torch.zeros_like(best), best)
        length += (~done).long()
        done |= tok == c.eos_id
        prefix = torch.cat([prefix, tok[:, None]], dim=1)
        if done.all():
            break
    out = [row[:row.index(c.eos_id)] if c.eos_id in row else row for row in prefix[:, 1:].tolist()]
    return out, (logp_sum / length.clamp(min=1)).tolist()


@torch.no_grad()
def beam_search(model: Seq2Seq, src: torch.Tensor, max_new: int, width: int = 4, length_penalty: float = 0.6,
                use_cache: bool = True) -> tuple[list[list[int]], list[float]]:
    """Beam search per source row: the hypothesis of best log P / lp(|Y|), lp = ((5 + |Y|) / 6)^alpha
    (|Y| counts EOS), and its mean log-prob per token. A source is done once `width` hypotheses
    ended; unfinished beams are candidates only when none ended within max_new. width=1 is greedy."""
    c = model.config
    B, W = src.size(0), width
    memory, mem_mask = model.encode(src)
    rows = torch.arange(B, device=src.device).repeat_interleave(W)
    step = _Stepper(model, memory[rows], mem_mask[rows], use_cache)
    prefix = torch.full((B * W, 1), c.bos_id, dtype=torch.long, device=src.device)
    scores = torch.full((B, W), float("-inf"), device=src.device)
    scores[:, 0] = 0.0  # the first step expands one beam, not W copies of it
    finished: list[list[tuple[float, list[int], float]]] = [[] for _ in range(B)]

    def lp(n: int) -> float:
        return ((5 + n) / 6) ** length_penalty

    for t in range(1, max_new + 1):
        logp = F.log_softmax(step.logits(prefix).float(), dim=-1)  # (B*W, V)
        V = logp.size(-1)
        cand = (scores.view(-1, 1) + logp).view(B, W * V)
        top_scores, top_idx = cand.topk(min(2 * W, W * V), dim=-1)
        keep_rows, keep_toks, new_scores = [], [], torch.full((B, W), float("-inf"), device=src.device)
        for b in range(B):
            chosen = 0
            for s, idx in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                beam, tok = divmod(idx, V)
                if s == float("-inf"):
                    break
                if len(finished[b]) >= W:  # done: keep its rows busy with a dead beam
                    break
                if tok == c.eos_id:
                    finished[b].append((s / lp(t), prefix[b * W + beam, 1:].tolist(), s / t))
                    continue
                if chosen < W:
                    keep_rows.append(b * W + beam)
                    keep_toks.append(tok)
                    new_scores[b, chosen] = s
                    chosen += 1
            for _ in range(chosen, W):  # pad the beam set with dead rows
                keep_rows.append(b * W)
                keep_toks.append(c.pad_id)
        if all(len(f) >= W for f in finished):
            break
        index = torch.tensor(keep_rows, device=src.device)
        step.reorder(index)
        prefix = torch.cat([prefix[index], torch.tensor(keep_toks, device=src.device)[:, None]], dim=1)
        scores = new_scores
    out, conf = [], []
    for b in range(B):
        hyps = finished[b] or [(scores[b, j].item() / lp(max_new), prefix[b * W + j, 1:].tolist(),
                                scores[b, j].item() / max_new) for j in range(W) if scores[b, j] > float("-inf")]
        _, ids, mean_logp = max(hyps, key=lambda h: h[0])
        out.append(ids)
        conf.append(mean_logp)
    return out, conf


@torch.no_grad()
def translate(model: Seq2Seq, tok, sentences: list[str], target_lang: str, beam: int = 1,
              length_penalty: float = 0.6, batch_size: int = 32, max_new: int | None = None,
              use_cache: bool = True) -> tuple[list[str], list[float]]:
    """Each sentence translated (`tok`: the shared `tokenizers.Tokenizer`), with its mean log-prob per
    token. Sentences are batched in length order (little padding) and returned in input order;
    beam=1 is greedy decoding."""
    c = model.config
    max_new = max_new or c.max_len
    encoded = [encoder_input(e.ids, target_lang, c) for e in tok.encode_batch_fast(sentences, add_special_tokens=False)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    texts, confidence = [""] * len(encoded), [0.0] * len(encoded)
    device = next(model.parameters()).device
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        src = pad_batch([encoded[i] for i in idx], c.pad_id).to(device)
        steps = min(max_new, 2 * src.size(1) + 8)  # French/Spanish run ~1.2x English: 2x + 8 ends any real output
        ids, conf = (greedy(model, src, steps, use_cache) if beam == 1 else
                     beam_search(model, src, steps, beam, length_penalty, use_cache))
        for i, row, p in zip(idx, ids, conf):
            texts[i], confidence[i] = tok.decode(row, skip_special_tokens=True), p
    return texts, confidence
