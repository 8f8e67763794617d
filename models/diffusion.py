"""Text-to-image diffusion: the caption's text encoder, the U-Net denoiser, the noise schedule, DDPM
training, DDPM and DDIM sampling, classifier-free guidance. Pure torch.

- Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239): the forward process
  q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), the linear beta schedule, the simple loss
  ||eps - eps_theta(x_t, t)||^2, ancestral sampling with the posterior variance beta~_t.
- Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models" (arXiv:2102.09672):
  the cosine schedule abar_t = cos^2(((t/T + s)/(1 + s)) pi/2), betas clipped at 0.999.
- Song et al. 2021, "Denoising Diffusion Implicit Models" (arXiv:2010.02502): sampling on a
  subsequence of `steps` timesteps; eta = 0 deterministic, eta = 1 DDPM-like noise.
- Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy" (arXiv:2303.09556):
  each timestep's loss weighted by min(SNR_t, gamma) / SNR_t (eps-prediction form; SNR_t = abar_t /
  (1 - abar_t)), so the nearly noise-free timesteps, whose gradients conflict with the rest, stop
  dominating; the paper measures ~3x faster convergence. `min_snr_gamma` 0 is the plain loss.
- Ho & Salimans 2022, "Classifier-Free Diffusion Guidance" (arXiv:2207.12598): the caption is
  replaced by the empty one with probability p_uncond in training; at sampling
  eps = eps(x, empty) + scale * (eps(x, caption) - eps(x, empty)): scale 0 is unconditional,
  1 plainly conditional, > 1 guided.

    model = TextToImage(T2IConfig(vocab_size=len(vocab)))
    loss = model.loss(x0, ids, p_uncond=0.1)                       # x0 (B, 3, S, S) in [-1, 1]
    images = generate(model, vocab, ["a red circle on the left"], steps=25, guidance=3.0)  # uint8 (N, S, S, 3)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.text_encoder import BOS, TextEncoder, TextEncoderConfig, encode_captions
from models.unet import UNet, UNetConfig


@dataclass
class T2IConfig:
    vocab_size: int
    image_size: int = 32
    timesteps: int = 1000
    schedule: Literal["cosine", "linear"] = "cosine"
    text: dict = field(default_factory=dict)     # TextEncoderConfig fields besides vocab_size
    unet: dict = field(default_factory=dict)     # UNetConfig fields besides image_size and text_dim

    def text_config(self) -> TextEncoderConfig:
        return TextEncoderConfig(vocab_size=self.vocab_size, **self.text)

    def unet_config(self) -> UNetConfig:
        unet = {k: tuple(v) if isinstance(v, list) else v for k, v in self.unet.items()}   # JSON lists back to tuples
        return UNetConfig(image_size=self.image_size, text_dim=self.text_config().d_model, **unet)


def make_betas(kind: str, timesteps: int) -> torch.Tensor:
    """(T,) float64 betas: `linear` 1e-4 -> 0.02 (Ho et al., scaled to T), `cosine` (Nichol & Dhariwal)."""
    if kind == "linear":
        scale = 1000 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    if kind == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"schedule={kind!r}: cosine or linear")


class TextToImage(nn.Module):
    def __init__(self, config: T2IConfig):
        super().__init__()
        self.config = config
        self.text = TextEncoder(config.text_config())
        self.unet = UNet(config.unet_config())
        betas = make_betas(config.schedule, config.timesteps)
        abar = torch.cumprod(1 - betas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        # schedule tables as fp32 buffers, not saved (a pure function of the config)
        for name, v in {"betas": betas, "abar": abar, "abar_prev": abar_prev,
                        "post_var": betas * (1 - abar_prev) / (1 - abar), "snr": abar / (1 - abar)}.items():
            self.register_buffer(name, v.float(), persistent=False)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text(ids)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Predicted noise (B, 3, S, S) of x_t at timesteps t (B,) given caption ids (B, T)."""
        return self.unet(x, t, *self.text(ids))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        a = self.abar[t][:, None, None, None]
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def loss(self, x0: torch.Tensor, ids: torch.Tensor, p_uncond: float = 0.1,
             generator: torch.Generator | None = None, min_snr_gamma: float = 0.0) -> torch.Tensor:
        """The simple DDPM loss: MSE between the noise and its prediction at a uniform timestep; each
        caption replaced by the empty one (<bos> only) with probability p_uncond. With min_snr_gamma > 0
        each image's MSE is weighted by min(SNR_t, gamma) / SNR_t (Hang et al.)."""
        B = x0.size(0)
        t = torch.randint(self.config.timesteps, (B,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        drop = torch.rand(B, generator=generator) < p_uncond
        ids = torch.where(drop[:, None], null_ids(B, ids.size(1)), ids)
        err = (self(self.q_sample(x0, t, noise), t, ids) - noise).pow(2).mean(dim=(1, 2, 3))    # (B,)
        if min_snr_gamma > 0:
            snr = self.snr[t]
            err = err * snr.clamp(max=min_snr_gamma) / snr
        return err.mean()


def null_ids(batch: int, length: int = 1) -> torch.Tensor:
    """The empty caption: <bos> then padding, (batch, length)."""
    ids = torch.zeros(batch, length, dtype=torch.long)
    ids[:, 0] = BOS
    return ids


def _guided_eps(model: TextToImage, x: torch.Tensor, t: int, cond: tuple, uncond: tuple | None,
                guidance: float) -> torch.Tensor:
    """eps(x, empty) + guidance * (eps(x, caption) - eps(x, empty)); one batched forward of both."""
    tt = torch.full((x.size(0),), t, dtype=torch.long)
    if uncond is None:                                            # guidance == 1: the conditional alone
        return model.unet(x, tt, *cond)
    if guidance == 0:
        return model.unet(x, tt, *uncond)
    both = model.unet(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([cond[0], uncond[0]]),
                      torch.cat([cond[1], uncond[1]]))
    e_c, e_u = both.chunk(2)
    return e_u + guidance * (e_c - e_u)


@torch.no_grad()
def sample(model: TextToImage, ids: torch.Tensor, steps: int | None = None, guidance: float = 1.0, eta: float = 0.0,
           sampler: Literal["ddim", "ddpm"] = "ddim", generator: torch.Generator | None = None,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """Images (B, 3, S, S) in [-1, 1] for caption ids (B, T), from x_T = `noise` (drawn when None).

    `ddpm`: ancestral sampling through all T timesteps (steps ignored). `ddim`: `steps` evenly spaced
    timesteps, noise sigma_t = eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev).
    The predicted x_0 is clipped to [-1, 1] at every step (the data's range)."""
    model.eval()
    B, S, T = ids.size(0), model.config.image_size, model.config.timesteps
    cond = model.encode(ids)
    uncond = None if guidance == 1 else model.encode(null_ids(B, ids.size(1)))
    x = torch.randn((B, 3, S, S), generator=generator) if noise is None else noise.clone()
    if sampler == "ddpm":
        for t in reversed(range(T)):
            eps = _guided_eps(model, x, t, cond, uncond, guidance)
            ab, ab_prev, beta = model.abar[t], model.abar_prev[t], model.betas[t]
            x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
            # posterior mean of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 7)
            mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * x
            x = mean + (model.post_var[t].sqrt() * torch.randn(x.shape, generator=generator) if t > 0 else 0)
        return x
    if sampler != "ddim":
        raise ValueError(f"sampler={sampler!r}: ddim or ddpm")
    if not 1 <= (steps or 0) <= T:
        raise ValueError(f"ddim steps={steps}: 1..{T}")
    ts = torch.linspace(T - 1, 0, steps).round().long().tolist()
    for i, t in enumerate(ts):
        eps = _guided_eps(model, x, t, cond, uncond, guidance)
        ab = model.abar[t]
        ab_prev = model.abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()                 # consistent with the clipped x0
        sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0 and i + 1 < len(ts):
            x = x + sigma * torch.randn(x.shape, generator=generator)
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) in [-1, 1] -> (B, S, S, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


@torch.no_grad()
def generate(model: TextToImage, vocab: list[str], prompts: list[str], steps: int = 25, guidance: float = 3.0,
             sampler: Literal["ddim", "ddpm"] = "ddim", eta: float = 0.0, seed: int = 0,
             batch_size: int = 64) -> torch.Tensor:
    """The one entry point for callers (evaluation, the server): prompts -> uint8 images (N, S, S, 3).
    Seeded: the same (prompts, settings, seed) give the same images."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = encode_captions(prompts[i:i + batch_size], vocab, model.config.text_config().max_len)
        out.append(to_uint8(sample(model, ids, steps, guidance, eta, sampler, g)))
    return torch.cat(out) if out else torch.zeros((0, model.config.image_size, model.config.image_size, 3),
                                                   dtype=torch.uint8)
