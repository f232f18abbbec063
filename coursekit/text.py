"""A tiny English corpus generated in code and a character-level tokenizer (nothing is downloaded).

The corpus is made of short sentences from a small grammar with fixed facts: every thing has one
colour ("the grass is green.", "ben paints the green grass."). A language model trained on it for a
minute learns to spell the words and to complete ``"the grass is"`` with ``" green."``, so what it
generates can be checked: :func:`fact_accuracy` and :func:`word_fraction` measure it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import torch

COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "sun": "yellow",
           "coal": "black", "rose": "red", "plum": "purple", "fox": "orange"}
NAMES = ("anna", "ben", "carla", "dev", "emma", "farid", "gus", "hana")
VERBS = ("sees", "likes", "paints", "finds", "wants", "draws")
LEXICON = frozenset({"the", "is", *COLOURS, *COLOURS.values(), *NAMES, *VERBS})


def sentence(rng: random.Random) -> str:
    """One sentence of the grammar."""
    thing = rng.choice(list(COLOURS))
    if rng.random() < 0.4:
        return f"the {thing} is {COLOURS[thing]}."
    return f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {COLOURS[thing]} {thing}."


def make_corpus(n_sentences: int = 4000, seed: int = 0) -> str:
    """``n_sentences`` sentences separated by single spaces (about 25 characters each)."""
    if not isinstance(n_sentences, int) or n_sentences < 1:
        raise ValueError(f"n_sentences must be a positive integer, got {n_sentences!r}")
    rng = random.Random(seed)
    return " ".join(sentence(rng) for _ in range(n_sentences))


class CharTokenizer:
    """Characters <-> integer ids; the vocabulary is the sorted set of characters of ``text``."""

    def __init__(self, text: str):
        if not text:
            raise ValueError("CharTokenizer needs a non-empty text to build its vocabulary")
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.LongTensor:
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {unknown!r}")
        return torch.tensor([self.stoi[c] for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D sequence of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return "".join(self.chars[i] for i in ids)


def random_windows(data: torch.Tensor, batch_size: int, length: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of a 1-D token stream: inputs (B, length) and next-token targets (B, length)."""
    if data.dim() != 1:
        raise ValueError(f"data must be a 1-D token stream, got shape {tuple(data.shape)}")
    if batch_size < 1 or length < 1:
        raise ValueError(f"batch_size and length must be positive, got {batch_size}, {length}")
    if data.numel() < length + 1:
        raise ValueError(f"a window of {length} + 1 tokens does not fit in {data.numel()} tokens")
    starts = torch.randint(0, data.numel() - length, (batch_size,), generator=generator)
    offsets = torch.arange(length + 1)
    windows = data[starts[:, None] + offsets]
    return windows[:, :-1], windows[:, 1:]


def word_fraction(text: str) -> float:
    """The fraction of the words of ``text`` that belong to the grammar (0 for no words)."""
    words = re.findall(r"[a-z]+", text)
    return sum(w in LEXICON for w in words) / len(words) if words else 0.0


def fact_prompts() -> list[tuple[str, str]]:
    """``("the sky is", " blue.")`` pairs: a prompt and the continuation a trained model should give."""
    return [(f"the {thing} is", f" {colour}.") for thing, colour in COLOURS.items()]


def fact_accuracy(completions: Sequence[str]) -> float:
    """The fraction of ``completions`` (continuations of :func:`fact_prompts`, in order) that are right."""
    pairs = fact_prompts()
    if len(completions) != len(pairs):
        raise ValueError(f"expected {len(pairs)} completions, one per fact prompt, got {len(completions)}")
    return sum(c.startswith(answer) for c, (_, answer) in zip(completions, pairs)) / len(pairs)
