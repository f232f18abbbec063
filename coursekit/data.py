"""Toy data sets generated in code: nothing is downloaded."""

from __future__ import annotations

import torch


def reversal_batch(batch_size: int, length: int, vocab_size: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token sequences and their reversals: ``targets[:, i] == tokens[:, length - 1 - i]``.

    Solving it needs attention that depends on *positions*, which makes the learned attention map
    easy to read: an anti-diagonal.
    """
    if batch_size < 1 or length < 1 or vocab_size < 2:
        raise ValueError(
            f"need batch_size >= 1, length >= 1, vocab_size >= 2; got {batch_size}, {length}, {vocab_size}"
        )
    tokens = torch.randint(0, vocab_size, (batch_size, length), generator=generator)
    return tokens, tokens.flip(dims=[1])
