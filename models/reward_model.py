"""Scalar heads on the GPT trunk: the reward model, and the policy's value head for PPO.

- Ouyang et al. 2022, "Training language models to follow instructions with human feedback"
  (InstructGPT, arXiv:2203.02155) §3.5: a reward model is the SFT model with its unembedding
  replaced by a scalar projection, read at the last token of prompt + response.
- Stiennon et al. 2020 (arXiv:2009.01325) and Ziegler et al. 2019 (arXiv:1909.08593): the PPO
  policy carries a value head that predicts the return from each response position.

Shapes: B batch, T tokens, C n_embd, V vocab_size.

    rm = RewardModel(GPTConfig(...)); scores = rm(idx, last)          # (B,)
    ac = PolicyWithValue(gpt); h, values = ac(idx)                   # (B, T, C), (B, T)
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from models.gpt import GPT, GPTConfig


class RewardModel(nn.Module):
    """GPT trunk + Linear(C, 1): one score per sequence, read at the index `last` of each row.

    Right padding is harmless: causal attention means positions up to `last` never see it.
    The trunk keeps its (tied) LM head weights so it loads from any GPT checkpoint; they go unused.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gpt = GPT(config)
        self.head = nn.Linear(config.n_embd, 1, bias=True)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(config.n_embd + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """idx (B, T), last (B,) index of each row's final token -> scores (B,), fp32."""
        h = self.gpt.hidden(idx)                                   # (B, T, C)
        h_last = h[torch.arange(idx.size(0), device=idx.device), last]
        return self.head(h_last).squeeze(-1).float()


def pairwise_margin_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float) -> torch.Tensor:
    """Hinge on the score gap: mean of max(0, margin - (chosen - rejected)).

    A pair costs nothing once the winner leads by at least `margin`, and costs linearly (slope 1)
    below it, so the scores of the winners are pushed a margin above the losers and no further.
    """
    return torch.relu(margin - (chosen - rejected)).mean()


class PolicyWithValue(nn.Module):
    """The PPO actor-critic: a GPT policy and a Linear(C, 1) value head on its hidden states.

    The head reads the states detached, a linear probe: the value loss (returns of a few reward
    units, squared) is then kept from reshaping the policy's trunk; in a trial with the trunk
    shared, the KL to the reference grew twice as fast. The head starts at zero (values 0
    everywhere), so the first advantages are the rewards.
    """

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt
        self.value_head = nn.Linear(gpt.config.n_embd, 1, bias=True)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """idx (B, T) -> hidden states (B, T, C) and values (B, T), fp32 values.

        The caller applies `gpt.lm_head` where it needs logits: PPO only at reply positions,
        a few of each row's tokens, where the head over all of them would cost more than the trunk.
        """
        h = self.gpt.hidden(idx)
        return h, self.value_head(h.detach()).squeeze(-1).float()
