"""The digit JUDGE: a small CNN that tells generated digits apart, and FID on its features.

Generative chapters (DDPM, Stable Diffusion, SDXL, DiT) need to *measure* their samples offline, where no
Inception network can be downloaded. The course therefore trains its own judge on scikit-learn's digits
(a few seconds on one CPU thread, cached in memory for the rest of the process) and uses it twice:

* **recognisability**: does the judge read the class the sample was asked for (``Judge.accuracy``)?
* **FID**: the Frechet distance between Gaussian fits to the judge's penultimate features of real and
  generated images (``Judge.fid``), the recipe of Heusel et al. (2017) with the judge in place of Inception.

FID numbers on these features are comparable only with each other (same judge, same image size, same
number of samples), never with published FIDs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from coursekit.digits import load_digits

__all__ = ["Judge", "JudgeNet", "frechet_distance", "gaussian_fit", "get_judge"]


class JudgeNet(nn.Module):
    """Three 3x3 convolutions with batch norm (32, 32, 64 channels), a 2x2 max-pool, a 2x2 average pool
    and a 128-wide feature layer (63k parameters). ``features(x)`` is the penultimate layer (after its ReLU): the
    space FID is computed in. Inputs are ``(N, 1, H, W)`` with pixels in [0, 1], H and W >= 8."""

    feature_dim = 128

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(64 * 2 * 2, self.feature_dim), nn.ReLU())
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def gaussian_fit(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(d,)`` and covariance ``(d, d)`` (unbiased, float64) of ``(N, d)`` feature rows."""
    f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"gaussian_fit needs an (N, d) array with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:
    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``.

    The trace of the matrix square root is computed without ``sqrtm``: with ``A = sigma1^(1/2)``
    (symmetric, from an eigendecomposition), ``sigma1 sigma2`` is similar to the symmetric PSD matrix
    ``A sigma2 A``, so ``tr((sigma1 sigma2)^(1/2))`` is the sum of the square roots of its eigenvalues."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or mu1.ndim != 1 or s1.shape != (mu1.size, mu1.size) or s2.shape != s1.shape:
        raise ValueError(f"shapes do not fit: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


@dataclass
class Judge:
    """A trained :class:`JudgeNet` for digits of one size and value range, with FID statistics of the
    real training images cached. Images passed in must use the same ``value_range``."""

    net: JudgeNet
    size: int
    value_range: tuple[float, float]
    test_accuracy: float
    train_seconds: float
    _reference: dict = field(default_factory=dict, repr=False)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"the judge expects images of shape (N, 1, {self.size}, {self.size}), "
                             f"got {getattr(images, 'shape', type(images))}")
        if tuple(images.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"this judge was trained on {self.size}x{self.size} images, got "
                             f"{tuple(images.shape[-2:])}; use get_judge(size={images.shape[-1]})")
        lo, hi = self.value_range
        x = (images.detach().float().cpu().clamp(lo, hi) - lo) / (hi - lo)  # the net sees [0, 1]
        return x

    @torch.no_grad()
    def _batched(self, fn, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
        x = self._prepare(images)
        was_training = self.net.training
        self.net.eval()
        out = torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])
        self.net.train(was_training)
        return out

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self._batched(self.net, images)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The class the judge reads in each image, ``(N,)`` int64."""
        return self.logits(images).argmax(dim=1)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """The fraction of images the judge reads as their intended label."""
        labels = torch.as_tensor(labels).cpu()
        if labels.shape != (len(images),):
            raise ValueError(f"need one label per image: {len(images)} images, labels of shape {tuple(labels.shape)}")
        return float((self.predict(images) == labels).float().mean())

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, 128)``: what FID compares."""
        return self._batched(self.net.features, images)

    def reference_stats(self, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Gaussian fit to the features of the real digits of ``split`` (cached)."""
        if split not in self._reference:
            real = load_digits(split, size=self.size, value_range=self.value_range).images
            self._reference[split] = gaussian_fit(self.features(real))
        return self._reference[split]

    def fid(self, images: torch.Tensor, reference: str = "train") -> float:
        """FID of ``images`` against the real digits of ``reference`` (default the training split)."""
        if len(images) < 2:
            raise ValueError("FID needs at least 2 images")
        mu, sigma = gaussian_fit(self.features(images))
        return frechet_distance(mu, sigma, *self.reference_stats(reference))


_CACHE: dict[tuple, Judge] = {}


def train_judge(size: int = 8, value_range: tuple[float, float] = (-1.0, 1.0), epochs: int = 8,
                seed: int = 0, verbose: bool = False) -> Judge:
    """Train a judge on the training split (AdamW, one-cycle learning rate, batches of 64) and measure
    it on the test split. Deterministic for a given seed, torch version and thread count."""
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = JudgeNet()
    train = load_digits("train", size=size, value_range=(0.0, 1.0))
    test = load_digits("test", size=size, value_range=(0.0, 1.0))
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)
    steps_per_epoch = (len(train) + 63) // 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    net.train()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(train), generator=generator)
            for i in range(0, len(train), 64):
                idx = order[i:i + 64]
                loss = F.cross_entropy(net(train.images[idx]), train.labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    judge = Judge(net, size, tuple(value_range), 0.0, 0.0)
    lo, hi = value_range
    judge.test_accuracy = judge.accuracy(test.images * (hi - lo) + lo, test.labels)
    judge.train_seconds = time.perf_counter() - start
    if verbose:
        print(f"judge: {sum(p.numel() for p in net.parameters()):,} parameters, test accuracy "
              f"{judge.test_accuracy:.3f}, trained in {judge.train_seconds:.1f} s")
    return judge


def get_judge(size: int = 8, value_range: tuple[float, float] = (-1.0, 1.0), verbose: bool = True) -> Judge:
    """The judge for ``size`` x ``size`` digits with pixels in ``value_range``: trained on first use
    (a few seconds), then cached for the rest of the process. The torch RNG state is left untouched."""
    key = (size, tuple(float(v) for v in value_range))
    if key not in _CACHE:
        with torch.random.fork_rng(devices=[]):
            _CACHE[key] = train_judge(size, key[1])
    judge = _CACHE[key]
    if verbose:
        print(f"judge for {size}x{size} digits: {sum(p.numel() for p in judge.net.parameters()):,} parameters, "
              f"test accuracy {judge.test_accuracy:.3f} (trained in {judge.train_seconds:.1f} s)")
    return judge
