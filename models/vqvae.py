"""VQ-VAE: a CNN encoder, a codebook quantizer and a CNN decoder, with a patch discriminator (book chapter 8).

van den Oord et al. 2017 (arXiv:1711.00937): the encoder maps an image to a grid of vectors, each
replaced by its nearest codebook entry; the decoder (ConvTranspose2d upsampling) maps the grid of
entries back to pixels. The nearest-neighbour lookup has no gradient, so the straight-through
estimator copies the decoder's gradient onto the encoder output: z_q = z_e + (e - z_e).detach().
The codebook term ||sg[z_e] - e||^2 moves entries toward the encoder outputs, the commitment term
beta * ||z_e - sg[e]||^2 keeps the encoder near its entries. Codes no encoder output picked for a
while are restarted on random encoder outputs of the current batch (Dhariwal et al. 2020, Jukebox,
§3.2; Zeghidour et al. 2021). VQGAN (Esser et al. 2021, arXiv:2012.09841) adds a perceptual loss and
a patch discriminator (Isola et al. 2017) switched on after a warm-up; both are here:
`perceptual_loss` compares feature maps of any frozen CNN trunk (the pipeline's evaluation network,
since VGG weights do not ship), `PatchDiscriminator` scores overlapping patches with hinge losses.

Input and output: (N, 3, S, S) in [-1, 1]; S divisible by 2 ** n_down; the token grid is
(S / 2**n_down)^2, read in raster order by the prior (tasks/vq_prior.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQVAEConfig:
    image_size: int = 32
    hidden: int = 64            # channels of the encoder and decoder trunks
    n_down: int = 2             # stride-2 stages: 32x32 -> 8x8 tokens
    n_res: int = 1              # residual blocks at the token resolution, each side
    codebook_size: int = 128
    code_dim: int = 32
    beta: float = 0.25          # commitment weight (the paper's value)
    usage_decay: float = 0.95   # EMA of each code's share of the assignments, for dead-code restarts
    normalize: bool = True      # l2-normalised codes and encoder outputs (ViT-VQGAN, Yu et al. 2021): bounded
                                # distances, so the codebook loss cannot run away and more codes stay in use

    def __post_init__(self):
        if self.image_size % (2 ** self.n_down):
            raise ValueError(f"image_size={self.image_size} is not divisible by 2**n_down={2 ** self.n_down}")

    @property
    def grid(self) -> int:
        return self.image_size // 2 ** self.n_down

    @property
    def tokens(self) -> int:
        return self.grid * self.grid


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class Encoder(nn.Module):
    """(N, 3, S, S) -> (N, code_dim, S/2^n, S/2^n): stride-2 4x4 convolutions, residual blocks, 1x1 projection."""

    def __init__(self, c: VQVAEConfig):
        super().__init__()
        layers, ch = [], 3
        for i in range(c.n_down):
            layers += [nn.Conv2d(ch, c.hidden, 4, stride=2, padding=1), nn.ReLU()]
            ch = c.hidden
        layers += [nn.Conv2d(ch, c.hidden, 3, padding=1)] + [ResBlock(c.hidden) for _ in range(c.n_res)]
        layers += [nn.ReLU(), nn.Conv2d(c.hidden, c.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(N, code_dim, g, g) -> (N, 3, S, S) in [-1, 1]: residual blocks, then ConvTranspose2d 4x4 stride 2 per stage."""

    def __init__(self, c: VQVAEConfig):
        super().__init__()
        layers = [nn.Conv2d(c.code_dim, c.hidden, 3, padding=1)] + [ResBlock(c.hidden) for _ in range(c.n_res)]
        layers += [nn.ReLU()]
        for i in range(c.n_down):
            last = i == c.n_down - 1
            layers += [nn.ConvTranspose2d(c.hidden, 3 if last else c.hidden, 4, stride=2, padding=1)]
            layers += [nn.Tanh()] if last else [nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Quantizer(nn.Module):
    """Nearest codebook entry per grid vector, the straight-through estimator, the two codebook losses,
    and an EMA of each code's share of the assignments (buffer `usage`, sums to ~1) for restarts."""

    def __init__(self, c: VQVAEConfig):
        super().__init__()
        self.beta, self.decay, self.normalize = c.beta, c.usage_decay, c.normalize
        self.codebook = nn.Embedding(c.codebook_size, c.code_dim)
        self.codebook.weight.data.uniform_(-1 / c.codebook_size, 1 / c.codebook_size)
        self.register_buffer("usage", torch.full((c.codebook_size,), 1 / c.codebook_size))

    def entries(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Codebook rows (all, or those of idx), l2-normalised when the config says so."""
        e = self.codebook.weight if idx is None else self.codebook(idx)
        return F.normalize(e, dim=-1) if self.normalize else e

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """(M, D) -> (M,) index of the closest entry (squared Euclidean; flat normalised as in forward)."""
        e = self.entries()
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return d.argmin(1)

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z_e (N, D, g, g) -> (z_q with straight-through gradient (N, D, g, g), indices (N, g, g), losses)."""
        n, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        if self.normalize:
            flat = F.normalize(flat, dim=1)
        idx = self.nearest(flat.detach())
        e = self.entries(idx)
        codebook = F.mse_loss(e, flat.detach())           # moves the entries toward the encoder outputs
        commit = F.mse_loss(flat, e.detach())             # keeps the encoder near its entries
        if self.training:
            share = torch.bincount(idx, minlength=self.usage.numel()).float() / idx.numel()
            self.usage.mul_(self.decay).add_(share, alpha=1 - self.decay)
        q = flat + (e - flat).detach()                    # straight-through: forward e, backward identity
        z_q = q.view(n, h, w, d).permute(0, 3, 1, 2)
        return z_q, idx.view(n, h, w), {"codebook": codebook, "commit": self.beta * commit}

    @torch.no_grad()
    def restart_dead(self, z_e: torch.Tensor, threshold: float, gen: torch.Generator | None = None) -> int:
        """Codes whose usage share fell below threshold / codebook_size take random encoder outputs of
        z_e (N, D, g, g) (a little noise apart); their usage is reset to uniform. Returns how many."""
        k = self.usage.numel()
        dead = (self.usage < threshold / k).nonzero().squeeze(1)
        if len(dead) == 0:
            return 0
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, z_e.size(1))
        if self.normalize:
            flat = F.normalize(flat, dim=1)
        pick = torch.randint(len(flat), (len(dead),), generator=gen, device=flat.device)
        noise = torch.randn(len(dead), flat.size(1), generator=gen, device=flat.device) * 1e-3
        self.codebook.weight.data[dead] = flat[pick] + noise
        self.usage[dead] = 1 / k
        return len(dead)


class VQVAE(nn.Module):
    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder, self.quantizer, self.decoder = Encoder(config), Quantizer(config), Decoder(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """x (N, 3, S, S) -> (reconstruction (N, 3, S, S), indices (N, g, g), {codebook, commit} losses)."""
        z_q, idx, losses = self.quantizer(self.encoder(x))
        return self.decoder(z_q), idx, losses

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> token grid (N, g, g) of codebook indices."""
        flat = self.encoder(x).permute(0, 2, 3, 1).reshape(-1, self.config.code_dim)
        if self.config.normalize:
            flat = F.normalize(flat, dim=1)
        return self.quantizer.nearest(flat).view(len(x), self.config.grid, self.config.grid)

    @torch.no_grad()
    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        """Token grid (N, g, g) (or raster (N, g*g)) -> images (N, 3, S, S) in [-1, 1]."""
        g = self.config.grid
        e = self.quantizer.entries(idx.reshape(len(idx), g, g))   # (N, g, g, D)
        return self.decoder(e.permute(0, 3, 1, 2))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class PatchDiscriminator(nn.Module):
    """(N, 3, S, S) -> (N, 1, S/4, S/4) logits, one per overlapping patch (PatchGAN, Isola et al. 2017)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------- losses and code statistics


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss (VQGAN's): mean relu(1 - D(real)) + mean relu(1 + D(fake))."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def generator_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The autoencoder's adversarial term: -mean D(reconstruction)."""
    return -fake_logits.mean()


def perceptual_loss(trunk: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS-style distance (Zhang et al. 2018) without learned weights: after each stage of a frozen CNN
    trunk, the mean squared difference of channel-normalised feature maps, summed over stages.
    The trunk's parameters should have requires_grad False; gradients flow to x (and y)."""
    loss = x.new_zeros(())
    for stage in trunk:
        x, y = stage(x), stage(y)
        loss = loss + (F.normalize(x, dim=1) - F.normalize(y, dim=1)).pow(2).sum(1).mean()
    return loss


def code_stats(idx: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Share of the codebook used by `idx` and the perplexity exp(H) of its code histogram
    (= codebook_size when every code is equally used, 1 when one code takes all)."""
    p = torch.bincount(idx.flatten(), minlength=codebook_size).float()
    p = p / p.sum()
    nz = p[p > 0]
    return {"usage": (p > 0).float().mean().item(), "perplexity": math.exp(-(nz * nz.log()).sum().item())}
