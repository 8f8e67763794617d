"""nanoGPT's model, the baseline `bench.bench_gpt` races `models.gpt.GPT` against.

Source: Andrej Karpathy's nanoGPT, `model.py` (https://github.com/karpathy/nanoGPT/blob/master/model.py,
MIT licence), re-expressed here op for op in our own code so the benchmark compares against the
real thing and not a strawman:

- LayerNorm with an optional bias, eps 1e-5 (`F.layer_norm`);
- CausalSelfAttention: one fused `c_attn` Linear(C, 3C) split into q, k, v of n_embd each, heads
  moved to dim 1, `F.scaled_dot_product_attention(is_causal=True)` with attention dropout in
  training, heads re-joined with `transpose(1, 2).contiguous().view`, `c_proj`, residual dropout;
- MLP: `c_fc` Linear(C, 4C) -> `nn.GELU()` (exact erf GELU) -> `c_proj` -> dropout;
- Block: pre-norm, x + attn(ln_1(x)), then x + mlp(ln_2(x));
- GPT: `transformer.{wte, wpe, drop, h, ln_f}` and `lm_head` with the token embedding tied to it,
  weights N(0, 0.02), biases zero, every `c_proj.weight` N(0, 0.02 / sqrt(2 n_layer));
  forward adds learned positions, runs the blocks and the final norm, then with targets computes the
  full (B, T, V) logits and `F.cross_entropy(..., ignore_index=-1)`; without targets only the last
  position's logits;
- configure_optimizers: weight decay for parameters with dim >= 2 only, AdamW fused only when
  `device_type == "cuda"` (so on CPU it is PyTorch's default AdamW, the multi-tensor `foreach` path).

Deliberate differences: none in what is computed. Left out because a training-throughput benchmark
never calls them: the non-flash fallback for PyTorch < 2.0, `crop_block_size`, `from_pretrained`,
`estimate_mfu`, `generate`, and the parameter-count prints. `load_forgeline_weights` (below the
model, not part of nanoGPT) copies a `models.gpt.GPT`'s weights in, so the two models can be checked
for equal outputs (tests/test_gpt.py) and timed on identical work.

Note that our GPT's `mlp="gelu"` is GPT-2's tanh approximation while nanoGPT uses the exact GELU;
the benchmark keeps each model's own choice, and the equality test swaps the reference's activation.

    .venv/bin/python -m bench.bench_gpt
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class NanoGPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    """nn.LayerNorm could not drop its bias when nanoGPT was written, hence its own module."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: NanoGPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)  # used only by nanoGPT's pre-2.0 fallback
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x):
        B, T, C = x.size()
        head = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, head).transpose(1, 2)          # (B, H, T, D)
        k = k.view(B, T, self.n_head, head).transpose(1, 2)
        v = v.view(B, T, self.n_head, head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: NanoGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: NanoGPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, config: NanoGPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied: the LM head is the embedding
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        b, t = idx.size()
        assert t <= self.config.block_size, f"sequence of {t} tokens, block_size is {self.config.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # inference: the last position only
            loss = None
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        use_fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **(dict(fused=True) if use_fused else {}))


# ----------------------------------------------------------------------------- not nanoGPT: benchmark glue


def nanogpt_config(cfg) -> NanoGPTConfig:
    """The NanoGPTConfig for a models.gpt.GPTConfig; raises if ours is not nanoGPT's architecture."""
    want = {"pos_encoding": "learned", "norm": "layernorm", "mlp": "gelu", "tie_weights": True}
    wrong = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if wrong or cfg.kv_heads != cfg.n_head:
        raise ValueError(f"not nanoGPT's architecture: {wrong or {'n_kv_heads': cfg.n_kv_heads}}; it needs {want}")
    return NanoGPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)


@torch.no_grad()
def load_forgeline_weights(ref: NanoGPT, gpt) -> NanoGPT:
    """Copy a models.gpt.GPT's weights into `ref`: the same tensors under nanoGPT's names."""
    renamed = {}
    for name, tensor in gpt.state_dict().items():
        if name.startswith(("wte.", "wpe.", "ln_f.")):
            name = "transformer." + name
        elif name.startswith("blocks."):
            name = "transformer.h." + name[len("blocks."):]
        renamed[name] = tensor
    ref.load_state_dict(renamed, strict=True)
    return ref
