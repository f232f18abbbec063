"""A word-piece tokenizer for the digit captions, with word ids for whole-word masking (chapter 11).

BERT's WordPiece tokenizer cuts rare words into pieces and marks every piece after the first with
``##`` ("handwritten" -> ``hand ##written``). Masked language modelling then has a shortcut: mask only
``##written`` and the model reads it off ``hand``. **Whole-word masking** masks every piece of a word
together, so a masked word must be inferred from its context -- in a vision-and-language model, from
the image.

The real MiniLM tokenizer keeps all ten digit names whole ("seven" is one piece), so on our captions it
would make whole-word masking moot exactly where it matters. :class:`PieceTokenizer` therefore cuts
words in a fixed, deterministic way: into pieces of at most ``piece_len`` characters, the first plain,
the rest ``##``-prefixed (with the default 3: ``seven`` -> ``sev ##en``, ``two`` -> ``two``; seven of the
ten digit names have two pieces). Every encoded caption starts with ``[CLS]``; alongside the ids it
returns the key mask (True at real tokens) and the **word ids**: the index of the word each piece
belongs to (0, 1, ... within the caption), -1 at ``[CLS]`` and at padding -- the layout of
``transformers``' ``word_ids`` with -1 for None.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PAD, UNK, CLS, MASK = "[PAD]", "[UNK]", "[CLS]", "[MASK]"
SPECIALS = (PAD, UNK, CLS, MASK)

__all__ = ["CLS", "MASK", "PAD", "SPECIALS", "UNK", "PieceTokenizer", "split_word"]


def split_word(word: str, piece_len: int = 3) -> list[str]:
    """``word`` cut into pieces of at most ``piece_len`` characters, continuations marked ``##``:
    ``split_word("seven") == ["sev", "##en"]``."""
    if not isinstance(piece_len, int) or piece_len < 1:
        raise ValueError(f"piece_len must be a positive integer, got {piece_len!r}")
    if not word or any(c.isspace() for c in word):
        raise ValueError(f"split_word needs one non-empty word without spaces, got {word!r}")
    chunks = [word[i:i + piece_len] for i in range(0, len(word), piece_len)]
    return [chunks[0], *("##" + c for c in chunks[1:])]


class PieceTokenizer:
    """Lower-cased words, each cut by :func:`split_word`, <-> ids. Ids 0-3 are ``[PAD]``, ``[UNK]``,
    ``[CLS]``, ``[MASK]``; the pieces of ``texts`` follow in sorted order. A piece not seen in ``texts``
    becomes ``[UNK]``."""

    def __init__(self, texts: Sequence[str], max_len: int = 16, piece_len: int = 3):
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        pieces = sorted({p for t in texts for w in t.lower().split() for p in split_word(w, piece_len)})
        if not pieces:
            raise ValueError("PieceTokenizer needs at least one word to build its vocabulary")
        if not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len must be an integer >= 2 ([CLS] and one piece), got {max_len!r}")
        self.pieces = [*SPECIALS, *pieces]
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.max_len = max_len
        self.piece_len = piece_len

    pad_id = 0
    unk_id = 1
    cls_id = 2
    mask_id = 3

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def tokenize(self, text: str) -> list[str]:
        """The pieces of one text (without ``[CLS]``)."""
        return [p for w in text.lower().split() for p in split_word(w, self.piece_len)]

    def _encode(self, text: str) -> tuple[list[int], list[int]]:
        ids, words = [self.cls_id], [-1]
        for k, w in enumerate(text.lower().split()):
            for p in split_word(w, self.piece_len):
                ids.append(self.ids.get(p, self.unk_id))
                words.append(k)
        return ids, words

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids, key_mask, word_ids)``, each ``(len(texts), max_len)``: ``[CLS]`` first, padding at the
        end; the key mask is True at real tokens ([CLS] included); word ids are -1 at ``[CLS]`` and
        padding."""
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        rows = [self._encode(t) for t in texts]
        bad = [t for t, (r, _) in zip(texts, rows) if len(r) > self.max_len or len(r) < 2]
        if bad:
            raise ValueError(f"texts must have 1 to {self.max_len - 1} pieces, got {bad[:3]!r}")
        ids = torch.full((len(rows), self.max_len), self.pad_id, dtype=torch.long)
        word_ids = torch.full((len(rows), self.max_len), -1, dtype=torch.long)
        for i, (r, w) in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            word_ids[i, : len(w)] = torch.tensor(w)
        return ids, ids != self.pad_id, word_ids

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Pieces joined back into words (``##`` continuations glued on); padding dropped."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        out: list[str] = []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"id {i} is out of range [0, {self.vocab_size})")
            if i == self.pad_id:
                continue
            piece = self.pieces[i]
            if piece.startswith("##") and out and out[-1] not in SPECIALS:
                out[-1] += piece[2:]
            else:
                out.append(piece)
        return " ".join(out)
