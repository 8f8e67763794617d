"""The learning-rate schedule every training stage uses: linear warmup, then cosine decay to a floor."""
from __future__ import annotations

import math


def warmup_cosine(step: int, max_steps: int, lr: float, min_lr: float, warmup_steps: int) -> float:
    """Step `step`'s learning rate: lr * (step + 1) / warmup_steps during warmup, then cosine from lr down to
    min_lr at max_steps (held there after)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)
