"""scikit-learn's bundled 8x8 handwritten digits as tensors: nothing is downloaded.

The 1,797 images (values 0-16) come with scikit-learn. The course scales them to [0, 1] (or [-1, 1]
for diffusion models), optionally upsamples them, and splits them the same way everywhere: a fixed,
stratified 80/20 train/test split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CLASSES = tuple(str(d) for d in range(10))
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Digits:
    """Images ``(N, 1, size, size)`` (float32) and labels ``(N,)`` (int64) of one split."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "Digits":
        return Digits(self.images.to(device), self.labels.to(device))


def _split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(split: str = "train", size: int = 8, value_range: tuple[float, float] = (0.0, 1.0),
                test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """One split (``"train"``, ``"test"`` or ``"all"``) of the digits at ``size`` x ``size`` pixels
    (bilinear upsampling from 8x8 when ``size > 8``), pixel values mapped to ``value_range``."""
    from sklearn.datasets import load_digits as _sk_load

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if size < 8:
        raise ValueError(f"size must be at least 8 (the images are 8x8), got {size}")
    data = _sk_load()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.int64)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    lo, hi = value_range
    images = images * (hi - lo) + lo
    if split != "all":
        train, test = _split_indices(data.target, test_fraction, seed)
        idx = torch.from_numpy(train if split == "train" else test)
        images, labels = images[idx], labels[idx]
    return Digits(images.contiguous(), labels)
