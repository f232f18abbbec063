"""Unit tests of coursekit.text: the generated corpus, the character tokenizer and the metrics."""

import pytest
import torch

from coursekit import text


def test_corpus_is_deterministic_and_grammatical():
    a, b = text.make_corpus(200, seed=1), text.make_corpus(200, seed=1)
    assert a == b and a != text.make_corpus(200, seed=2)
    assert text.word_fraction(a) == 1.0
    for thing, colour in text.COLOURS.items():
        assert f"the {thing} is " not in a.replace(f"the {thing} is {colour}", "")


def test_tokenizer_round_trip_and_errors():
    corpus = text.make_corpus(100)
    tok = text.CharTokenizer(corpus)
    ids = tok.encode(corpus[:50])
    assert ids.dtype == torch.long and tok.decode(ids) == corpus[:50]
    assert tok.vocab_size == len(set(corpus))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("THE")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="non-empty"):
        text.CharTokenizer("")


def test_random_windows_are_shifted_by_one():
    data = torch.arange(100)
    x, y = text.random_windows(data, 4, 10, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 10) and torch.equal(y, x + 1)
    with pytest.raises(ValueError, match="does not fit"):
        text.random_windows(data, 1, 100)
    with pytest.raises(ValueError, match="1-D"):
        text.random_windows(data[None], 1, 5)


def test_metrics():
    right = [answer for _, answer in text.fact_prompts()]
    assert text.fact_accuracy(right) == 1.0
    assert text.fact_accuracy(["xx"] * len(right)) == 0.0
    with pytest.raises(ValueError, match="one per fact prompt"):
        text.fact_accuracy(right[:2])
    assert text.word_fraction("the sky zzz") == pytest.approx(2 / 3)
    assert text.word_fraction("...") == 0.0
