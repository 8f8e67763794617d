"""Image captioning: a CNN or ViT image encoder and a transformer decoder with cross-attention.

Encoders (the book's chapter 5):
- `cnn`: three stride-2 conv stages, then adaptive average pooling to a 3x3 grid of C channels,
  flattened to 9 tokens (Show, Attend and Tell, Xu et al. 2015, attends over such a grid), each
  projected to d_model with a learned position per cell;
- `vit`: the image cut into patch_size x patch_size patches, each flattened and linearly projected
  (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"), plus positions `1d-learned` (one
  vector per patch index), `2d-learned` (a row vector and a column vector, concatenated),
  `1d-sincos` (Vaswani et al.'s over the patch index) or `2d-sincos` (sine-cosine of the row in
  half the dimensions and of the column in the other half, as MAE, He et al. 2022), then
  pre-norm transformer encoder blocks.
The decoder is the translation model's (models/seq2seq.py's `DecoderBlock`, reused as it is):
masked self-attention over the caption so far, cross-attention to the image tokens, feed-forward;
sine-cosine positions, embedding tied to the output layer. Greedy and beam search are
models/seq2seq.py's `greedy` and `beam_search`, which run any model with its `encode` /
`cross_kv` / `decode` interface (here the "source" is the image batch).

Tokens: a word vocabulary (the captions are lowercase words); ids 0 PAD, 1 EOS, 2 BOS, 3 UNK.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.seq2seq import DecoderBlock, EncoderBlock, beam_search, greedy, pad_batch, sincos

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
POSITIONS = ("1d-learned", "2d-learned", "1d-sincos", "2d-sincos")


@dataclass
class CaptionConfig:
    vocab_size: int
    encoder: Literal["cnn", "vit"] = "cnn"
    pos: Literal["1d-learned", "2d-learned", "1d-sincos", "2d-sincos"] = "2d-sincos"  # vit only
    image_size: int = 64
    patch_size: int = 8              # vit: (image_size / patch_size)^2 tokens
    cnn_width: int = 32              # cnn: channels of the first stage, doubled at each next one
    d_model: int = 128
    n_heads: int = 4
    n_enc_layers: int = 2            # vit only
    n_dec_layers: int = 2
    d_ff: int = 256
    max_len: int = 32                # longest caption, tokens with EOS
    dropout: float = 0.1
    pad_id: int = 0
    eos_id: int = 1
    bos_id: int = 2

    # what models/seq2seq.py's decoding bans besides PAD and BOS: nothing here (no MASK, no language tokens)
    @property
    def mask_id(self) -> int:
        return self.bos_id

    @property
    def lang_ids(self) -> dict[str, int]:
        return {}


class CNNEncoder(nn.Module):
    """(B, 3, S, S) -> (B, 9, d_model): conv stages, a 3x3 grid, one token per cell."""

    def __init__(self, c: CaptionConfig):
        super().__init__()
        widths = [3, c.cnn_width, 2 * c.cnn_width, 4 * c.cnn_width]
        self.convs = nn.Sequential(*(nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b), nn.GELU(),
                                                   nn.Conv2d(b, b, 3, padding=1), nn.BatchNorm2d(b), nn.GELU())
                                     for a, b in zip(widths, widths[1:])))
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.proj = nn.Linear(widths[-1], c.d_model)
        self.pos = nn.Parameter(torch.zeros(9, c.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.pool(self.convs(x))                       # (B, C, 3, 3)
        return self.proj(grid.flatten(2).transpose(1, 2)) + self.pos


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C), patches in row-major order."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


class ViTEncoder(nn.Module):
    """(B, 3, S, S) -> (B, (S/p)^2, d_model): patchify, linear projection, positions, encoder blocks."""

    def __init__(self, c: CaptionConfig):
        super().__init__()
        if c.image_size % c.patch_size or c.d_model % 4:
            raise ValueError("vit: patch_size must divide image_size, and d_model be a multiple of 4")
        self.p, self.g, self.kind = c.patch_size, c.image_size // c.patch_size, c.pos
        n, d = self.g * self.g, c.d_model
        self.proj = nn.Linear(c.patch_size * c.patch_size * 3, d)
        rows, cols = torch.arange(n) // self.g, torch.arange(n) % self.g
        if c.pos == "1d-learned":
            self.pos = nn.Parameter(torch.randn(n, d) * 0.02)
        elif c.pos == "2d-learned":
            self.row, self.col = nn.Parameter(torch.randn(self.g, d // 2) * 0.02), nn.Parameter(torch.randn(self.g, d // 2) * 0.02)
        elif c.pos == "1d-sincos":
            self.register_buffer("pos", sincos(n, d), persistent=False)
        elif c.pos == "2d-sincos":
            table = sincos(self.g, d // 2)
            self.register_buffer("pos", torch.cat([table[rows], table[cols]], dim=1), persistent=False)
        else:
            raise ValueError(f"pos={c.pos!r}: one of {POSITIONS}")
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.blocks = nn.ModuleList(EncoderBlock(d, c.n_heads, c.d_ff, c.dropout) for _ in range(c.n_enc_layers))

    def positions(self) -> torch.Tensor:
        if self.kind == "2d-learned":
            return torch.cat([self.row[self.rows], self.col[self.cols]], dim=1)
        return self.pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(patchify(x, self.p)) + self.positions()
        for block in self.blocks:
            h = block(h, None)
        return h


class CaptionModel(nn.Module):
    def __init__(self, config: CaptionConfig):
        super().__init__()
        c = self.config = config
        self.encoder = CNNEncoder(c) if c.encoder == "cnn" else ViTEncoder(c)
        self.enc_norm = nn.LayerNorm(c.d_model)
        self.embed = nn.Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_id)
        self.register_buffer("dec_pos", sincos(c.max_len + 1, c.d_model), persistent=False)
        self.drop = nn.Dropout(c.dropout)
        self.decoder = nn.ModuleList(DecoderBlock(c.d_model, c.n_heads, c.d_ff, c.dropout) for _ in range(c.n_dec_layers))
        self.dec_norm = nn.LayerNorm(c.d_model)
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

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, S, S) in [-1, 1] -> memory (B, T, D) and its key mask (B, 1, 1, T), all True."""
        memory = self.enc_norm(self.encoder(images))
        return memory, torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)[:, None, None, :]

    def cross_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [block.cross_attn.project_kv(memory) for block in self.decoder]

    def decode(self, tgt: torch.Tensor, cross: list, mem_mask: torch.Tensor, cache: list | None = None,
               offset: int = 0) -> torch.Tensor:
        """Logits (B, T, V) for caption tokens tgt (B, T) at positions offset.. (models/seq2seq.py's contract)."""
        T = tgt.size(1)
        self_mask = None
        if cache is None:
            causal = torch.ones(T, T, dtype=torch.bool, device=tgt.device).tril()
            self_mask = causal[None, None] & (tgt != self.config.pad_id)[:, None, None, :] | torch.eye(
                T, dtype=torch.bool, device=tgt.device)
        x = self.drop(self.embed(tgt) * math.sqrt(self.config.d_model) + self.dec_pos[offset:offset + T])
        for i, block in enumerate(self.decoder):
            x = block(x, cross[i], mem_mask, self_mask, None if cache is None else cache[i])
        return self.head(self.dec_norm(x))

    def forward(self, images: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor | None = None,
                label_smoothing: float = 0.0):
        """Teacher forcing: logits (B, T, V) and, given tgt_out, the mean cross-entropy over non-pad targets."""
        memory, mem_mask = self.encode(images)
        logits = self.decode(tgt_in, self.cross_kv(memory), mem_mask)
        if tgt_out is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=self.config.pad_id,
                               label_smoothing=label_smoothing)
        return logits, loss


# ----------------------------------------------------------------------------- words <-> ids


def build_vocab(captions: list[str]) -> list[str]:
    """The special tokens, then every word of the captions in sorted order."""
    return [*SPECIALS, *sorted({w for c in captions for w in c.split()})]


def encode_caption(text: str, index: dict[str, int], max_len: int) -> list[int]:
    """Word ids of a caption (UNK for unknown words), cut to leave room for EOS."""
    return [index.get(w, 3) for w in text.split()][:max_len - 1]


def teacher_forcing(rows: list[list[int]], c: CaptionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder input [BOS] + caption and target caption + [EOS], padded."""
    return pad_batch([[c.bos_id, *r] for r in rows], c.pad_id), pad_batch([[*r, c.eos_id] for r in rows], c.pad_id)


@torch.no_grad()
def caption(model: CaptionModel, words: list[str], images: torch.Tensor, beam: int = 1, length_penalty: float = 0.6,
            batch_size: int = 64) -> tuple[list[str], list[float]]:
    """A caption per image (N, 3, S, S) and its mean log-prob per token; beam=1 is greedy."""
    texts, conf = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        ids, p = (greedy(model, x, model.config.max_len) if beam == 1 else
                  beam_search(model, x, model.config.max_len, beam, length_penalty))
        texts += [" ".join(words[t] for t in row if t >= len(SPECIALS)) for row in ids]
        conf += p
    return texts, conf
