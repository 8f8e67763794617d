"""A decoder-only GPT in pure PyTorch: the model that Forgeline's LLM stages pretrain, fine-tune and sample.

Reads bottom-up, like nanoGPT's model.py: norms -> positional encodings -> KV cache -> attention
-> MLP -> block -> loss -> config -> model. The papers behind each piece:

- Vaswani et al. 2017, "Attention Is All You Need" (arXiv:1706.03762): scaled dot-product
  attention, multi-head attention, fixed sine-cosine position encodings (`pos_encoding="sincos"`).
- Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2): pre-norm
  decoder blocks, learned absolute positions (`"learned"`), residual projections initialised with
  std 0.02/sqrt(2*n_layer), GELU MLP; with Press & Wolf 2017 (arXiv:1608.05859) for tying the
  output projection to the token embedding.
- Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding"
  (arXiv:2104.09864): rotary position embeddings on q and k (`"rope"`, the default).
- Parmar et al. 2018, "Image Transformer" (arXiv:1802.05751) and Ramesh et al. 2021, "Zero-Shot
  Text-to-Image Generation" (DALL-E, arXiv:2102.12092): row + column embeddings for a grid of image
  tokens in raster order after a prefix (`pos_2d`, off by default; added on top of the 1D positions).
- Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
  Checkpoints" (arXiv:2305.13245): `n_kv_heads < n_head` shares each k/v head between a group of
  query heads.
- Zhang & Sennrich 2019, "Root Mean Square Layer Normalization" (arXiv:1910.07467): `norm="rmsnorm"`.
- Shazeer 2020, "GLU Variants Improve Transformer" (arXiv:2002.05202): `mlp="swiglu"`.
- Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models" (arXiv:2411.09009):
  the training loss never materialises all logits (here simply chunk by chunk, in PyTorch).

Shapes in comments: B batch, T new tokens, S = cached + new tokens, C n_embd, H query heads,
Hkv key/value heads, D head_dim = C // H, V vocab_size.

    model = GPT(GPTConfig.from_preset("tiny", vocab_size=4096))
    _, loss = model(idx, targets)                    # training: idx, targets (B, T); no logits
    logits, _ = model(idx)                           # (B, T, V)
    out = model.generate(prompt, max_new_tokens=64)  # sampling, with a KV cache
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, get_args, get_origin, get_type_hints

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------- norms


def make_norm(kind: str, dim: int, bias: bool) -> nn.Module:
    """The pre-norm in front of each sublayer and before the LM head.

    RMSNorm only rescales (no mean subtraction, no bias); LayerNorm is GPT-2's, bias optional.
    """
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-5)
    return nn.LayerNorm(dim, eps=1e-5, bias=bias)


# ----------------------------------------------------------------------------- positional encodings


def sincos_table(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sine-cosine encodings (Vaswani et al. §3.5) for any positions: (T,) -> (T, dim), fp32.

    Even features are sin(pos / 10000^(2i/dim)), odd features the matching cos. Computed on the fly
    so a model trained on block_size positions can be evaluated on longer contexts.
    """
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim)
    angles = torch.outer(pos.float(), inv_freq)                 # (T, dim/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def grid_positions(pos: torch.Tensor, start: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1D positions (any shape) -> (row, col, inside): a grid of h x w tokens in raster order begins
    at position `start`; row/col are clamped to the grid and `inside` (bool) marks positions on it."""
    k = pos - start
    inside = (k >= 0) & (k < h * w)
    k = k.clamp(0, h * w - 1)
    return torch.div(k, w, rounding_mode="floor"), k % w, inside


def rope_angles(pos: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """RoPE rotations e^(i pos theta^(-2j/D)) as unit complex numbers: (T, D/2), complex64.

    Computed per forward (not a buffer), so positions past block_size work and `model.to(bf16)`
    cannot round the angles.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angles = torch.outer(pos.float(), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate each feature pair (2j, 2j+1) of x (B, T, heads, D) by its position's angle;
    rot (T, D/2), or (B, T, D/2) when each row has its own positions (left-padded batches).

    Adjacent pairs as in the RoFormer paper (and Meta's Llama): read as complex numbers, the
    rotation is one complex multiply, which measured ~2x faster in forward + backward than
    rotating the two halves with slices and a cat. Computed in fp32, returned in x's dtype.
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, heads, D/2)
    return torch.view_as_real(xc * rot.unsqueeze(-2)).flatten(-2).type_as(x)


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to `max_len` positions.

    `k[i]`, `v[i]`: (B, Hkv, max_len, D), allocated at the first write so they take the batch size,
    dtype and device of the activations (bf16 under autocast). `length` counts the positions
    filled; each layer writes at `length`, and `GPT.forward` advances it once all layers have run.
    Preallocation keeps each decode step free of a growing torch.cat; writing past `max_len` raises.
    """

    def __init__(self, n_layer: int, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) after the cached positions; return all of them, (B, Hkv, S, D)."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to fill up to {end}")
        if self.k[layer] is None:
            B, Hkv, _, D = k.shape
            self.k[layer] = k.new_zeros(B, Hkv, self.max_len, D)
            self.v[layer] = v.new_zeros(B, Hkv, self.max_len, D)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# ----------------------------------------------------------------------------- dropout


def dropout_keep(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A dropout mask for `shape`: (keep (bool), 1 / keep probability).

    Four 16-bit uniform draws come out of each 64-bit word of torch's generator (so
    `torch.manual_seed` and the checkpointed RNG state govern it); an element is dropped when its
    draw falls below round(p * 2^16), i.e. p to within 2^-17 (0.2 -> 0.19999695), and the scale
    uses that exact probability, so the expectation is unchanged. torch's own dropout draws one
    number per element: on 2 CPU cores its bernoulli_ took ~3x as long as these draws plus the
    comparison, and dropout 0.2 cost a baby-GPT training step ~15 % of its time.
    """
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)  # full 64 bits
    dropped = round(p * 65536)
    keep = words.view(torch.int16)[:n].view(shape) >= dropped - 32768
    return keep, 65536 / (65536 - dropped)


class Dropout(nn.Module):
    """nn.Dropout with the mask from `dropout_keep`; identity in eval mode or at p = 0."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep, scale = dropout_keep(x.shape, self.p, x.device)
        return x * (keep * scale).to(x.dtype)


ATTN_QUERY_BLOCK = 128  # query rows per block in attention_with_dropout


def attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(D)) v with dropout p on the attention weights; q, k, v (B, H, T, D).

    What SDPA computes for is_causal=True, dropout_p=p, but SDPA's CPU kernels take no dropout and
    fall back to a path that builds the mask each call, scales q and k apart, guards against fully
    masked rows (three more passes over the (B, H, T, T) weights) and draws a float per weight.
    Here queries go in blocks of ATTN_QUERY_BLOCK rows, each against only the keys it can see (at
    T = 256 that skips a quarter of the scores: their GEMMs, softmax and dropout draws); the scale
    and the block's causal mask ride in the q k^T GEMM (baddbmm), the dropout mask is a bool from
    `dropout_keep`, and its 1/keep scale is applied to the (B, H, T, D) output.
    """
    B, H, T, D = q.shape
    q, k, v = (t.reshape(B * H, T, D) for t in (q, k, v))
    blocks, scale = [], 1.0
    for start in range(0, T, ATTN_QUERY_BLOCK):
        end = min(start + ATTN_QUERY_BLOCK, T)
        # query start + i sees keys 0 .. start + i
        bias = torch.full((end - start, end), float("-inf"), device=q.device, dtype=q.dtype).triu(start + 1)
        scores = torch.baddbmm(bias, q[:, start:end], k[:, :end].transpose(1, 2), alpha=1.0 / math.sqrt(D))
        weights = torch.softmax(scores, dim=-1)
        keep, scale = dropout_keep(weights.shape, p, q.device)
        blocks.append(torch.bmm(weights * keep, v[:, :end]))
    y = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
    return (y * scale).view(B, H, T, D)


# ----------------------------------------------------------------------------- attention


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with grouped-query k/v heads, via torch's fused SDPA."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        # one GEMM for q, k and v: H*D query features, then Hkv*D key and Hkv*D value features
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_heads) * self.head_dim,
                                bias=config.bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None, kv_cache: KVCache | None,
                layer: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask: an explicit boolean (B, 1, T, S) attention mask (True = may attend), for batches
        with padding; None = plain causal attention over the cache and the new tokens."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_heads, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)

        start = 0
        if kv_cache is not None:
            start = kv_cache.length
            k, v = kv_cache.update(layer, k, v)                              # (B, Hkv, S, D)
        if mask is None and start > 0 and T > 1:
            # new query i sits at position start + i and sees keys 0..start + i. SDPA's is_causal
            # aligns the triangle top-left, which is wrong once keys outnumber queries.
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        # start > 0, T == 1: the one new token sees every cached key, so no mask at all
        if self.training and self.dropout > 0 and mask is None and start == 0:
            if Hkv != H:  # each k/v head serves H // Hkv query heads
                k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
            y = attention_with_dropout(q, k, v, self.dropout)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and start == 0,
                dropout_p=self.dropout if self.training else 0.0, enable_gqa=Hkv != H)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.resid_dropout(self.c_proj(y))


# ----------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """Position-wise feed-forward: c_proj(act(c_fc(x))), or c_proj(silu(c_fc(x)) * c_up(x)) for SwiGLU.

    relu/gelu use a 4C hidden layer. SwiGLU has three matrices, so its hidden width is 8C/3
    (rounded up to a multiple of 64 for GEMM-friendly shapes), keeping params and FLOPs close to
    the 4C MLP (Shazeer 2020 §2). c_fc and c_up stay two Linears: one fused GEMM measured no
    faster on CPU, and its two strided halves made silu, the product and backward's cat slower.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = config.mlp_hidden
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_up = nn.Linear(config.n_embd, hidden, bias=config.bias) if self.kind == "swiglu" else None
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.kind == "swiglu":
            h = F.silu(h) * self.c_up(x)
        elif self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")  # GPT-2's tanh approximation
        else:
            h = F.relu(h)
        return self.dropout(self.c_proj(h))


# ----------------------------------------------------------------------------- block


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config.norm, config.n_embd, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config.norm, config.n_embd, config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None, kv_cache: KVCache | None,
                layer: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv_cache, layer, mask)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------- loss

LOSS_CHUNK = 512  # rows of logits at a time: (512, V) fp32 is 8 MB at V=4096, cache-sized on CPU


def _cross_entropy_chunks(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grads: bool):
    """Summed cross-entropy of logits x @ weight.T (x (N, C), weight (V, C)) against targets (N,),
    LOSS_CHUNK rows at a time; with grads, also d(sum)/dx (N, C) and d(sum)/dweight (V, C) fp32."""
    valid = (targets != -100)[:, None]
    safe = targets.masked_fill(targets == -100, 0)[:, None]
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    grad_x = torch.empty_like(x) if grads else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if grads else None
    for s in range(0, x.size(0), LOSS_CHUNK):
        rows = slice(s, s + LOSS_CHUNK)
        logits = (x[rows] @ weight.t()).float()                      # (n, V)
        top = logits.amax(dim=-1, keepdim=True)
        target = logits.gather(1, safe[rows])
        exp = logits.sub_(top).exp_()                                # in place: no second (n, V)
        total = exp.sum(dim=-1, keepdim=True)
        loss += ((top + total.log() - target) * valid[rows]).sum()   # logsumexp - target logit
        if grads:
            # d loss_row / d logits = softmax - onehot(target), zero for ignored rows
            g = exp.div_(total).scatter_add_(1, safe[rows], -torch.ones_like(total))
            g = g.mul_(valid[rows]).to(x.dtype)
            grad_x[rows] = g @ weight
            grad_w += (g.t() @ x[rows]).float()
    return loss, grad_x, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, while each chunk's logits are in cache, its gradients;
    backward only scales them by grad_output / n_valid."""

    @staticmethod
    def forward(ctx, x, weight, targets):
        loss, grad_x, grad_w = _cross_entropy_chunks(x, weight, targets, grads=True)
        n_valid = (targets != -100).sum()
        ctx.save_for_backward(grad_x, grad_w, n_valid)
        ctx.weight_dtype = weight.dtype
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, n_valid = ctx.saved_tensors
        scale = grad_loss / n_valid
        return grad_x * scale.to(grad_x.dtype), (grad_w * scale).to(ctx.weight_dtype), None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(x @ weight.T, targets, ignore_index=-100), never holding all (N, V) logits.

    Skips the full logits, their log-softmax, its gradient and a zero-filled buffer, each an (N, V)
    fp32 tensor (3.3 GB for gpt2-124m at batch 16 x 1024), and the passes over memory they cost:
    a `tiny` training step (batch 16 x 128, 2 CPU cores) took 175 ms with it, 212 ms without.
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets)
    loss, _, _ = _cross_entropy_chunks(x, weight, targets, grads=False)
    return loss / (targets != -100).sum()


# ----------------------------------------------------------------------------- config


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 128       # training context; learned positions end here, rope/sincos go on
    n_layer: int = 4
    n_head: int = 4
    n_kv_heads: int | None = None  # None: = n_head (multi-head); fewer: grouped-query attention
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False          # biases in Linear layers and LayerNorm
    pos_encoding: Literal["rope", "sincos", "learned"] = "rope"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    mlp: Literal["relu", "gelu", "swiglu"] = "swiglu"  # gelu: for GPT-2 itself
    tie_weights: bool = True    # lm_head.weight is wte.weight
    rope_theta: float = 10000.0
    # 2D positions for image tokens (off: "none"): the token at 1D position grid_start + r*grid_w + c
    # also gets row r's and column c's encoding (learned tables, or sine-cosine on half the features
    # each); the prefix before grid_start (a start token, a caption) keeps only its 1D positions
    pos_2d: Literal["none", "learned", "sincos"] = "none"
    grid_h: int = 0
    grid_w: int = 0
    grid_start: int = 0

    def __post_init__(self):
        for name, tp in get_type_hints(GPTConfig).items():
            if get_origin(tp) is Literal and getattr(self, name) not in get_args(tp):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be one of {list(get_args(tp))}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_heads={self.kv_heads}")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ValueError(f"rope rotates feature pairs: head_dim={self.head_dim} must be even")
        if self.pos_encoding == "sincos" and self.n_embd % 2:
            raise ValueError(f"sincos pairs sin/cos features: n_embd={self.n_embd} must be even")
        if self.pos_2d != "none" and (self.grid_h < 1 or self.grid_w < 1 or self.grid_start < 0):
            raise ValueError(f"pos_2d={self.pos_2d!r} needs grid_h, grid_w >= 1 and grid_start >= 0")
        if self.pos_2d == "sincos" and self.n_embd % 4:
            raise ValueError(f"2D sincos gives rows and columns half the features each: n_embd={self.n_embd} "
                             "must be a multiple of 4")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        if self.mlp == "swiglu":
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """`GPTConfig.from_preset("tiny", vocab_size=4096)`; an unknown field raises TypeError."""
        return replace(PRESETS[name], **overrides)


PRESETS = {
    # trains on 2 CPU cores in minutes (1.4M params at vocab 4096): the default for CPU runs
    "tiny": GPTConfig(vocab_size=4096, block_size=128, n_layer=4, n_head=4, n_embd=128),
    # nanoGPT's shakespeare-char size, modern parts and 2 k/v heads; ~12.6M params at vocab 8192
    "small": GPTConfig(vocab_size=8192, block_size=256, n_layer=6, n_head=6, n_kv_heads=2, n_embd=384),
    # GPT-2 small as published: learned positions, LayerNorm with biases, GELU, tied weights.
    # Vocab 50257 padded to 50304 (a multiple of 64), as nanoGPT does.
    "gpt2-124m": GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                           bias=True, pos_encoding="learned", norm="layernorm", mlp="gelu"),
}


# ----------------------------------------------------------------------------- model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_encoding == "learned" else None
        learned_2d = config.pos_2d == "learned"
        self.wre = nn.Embedding(config.grid_h, config.n_embd) if learned_2d else None   # grid rows
        self.wce = nn.Embedding(config.grid_w, config.n_embd) if learned_2d else None   # grid columns
        self.drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config.norm, config.n_embd, config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        # recompute each block's activations in backward (training only): memory for compute
        self.gradient_checkpointing = False

        self.apply(self._init_weights)
        # GPT-2: each block adds two residual projections; scale them so the stream's variance
        # stays put as n_layer grows
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights once). non_embedding drops what costs no matmul FLOPs:
        learned position embeddings and, when untied, the token embedding (a lookup). A tied
        wte stays, being the LM head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            for table in (self.wpe, self.wre, self.wce):
                if table is not None:
                    n -= table.weight.numel()
            if not self.config.tie_weights:
                n -= self.wte.weight.numel()
        return n

    def hidden(self, idx: torch.Tensor, kv_cache: KVCache | None = None,
               positions: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> final-norm hidden states (B, T, C): the trunk, without the LM head.

        kv_cache: the new tokens sit at positions kv_cache.length.. and attend to everything
        cached; the cache is extended by T. Without one, positions start at 0.
        positions (B, T) and mask (B, 1, T, S), for left-padded batches: each row's own positions
        and which cached/new keys each query may see (models/sampling.py builds them).
        """
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        pos = positions if positions is not None else torch.arange(start, start + T, device=idx.device)
        if self.config.pos_encoding == "learned" and int(pos.max()) >= self.config.block_size:
            raise ValueError(f"learned positions stop at block_size={self.config.block_size}; "
                             f"got positions up to {int(pos.max())}")
        x = self.wte(idx)                                          # (B, T, C)
        rope = None
        if self.config.pos_encoding == "learned":
            x = x + self.wpe(pos)
        elif self.config.pos_encoding == "sincos":
            # Vaswani et al. §3.4 scale embeddings by sqrt(C): with std-0.02 init the unit-size
            # sine-cosine table would otherwise drown the tokens (it slows early training here)
            table = sincos_table(pos.flatten(), self.config.n_embd).view(*pos.shape, -1)
            x = x * math.sqrt(self.config.n_embd) + table.to(x.dtype)
        else:
            rope = rope_angles(pos.flatten(), self.config.head_dim, self.config.rope_theta)
            rope = rope.view(*pos.shape, -1)                       # (T, D/2) or (B, T, D/2)
        if self.config.pos_2d != "none":
            x = x + self.grid_encoding(pos).to(x.dtype)
        x = self.drop(x)

        for layer, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and kv_cache is None:
                x = checkpoint(block, x, rope, None, layer, mask, use_reentrant=False)
            else:
                x = block(x, rope, kv_cache, layer, mask)
        if kv_cache is not None:
            kv_cache.length += T
        return self.ln_f(x)

    def grid_encoding(self, pos: torch.Tensor) -> torch.Tensor:
        """Row + column encodings of the grid tokens among 1D positions pos (T,) or (B, T) -> (*pos.shape, C);
        zero off the grid. sincos: rows fill the first C/2 features, columns the rest (MAE's 2D table),
        scaled like the 1D sincos table against the token embeddings (see `hidden`)."""
        cfg = self.config
        row, col, inside = grid_positions(pos, cfg.grid_start, cfg.grid_h, cfg.grid_w)
        if cfg.pos_2d == "learned":
            enc = self.wre(row) + self.wce(col)
        else:
            half = cfg.n_embd // 2
            enc = torch.cat([sincos_table(row.flatten(), half), sincos_table(col.flatten(), half)], -1)
            enc = enc.view(*pos.shape, -1)
            if cfg.pos_encoding != "sincos":   # tokens not scaled by sqrt(C): scale the table down instead
                enc = enc / math.sqrt(cfg.n_embd)
        return enc * inside.unsqueeze(-1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, V), None), or with targets (None, loss).

        targets (B, T): next-token ids, -100 where no loss is wanted (e.g. SFT prompt tokens). The
        mean cross-entropy is computed chunk-wise with the LM head (`linear_cross_entropy`), so
        training never materialises the (B, T, V) logits; call without targets to get them.
        kv_cache: as in `hidden`.
        """
        x = self.hidden(idx, kv_cache)
        if targets is None:
            return self.lm_head(x), None                           # (B, T, V)
        return None, linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
        """Continue idx (B, T) by max_new_tokens sampled tokens -> (B, T + max_new_tokens).

        One pass over the prompt fills a KV cache, then each step feeds only the newest token.
        temperature=0 is greedy (argmax); top_k keeps the k most likely tokens before sampling.
        Learned positions cap T + max_new_tokens at block_size; rope/sincos extrapolate past it.
        Call model.eval() first, or dropout will perturb the samples.
        """
        total = idx.size(1) + max_new_tokens
        if self.config.pos_encoding == "learned" and total > self.config.block_size:
            raise ValueError(f"{total} tokens exceed block_size={self.config.block_size} "
                             "(learned positions cannot extrapolate)")
        cache = KVCache(self.config.n_layer, total)
        new = idx
        for _ in range(max_new_tokens):
            logits, _ = self(new, kv_cache=cache)
            logits = logits[:, -1, :].float()                      # (B, V)
            if temperature == 0:
                new = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                new = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, new), dim=1)
        return idx

    def configure_optimizers(self, weight_decay: float, lr: float,
                             betas: tuple[float, float]) -> torch.optim.AdamW:
        """AdamW that decays only matrices and embeddings (dim >= 2), not biases or norm gains.

        Fused (one kernel for all parameters) on CUDA and on CPU too: for `tiny` on 2 cores the
        step takes 0.5 ms instead of 2.4 ms.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float, peak_flops: float) -> float:
        """Model FLOPs utilisation: achieved FLOP/s as a fraction of peak_flops (FLOP/s, measured
        by the caller for the device and dtype in use).

        fwdbwd_per_iter: sequences of block_size tokens per iteration (forward + backward);
        dt: seconds per iteration. FLOPs per token = 6N + 12 L H D T (PaLM appendix B, as nanoGPT).
        """
        cfg = self.config
        flops_per_token = 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size
        flops_per_iter = flops_per_token * cfg.block_size * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops
