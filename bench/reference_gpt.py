"""Textbook GPT: the baseline `bench.bench_gpt` races `models.gpt.GPT` against.

Same architecture, parameter count and maths as models/gpt.py for every GPTConfig option, written
the plain way: separate q, k, v Linear layers, attention spelled out as softmax(q k^T / sqrt(D)
masked) v, nn.LayerNorm or RMSNorm by hand, RoPE and sine-cosine tables built each forward,
grouped-query k/v heads copied out with repeat_interleave, loss by F.cross_entropy on the full
logits. No SDPA, no fused projection, no chunked loss, no KV cache (training only).
`copy_weights_from(gpt)` loads a GPT's weights, so the two can be checked for equal outputs
(tests/test_gpt.py) and timed on identical work.

    .venv/bin/python -m bench.bench_gpt
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.gpt import GPT, GPTConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


def norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def rotate(x, pos, theta):
    """RoPE on x (B, heads, T, D): feature j pairs with j + D/2 (GPT-NeoX layout) and turns by
    pos * theta^(-2j/D). models/gpt.py pairs (2j, 2j+1) instead; copy_weights_from permutes the
    q and k rows to match, which leaves q . k, and so the model, unchanged."""
    D = x.size(-1)
    freqs = 1.0 / theta ** (torch.arange(0, D // 2, dtype=torch.float32) * 2 / D)
    angles = pos[:, None].float() * freqs[None, :]                 # (T, D/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    first, second = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        D = config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * D, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, config.kv_heads * D, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, config.kv_heads * D, bias=config.bias)
        self.out_proj = nn.Linear(config.n_head * D, config.n_embd, bias=config.bias)
        self.attn_drop = nn.Dropout(config.dropout)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x):
        cfg = self.config
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.pos_encoding == "rope":
            pos = torch.arange(T)
            q, k = rotate(q, pos, cfg.rope_theta), rotate(k, pos, cfg.rope_theta)
        group = cfg.n_head // cfg.kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(cfg.head_dim)   # (B, H, T, T)
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = self.attn_drop(F.softmax(scores, dim=-1))
        y = (weights @ v).transpose(1, 2).contiguous().view(B, T, cfg.n_head * cfg.head_dim)
        return self.resid_drop(self.out_proj(y))


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = config.mlp_hidden
        self.fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        if self.kind == "swiglu":
            self.up = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.kind == "swiglu":
            h = F.silu(self.fc(x)) * self.up(x)
        elif self.kind == "gelu":
            h = F.gelu(self.fc(x), approximate="tanh")
        else:
            h = F.relu(self.fc(x))
        return self.drop(self.proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = norm(config), Attention(config)
        self.ln_2, self.mlp = norm(config), FeedForward(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ReferenceGPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_encoding == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx, targets=None):
        cfg = self.config
        B, T = idx.shape
        x = self.wte(idx)
        if cfg.pos_encoding == "learned":
            x = x + self.wpe(torch.arange(T))
        elif cfg.pos_encoding == "sincos":
            pe = torch.zeros(T, cfg.n_embd)
            pos = torch.arange(T, dtype=torch.float32)[:, None]
            div = torch.exp(torch.arange(0, cfg.n_embd, 2, dtype=torch.float32) * (-math.log(10000.0) / cfg.n_embd))
            pe[:, 0::2] = torch.sin(pos * div)
            pe[:, 1::2] = torch.cos(pos * div)
            x = x * math.sqrt(cfg.n_embd) + pe
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.view(B * T), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def copy_weights_from(self, gpt: GPT):
        """Load a models.gpt.GPT's weights: its fused q/k/v matrix split by rows and, for RoPE,
        each head's q/k features reordered from pairs (2j, 2j+1) to pairs (j, j + D/2)."""
        cfg = self.config
        D = cfg.head_dim
        q_rows, kv_rows = cfg.n_head * D, cfg.kv_heads * D
        order = torch.arange(D)
        if cfg.pos_encoding == "rope":
            order = torch.cat([order[0::2], order[1::2]])

        def per_head(rows, heads):  # reorder features within each head
            return rows.unflatten(0, (heads, D))[:, order].flatten(0, 1)

        self.wte.weight.copy_(gpt.wte.weight)
        if cfg.pos_encoding == "learned":
            self.wpe.weight.copy_(gpt.wpe.weight)
        if not cfg.tie_weights:
            self.lm_head.weight.copy_(gpt.lm_head.weight)
        self.ln_f.load_state_dict(gpt.ln_f.state_dict())
        for mine, theirs in zip(self.blocks, gpt.blocks):
            mine.ln_1.load_state_dict(theirs.ln_1.state_dict())
            mine.ln_2.load_state_dict(theirs.ln_2.state_dict())
            for name in ("weight", "bias"):
                fused = getattr(theirs.attn.c_attn, name)
                if fused is None:
                    continue
                q, k, v = fused.split([q_rows, kv_rows, kv_rows])
                getattr(mine.attn.q_proj, name).copy_(per_head(q, cfg.n_head))
                getattr(mine.attn.k_proj, name).copy_(per_head(k, cfg.kv_heads))
                getattr(mine.attn.v_proj, name).copy_(v)
                getattr(mine.attn.out_proj, name).copy_(getattr(theirs.attn.c_proj, name))
                getattr(mine.mlp.fc, name).copy_(getattr(theirs.mlp.c_fc, name))
                if cfg.mlp == "swiglu":
                    getattr(mine.mlp.up, name).copy_(getattr(theirs.mlp.c_up, name))
                getattr(mine.mlp.proj, name).copy_(getattr(theirs.mlp.c_proj, name))
