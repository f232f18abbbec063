"""Captions for the digits, generated from their labels, and a tiny word tokenizer (chapters 10-11).

Every caption is a template with the digit's name filled in ("a handwritten seven"). The training
templates and the held-out templates are disjoint, and the held-out ones use words that never appear
in training, so a zero-shot classifier built from held-out prompts is tested on phrasings the text
encoder has not seen. The tokenizer's vocabulary comes from the training captions only; other words
become ``[UNK]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from coursekit.digits import NAMES

TRAIN_TEMPLATES = (
    "a photo of the digit {}",
    "a handwritten {}",
    "the number {}",
    "a picture of a {}",
    "an image of the number {}",
    "a drawing of a {}",
    "a {} written by hand",
    "this is a {}",
)
HELD_OUT_TEMPLATES = (
    "a scan of the digit {}",
    "a blurry photo of a {}",
    "the handwritten number {}",
    "a {} drawn in ink",
    "an image showing a {}",
)

PAD, UNK = "[PAD]", "[UNK]"


def _check_template(template: str) -> None:
    if template.count("{}") != 1:
        raise ValueError(f"a template needs exactly one '{{}}' for the digit's name, got {template!r}")


def caption(label: int, template: str) -> str:
    """The caption of digit ``label`` (0-9) in one template: ``caption(7, "a handwritten {}")``."""
    _check_template(template)
    if not 0 <= int(label) < len(NAMES):
        raise ValueError(f"label must be a digit 0-9, got {label}")
    return template.format(NAMES[int(label)])


def random_captions(labels: torch.Tensor | Sequence[int], templates: Sequence[str] = TRAIN_TEMPLATES,
                    generator: torch.Generator | None = None) -> list[str]:
    """One caption per label, each in a template drawn at random."""
    if not templates:
        raise ValueError("need at least one template")
    labels = [int(y) for y in labels]
    choice = torch.randint(0, len(templates), (len(labels),), generator=generator).tolist()
    return [caption(y, templates[t]) for y, t in zip(labels, choice)]


def class_prompts(templates: Sequence[str] = HELD_OUT_TEMPLATES, n_classes: int = 10) -> list[list[str]]:
    """``prompts[k][m]``: class ``k``'s caption in template ``m`` (for a zero-shot classifier)."""
    if not templates:
        raise ValueError("need at least one template")
    return [[caption(k, t) for t in templates] for k in range(n_classes)]


class WordTokenizer:
    """Lower-cased words split on spaces <-> ids. Id 0 is ``[PAD]``, id 1 ``[UNK]`` (any word that was
    not in the texts the vocabulary was built from); the other words are numbered in sorted order."""

    def __init__(self, texts: Sequence[str], max_len: int = 12):
        words = sorted({w for t in texts for w in t.lower().split()})
        if not words:
            raise ValueError("WordTokenizer needs at least one word to build its vocabulary")
        if max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}")
        self.words = [PAD, UNK, *words]
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.max_len = max_len

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, 1) for w in text.lower().split()]

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, key_mask)``, both ``(len(texts), max_len)``; the key mask is True at real tokens and
        False at padding (the course's convention, True = may attend)."""
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        rows = [self.encode(t) for t in texts]
        too_long = [t for t, r in zip(texts, rows) if len(r) > self.max_len or not r]
        if too_long:
            raise ValueError(f"texts must have 1 to {self.max_len} words, got {too_long[:3]!r}")
        ids = torch.zeros(len(rows), self.max_len, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids != 0

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return " ".join(self.words[i] for i in ids if i != 0)


def train_vocabulary(templates: Sequence[str] = TRAIN_TEMPLATES) -> list[str]:
    """Every training caption (all classes in all templates): the texts to build the tokenizer from."""
    return [c for row in class_prompts(templates) for c in row]
