"""coursekit.captions: captions from labels, disjoint held-out templates, the word tokenizer."""

from __future__ import annotations

import pytest
import torch

from coursekit.captions import (HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, WordTokenizer, caption, class_prompts,
                                random_captions, train_vocabulary)
from coursekit.digits import NAMES


def test_captions_name_the_digit():
    assert caption(7, "a handwritten {}") == "a handwritten seven"
    labels = [0, 3, 9, 3]
    captions = random_captions(torch.tensor(labels), generator=torch.Generator().manual_seed(0))
    assert all(NAMES[y] in c.split() and c.replace(NAMES[y], "{}") in TRAIN_TEMPLATES
               for y, c in zip(labels, captions))


def test_held_out_templates_are_new_phrasings():
    assert not set(TRAIN_TEMPLATES) & set(HELD_OUT_TEMPLATES)
    train_words = {w for c in train_vocabulary() for w in c.split()}
    unseen = {w for t in HELD_OUT_TEMPLATES for w in t.format("").split()} - train_words
    assert unseen, "some held-out words must be new to the text encoder"


def test_class_prompts_layout():
    prompts = class_prompts(HELD_OUT_TEMPLATES)
    assert len(prompts) == 10 and all(len(row) == len(HELD_OUT_TEMPLATES) for row in prompts)
    assert prompts[4][0] == HELD_OUT_TEMPLATES[0].format("four")


def test_tokenizer_round_trip_padding_and_unknown_words():
    tok = WordTokenizer(train_vocabulary(), max_len=8)
    ids, key_mask = tok(["a handwritten seven", "a scan of the digit two"])
    assert ids.shape == key_mask.shape == (2, 8) and ids.dtype == torch.long and key_mask.dtype == torch.bool
    assert key_mask.tolist()[0] == [True] * 3 + [False] * 5  # True at real tokens
    assert tok.decode(ids[0]) == "a handwritten seven"
    assert tok.decode(ids[1]) == "a [UNK] of the digit two"
    assert (ids[~key_mask] == 0).all() and (ids[key_mask] != 0).all()
    assert tok.vocab_size == len({w for c in train_vocabulary() for w in c.split()}) + 2


@pytest.mark.parametrize("call, message", [
    (lambda: caption(10, "a {}"), "label"),
    (lambda: caption(1, "no slot"), "exactly one"),
    (lambda: WordTokenizer(["a b"], max_len=2)(["a b c"]), "1 to 2 words"),
    (lambda: WordTokenizer(["a"])("a"), "list of texts"),
    (lambda: WordTokenizer([]), "at least one word"),
])
def test_bad_input_gets_clear_errors(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
