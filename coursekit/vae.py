"""A tiny variational autoencoder that compresses 8x8 digits to 2x2x4 latents (Stable Diffusion's first stage).

``TinyVAE.encode(x)`` gives the mean and log-variance of a diagonal Gaussian over latents ``(B, 4, 2, 2)``
(two stride-2 convolutions: a factor of 4 per side, 64 pixels -> 16 numbers); ``decode(z)`` maps a latent
back to an image. Chapter 13 trains it with the students' reparameterisation and loss; later chapters
(SDXL, DiT) take a trained one from :func:`get_vae` (trained on first use in a few seconds, cached in
memory per process) and run diffusion on ``scale * mean`` latents, like Stable Diffusion's ``0.18215``.

The posterior's conventions are diffusers' ``DiagonalGaussianDistribution``: the log-variance is clamped
to [-30, 20]; the KL to N(0, I) is summed over every latent element of an image.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from coursekit.digits import load_digits

__all__ = ["TinyVAE", "TrainedVAE", "get_vae", "gaussian_kl", "reparameterize", "train_vae", "vae_loss"]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class TinyVAE(nn.Module):
    """Encoder: 3x3 convolutions at 8x8 (32 channels), 4x4 and 2x2 (``width`` channels, stride 2), then a
    1x1 convolution to ``2 * latent_channels`` (mean and log-variance). Decoder: the mirror image, with
    nearest-neighbour upsampling. ~60k parameters for ``width=32``."""

    def __init__(self, in_channels: int = 1, latent_channels: int = 4, width: int = 32):
        super().__init__()
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * latent_channels, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1), nn.SiLU(), nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.Upsample(scale_factor=2),
            nn.Conv2d(width, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, in_channels, 3, padding=1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, logvar)``, each ``(B, latent_channels, H/4, W/4)``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"expected images (B, {self.in_channels}, H, W) with H and W divisible by 4, "
                             f"got {tuple(x.shape)}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(z)


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``mean + exp(logvar / 2) * noise`` with the log-variance clamped to [-30, 20] (diffusers)."""
    return mean + torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)) * noise


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per example ``(B,)``, summed over the other axes."""
    logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
    return 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def vae_loss(x: torch.Tensor, reconstruction: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Per-image sum of squared errors plus ``beta`` times the per-image KL, averaged over the batch."""
    return ((reconstruction - x) ** 2).flatten(1).sum(1).mean() + beta * gaussian_kl(mean, logvar).mean()


@dataclass
class TrainedVAE:
    """A trained :class:`TinyVAE` with the factor that gives its latent means unit standard deviation."""

    vae: TinyVAE
    scale: float
    test_mse: float
    train_seconds: float

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latent means ``scale * mean`` (what a latent diffusion model is trained on)."""
        return self.vae.encode(images)[0] * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images from scaled latents, clamped to [-1, 1]."""
        return self.vae.decode(latents / self.scale).clamp(-1.0, 1.0)


def train_vae(steps: int = 600, batch: int = 64, lr: float = 6e-3, beta: float = 0.01, seed: int = 0,
              width: int = 32) -> TrainedVAE:
    """Train a :class:`TinyVAE` on the 8x8 training digits in [-1, 1] (Adam, cosine learning-rate decay)."""
    start = time.perf_counter()
    train = load_digits("train", size=8, value_range=(-1.0, 1.0))
    test = load_digits("test", size=8, value_range=(-1.0, 1.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = TinyVAE(width=width)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    with torch.enable_grad():
        for step in range(steps):
            x = train.images[torch.randint(0, len(train), (batch,), generator=generator)]
            mean, logvar = vae.encode(x)
            z = reparameterize(mean, logvar, torch.randn(mean.shape, generator=generator))
            loss = vae_loss(x, vae.decode(z), mean, logvar, beta)
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        scale = 1.0 / float(vae.encode(train.images)[0].std())
        test_mse = float(F.mse_loss(vae.decode(vae.encode(test.images)[0]), test.images))
    return TrainedVAE(vae, scale, test_mse, time.perf_counter() - start)


_CACHE: dict[tuple, TrainedVAE] = {}


def get_vae(verbose: bool = True, **options) -> TrainedVAE:
    """A trained VAE for 8x8 digits (trained on first use, a few seconds; cached for the process).
    The caller's torch random state is left untouched."""
    key = tuple(sorted(options.items()))
    if key not in _CACHE:
        with torch.random.fork_rng(devices=[]):
            _CACHE[key] = train_vae(**options)
    trained = _CACHE[key]
    if verbose:
        print(f"VAE 8x8 -> 4x2x2: {sum(p.numel() for p in trained.vae.parameters()):,} parameters, test MSE per pixel "
              f"{trained.test_mse:.4f}, latent scale {trained.scale:.3f} (trained in {trained.train_seconds:.1f} s)")
    return trained
