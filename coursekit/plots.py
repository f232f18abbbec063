"""Plots used across chapters: attention maps and training curves."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=float)


def attention_heatmap(weights, query_labels: Sequence[str] | None = None,
                      key_labels: Sequence[str] | None = None, title: str = "attention weights",
                      ax=None, xlabel: str = "key position", ylabel: str = "query position"):
    """Show a (queries x keys) attention matrix; rows are queries, columns keys."""
    w = _as_numpy(weights)
    if w.ndim != 2:
        raise ValueError(f"attention_heatmap expects a 2-D (queries, keys) matrix, got shape {w.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(0.45 * w.shape[1] + 2, 0.45 * w.shape[0] + 1.2))
    im = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=max(1e-9, float(w.max())))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if key_labels is not None:
        ax.set_xticks(range(len(key_labels)), labels=list(key_labels))
    if query_labels is not None:
        ax.set_yticks(range(len(query_labels)), labels=list(query_labels))
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return ax


def loss_curve(losses: Sequence[float], title: str = "training loss", ax=None, label: str | None = None,
               ylabel: str = "loss"):
    """Plot a training curve against the step number (log-scaled y when it spans >1 decade)."""
    y = _as_numpy(list(losses))
    if y.size == 0:
        raise ValueError("loss_curve got an empty list of losses")
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    ax.plot(np.arange(1, y.size + 1), y, label=label)
    if np.all(y > 0) and y.max() / y.min() > 10:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if label:
        ax.legend()
    return ax
