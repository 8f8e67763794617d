"""The evaluation network: a small CNN classifier whose penultimate features stand in for Inception's.

FID (Heusel et al. 2017) and the Inception Score (Salimans et al. 2016) are defined over
Inception-v3 trained on ImageNet; no such weights ship offline, so we train this network on the
pipeline's own images and report its name beside every score (forgeline/image_metrics.py). It is
a VGG-style stack (Simonyan & Zisserman 2014): per stage two 3x3 conv + BatchNorm + ReLU, then 2x2
max-pooling, until the map is 4x4; global average pooling gives the features (FID), and one linear
head per task gives logits (IS uses one head's class probabilities). Several heads share the
trunk: the scenes' count and per-slot shape, colour and size; Fashion-MNIST's one class head.

Input: (N, 3, S, S) in [-1, 1] (forgeline/images.py's `to_tensor`), S a power of two >= 8.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class EvalNetConfig:
    image_size: int = 32
    width: int = 32                                    # channels of the first stage, doubled at each next one
    heads: dict[str, int] = field(default_factory=dict)  # task -> number of classes
    dropout: float = 0.2

    @property
    def stages(self) -> int:
        return int(math.log2(self.image_size // 4))

    @property
    def feature_dim(self) -> int:
        return self.width * 2 ** (self.stages - 1)


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))


class EvalNet(nn.Module):
    def __init__(self, config: EvalNetConfig):
        super().__init__()
        c = self.config = config
        if c.image_size < 8 or c.image_size & (c.image_size - 1):
            raise ValueError(f"image_size={c.image_size}: a power of two >= 8")
        widths = [3] + [c.width * 2 ** i for i in range(c.stages)]
        self.trunk = nn.Sequential(*(_stage(a, b) for a, b in zip(widths, widths[1:])))
        self.drop = nn.Dropout(c.dropout)
        self.heads = nn.ModuleDict({name: nn.Linear(c.feature_dim, n) for name, n in c.heads.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, feature_dim): the penultimate layer, FID's feature space."""
        return self.trunk(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits (N, classes) per head."""
        h = self.drop(self.features(x))
        return {name: head(h) for name, head in self.heads.items()}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
