"""DCGAN generator and discriminator, the WGAN-GP critic, the three losses and truncated sampling.

As book chapter 7 lays them out (Radford et al. 2016, DCGAN): the generator maps z (N, z_dim) through
upsampling blocks ConvTranspose2d + BatchNorm2d + ReLU (4x4, then doubling) to (N, 3, S, S) with
Tanh last; the discriminator halves the map with Conv2d stride 2 + BatchNorm2d + LeakyReLU (no norm
on the first block, as DCGAN) down to 4x4, then one Linear + Sigmoid gives P(real). The critic of
WGAN-GP (Gulrajani et al. 2017) is the same stack without BatchNorm (the penalty is per sample) and
without the Sigmoid (a score, not a probability).

Losses (Goodfellow et al. 2014): minimax D: -[log D(x) + log(1 - D(G(z)))], G: log(1 - D(G(z)));
non-saturating G: -log D(G(z)); WGAN-GP D: E[C(G(z))] - E[C(x)] + lambda E[(|grad C(x_hat)|_2 - 1)^2],
G: -E[C(G(z))]. The probability losses are computed from the pre-Sigmoid logit (`Discriminator.logit`)
with softplus, the same numbers without log(0). Truncation (Brock et al. 2019, BigGAN): entries of z
with |z| > threshold are redrawn until inside.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES = ("minimax", "nonsaturating", "wgan-gp")


@dataclass
class GANConfig:
    image_size: int = 32
    z_dim: int = 64
    g_width: int = 32          # channels of the last upsampling block; x2 per block towards 4x4
    d_width: int = 32          # channels of the first discriminator block; x2 per block
    critic: bool = False       # True: WGAN-GP critic (no BatchNorm, no Sigmoid)

    @property
    def blocks(self) -> int:
        return int(math.log2(self.image_size // 4))


def _check(c: GANConfig) -> None:
    if c.image_size < 8 or c.image_size & (c.image_size - 1):
        raise ValueError(f"image_size={c.image_size}: a power of two >= 8")


class Generator(nn.Module):
    def __init__(self, c: GANConfig):
        super().__init__()
        _check(c)
        widths = [c.g_width * 2 ** i for i in reversed(range(c.blocks))]  # e.g. 128, 64, 32 for 32x32
        layers = [nn.ConvTranspose2d(c.z_dim, widths[0], 4, 1, 0, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(True)]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], 3, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.z_dim = c.z_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(N, z_dim) -> (N, 3, S, S) in [-1, 1]."""
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    def __init__(self, c: GANConfig):
        super().__init__()
        _check(c)
        widths = [3] + [c.d_width * 2 ** i for i in range(c.blocks)]
        layers = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers.append(nn.Conv2d(a, b, 4, 2, 1, bias=i == 0 or c.critic))
            if i > 0 and not c.critic:
                layers.append(nn.BatchNorm2d(b))
            layers.append(nn.LeakyReLU(0.2, True))
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.fc = nn.Linear(widths[-1] * 16, 1)
        self.critic = c.critic

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N,): the pre-Sigmoid logit (the critic's score for WGAN-GP)."""
        return self.fc(self.net(x)).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) P(real) (Linear + Sigmoid); the critic's unbounded score when critic=True."""
        s = self.logit(x)
        return s if self.critic else torch.sigmoid(s)


def init_weights(m: nn.Module) -> None:
    """DCGAN's initialisation: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02) and shift 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- losses


def d_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss from logits (minimax, nonsaturating: the same BCE) or critic scores (wgan-gp;
    the gradient penalty is added by the caller)."""
    if kind == "wgan-gp":
        return fake.mean() - real.mean()
    # -log sigmoid(l) = softplus(-l); -log(1 - sigmoid(l)) = softplus(l)
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """Generator loss from the discriminator's logits (critic scores for wgan-gp) on generated images."""
    if kind == "minimax":
        return -F.softplus(fake).mean()         # log(1 - D(G(z))): saturates when D wins
    if kind == "nonsaturating":
        return F.softplus(-fake).mean()         # -log D(G(z))
    if kind == "wgan-gp":
        return -fake.mean()
    raise ValueError(f"loss {kind!r}: one of {LOSSES}")


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """E[(|grad_x C(x_hat)|_2 - 1)^2] at x_hat = e x + (1 - e) G(z), e ~ U[0, 1] per sample."""
    e = torch.rand(real.size(0), 1, 1, 1, generator=generator, device=real.device)
    x_hat = (e * real + (1 - e) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


# ----------------------------------------------------------------------------- sampling


def sample_z(n: int, z_dim: int, threshold: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, z_dim) standard normal; with `threshold` > 0 each entry outside [-threshold, threshold] is
    redrawn until inside (the truncation trick: less diversity, more typical images)."""
    z = torch.randn(n, z_dim, generator=generator)
    if threshold:
        if threshold <= 0:
            raise ValueError("threshold must be > 0 (or None for no truncation)")
        out = z.abs() > threshold
        while out.any():
            z[out] = torch.randn(int(out.sum()), generator=generator)
            out = z.abs() > threshold
    return z
