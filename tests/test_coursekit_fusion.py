"""coursekit.fusion: the word-piece tokenizer with word ids for whole-word masking."""

from __future__ import annotations

import pytest
import torch

from coursekit.captions import train_vocabulary
from coursekit.digits import NAMES
from coursekit.fusion import SPECIALS, PieceTokenizer, split_word


def test_split_word():
    assert split_word("seven") == ["sev", "##en"]
    assert split_word("two") == ["two"]
    assert split_word("handwritten", 4) == ["hand", "##writ", "##ten"]
    with pytest.raises(ValueError):
        split_word("two words")
    with pytest.raises(ValueError):
        split_word("seven", 0)


def test_most_digit_names_have_several_pieces():
    multi = [n for n in NAMES if len(split_word(n)) > 1]
    assert len(multi) == 7


def test_tokenizer_ids_mask_and_word_ids():
    tok = PieceTokenizer(train_vocabulary(), max_len=10)
    assert tok.pieces[:4] == list(SPECIALS) and tok.mask_id == 3 and tok.cls_id == 2
    ids, key_mask, word_ids = tok(["a handwritten seven", "this is a two"])
    assert ids.shape == key_mask.shape == word_ids.shape == (2, 10)
    assert ids.dtype == word_ids.dtype == torch.long and key_mask.dtype == torch.bool
    assert (ids[:, 0] == tok.cls_id).all()
    assert word_ids[0].tolist() == [-1, 0, 1, 1, 1, 1, 2, 2, -1, -1]
    assert key_mask[1].tolist() == [True] * 6 + [False] * 4
    assert tok.decode(ids[0]) == "[CLS] a handwritten seven"


def test_unknown_pieces_and_bad_inputs():
    tok = PieceTokenizer(["a handwritten seven"], max_len=6)
    ids, _, _ = tok(["a zebra"])
    assert tok.unk_id in ids[0].tolist()
    with pytest.raises(ValueError, match="pieces"):
        tok(["a handwritten seven seven"])
    with pytest.raises(TypeError):
        tok("a seven")
    with pytest.raises(ValueError):
        PieceTokenizer([], max_len=6)


def test_minilm_keeps_the_digit_names_whole():
    """Why the course splits words itself: BERT's vocabulary has every digit name as one piece."""
    from coursekit import minilm

    tokenizer = minilm.load_tokenizer()
    assert all(tokenizer.tokenize(name) == [name] for name in NAMES)
    assert tokenizer.tokenize("handwritten") == ["hand", "##written"]
