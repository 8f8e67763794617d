"""A small transformer text encoder for the scene captions: word tokens in, per-token states out.

The captions use a small closed vocabulary (forgeline/scenes.py's VISUAL_WORDS), so tokens are whole
words: ids 0 <pad>, 1 <unk>, 2 <bos>, then the words in sorted order. Every caption starts with
<bos>, so even the empty caption (classifier-free guidance's "no text", Ho & Salimans 2022) has one
state to attend to. The blocks are the translation model's pre-norm `EncoderBlock` (models/seq2seq.py,
Vaswani et al. 2017) with its sine-cosine positions; the output is the final-norm states, what the
U-Net's cross-attention reads as keys and values (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models": a transformer text encoder trained jointly with the denoiser).

    enc = TextEncoder(TextEncoderConfig(vocab_size=len(vocab)))
    ids = encode_captions(["a red circle on the left", ""], vocab, enc.config.max_len)  # (B, T)
    states, mask = enc(ids)                         # (B, T, d_model), (B, T) True = a real token
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from models.seq2seq import EncoderBlock, sincos

SPECIALS = ("<pad>", "<unk>", "<bos>")
PAD, UNK, BOS = 0, 1, 2


@dataclass
class TextEncoderConfig:
    vocab_size: int
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 256
    max_len: int = 24                # <bos> + the longest caption (20 words), tokens
    dropout: float = 0.0


def build_vocab(words) -> list[str]:
    """The id -> word list: the specials, then `words` sorted (a closed set: VISUAL_WORDS)."""
    return [*SPECIALS, *sorted(set(words))]


def encode_captions(captions: list[str], vocab: list[str], max_len: int) -> torch.Tensor:
    """(B, T) ids, <bos> first, right-padded with <pad> to the longest row (at most max_len)."""
    index = {w: i for i, w in enumerate(vocab)}
    rows = [[BOS, *(index.get(w, UNK) for w in c.lower().split())][:max_len] for c in captions]
    out = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out


class TextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model, padding_idx=PAD)
        self.register_buffer("pos", sincos(c.max_len, c.d_model), persistent=False)
        self.blocks = nn.ModuleList(EncoderBlock(c.d_model, c.n_heads, c.d_ff, c.dropout) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T) -> states (B, T, d_model) and mask (B, T), True where a token is real (not <pad>)."""
        mask = ids != PAD
        x = self.embed(ids) * self.config.d_model ** 0.5 + self.pos[:ids.size(1)]
        attn_mask = mask[:, None, None, :]                  # (B, 1, 1, T): keys a query may attend
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.norm(x), mask
