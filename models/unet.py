"""A small U-Net denoiser conditioned on a timestep and on text states, pure torch.

Ronneberger et al. 2015 (the U-Net: a down path, an up path, skips between equal resolutions) in the
form of Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", arXiv:2006.11239): residual
blocks with GroupNorm and SiLU, the sinusoidal timestep embedding added inside every block, and at
the low resolutions a transformer block over the pixels: self-attention, then cross-attention to the
caption's token states (Rombach et al. 2022, arXiv:2112.10752), then a feed-forward. The pooled text
state is also added to the timestep embedding (Saharia et al. 2022, Imagen), so every block sees the
caption. The attention layers are the translation model's (models/seq2seq.py's `Attention`).

Shapes: x (B, 3, S, S) noisy image, t (B,) integer timesteps, text (B, T, Dt) states with mask (B, T)
True = a real token; the output is (B, 3, S, S), the predicted noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.seq2seq import Attention, FeedForward


@dataclass
class UNetConfig:
    image_size: int = 32
    base: int = 32                         # channels at full resolution
    mults: tuple[int, ...] = (1, 2, 2)     # channel multiple per level; each level after the first halves S
    num_res: int = 1                       # residual blocks per level on the way down (one more on the way up)
    attn_levels: tuple[int, ...] = (2,)    # levels (0 = full resolution) with self- and cross-attention
    heads: int = 4
    text_dim: int = 128
    dropout: float = 0.0
    groups: int = 8                        # GroupNorm groups


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) sine-cosine features (Vaswani et al.'s positions, at the timestep)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.drop = nn.GroupNorm(groups, c_out), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)        # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Pixels as tokens: self-attention, cross-attention to the text states, feed-forward (pre-norm)."""

    def __init__(self, ch: int, text_dim: int, heads: int, groups: int):
        super().__init__()
        self.norm_in, self.proj_in = nn.GroupNorm(groups, ch), nn.Linear(ch, ch)
        self.norm1, self.self_attn = nn.LayerNorm(ch), Attention(ch, heads, 0.0)
        self.norm2, self.cross_attn = nn.LayerNorm(ch), Attention(ch, heads, 0.0)
        self.text_proj = nn.Linear(text_dim, ch)
        self.norm3, self.ff = nn.LayerNorm(ch), FeedForward(ch, 4 * ch, 0.0)
        self.proj_out = nn.Linear(ch, ch)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm_in(x).flatten(2).transpose(1, 2))      # (B, HW, C)
        a = self.norm1(h)
        h = h + self.self_attn(a, *self.self_attn.project_kv(a), None)
        h = h + self.cross_attn(self.norm2(h), *self.cross_attn.project_kv(self.text_proj(text)),
                                mask[:, None, None, :])                    # (B, 1, 1, T): real tokens only
        h = h + self.ff(self.norm3(h))
        return x + self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        c = self.config = config
        emb_dim = 4 * c.base
        self.time_mlp = nn.Sequential(nn.Linear(c.base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.text_pool = nn.Linear(c.text_dim, emb_dim)
        self.conv_in = nn.Conv2d(3, c.base, 3, padding=1)

        def res(a: int, b: int) -> ResBlock:
            return ResBlock(a, b, emb_dim, c.groups, c.dropout)

        def attn(ch: int) -> AttnBlock:
            return AttnBlock(ch, c.text_dim, c.heads, c.groups)

        chans = [c.base * m for m in c.mults]
        self.down = nn.ModuleList()
        skips, ch = [c.base], c.base
        for level, out in enumerate(chans):
            for _ in range(c.num_res):
                self.down.append(nn.ModuleList([res(ch, out), attn(out) if level in c.attn_levels else nn.Identity()]))
                ch = out
                skips.append(ch)
            if level < len(chans) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([res(ch, ch), attn(ch), res(ch, ch)])
        self.up = nn.ModuleList()
        for level in reversed(range(len(chans))):
            out = chans[level]
            for _ in range(c.num_res + 1):
                self.up.append(nn.ModuleList([res(ch + skips.pop(), out),
                                              attn(out) if level in c.attn_levels else nn.Identity()]))
                ch = out
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
        self.norm_out, self.conv_out = nn.GroupNorm(c.groups, ch), nn.Conv2d(ch, 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).float()
        pooled = (text * m).sum(1) / m.sum(1).clamp(min=1)                # (B, Dt): mean over real tokens
        emb = self.time_mlp(timestep_embedding(t, self.config.base)) + self.text_pool(pooled)

        def block(layer: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
            h = layer[0](h, emb)
            return layer[1](h, text, mask) if isinstance(layer[1], AttnBlock) else h

        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = block(layer, h) if isinstance(layer, nn.ModuleList) else layer(h)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb), text, mask), emb)
        for layer in self.up:
            h = block(layer, torch.cat([h, hs.pop()], dim=1)) if isinstance(layer, nn.ModuleList) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))
