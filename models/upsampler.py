"""A 2x super-resolution network: the last step of the VQ pipeline's serving path (generate -> decode -> upsample).

ESPCN (Shi et al. 2016, arXiv:1609.05158) with a global residual: the input is upsampled
bilinearly, and a small CNN at the low resolution predicts the missing detail, rearranged to the
high resolution by a sub-pixel convolution (PixelShuffle). Fully convolutional: trained on
16 -> 32, it applies to 32 -> 64 unchanged (same factor, larger canvas).

Input (N, 3, S, S) in [-1, 1] -> (N, 3, 2S, 2S) in [-1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class UpsamplerConfig:
    width: int = 32
    layers: int = 3             # 3x3 convolutions at the low resolution before the sub-pixel one


class Upsampler(nn.Module):
    def __init__(self, config: UpsamplerConfig):
        super().__init__()
        self.config = config
        layers, ch = [], 3
        for _ in range(config.layers):
            layers += [nn.Conv2d(ch, config.width, 3, padding=1), nn.ReLU()]
            ch = config.width
        layers += [nn.Conv2d(ch, 3 * 4, 3, padding=1), nn.PixelShuffle(2)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return (base + self.net(x)).clamp(-1, 1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
