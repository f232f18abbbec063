"""Unit tests of coursekit.seq2seq_data: the numbers-to-words task and the tiny scoring model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from coursekit import seq2seq_data as sd


@pytest.mark.parametrize("n, american, british", [
    (0, "zero", "zero"),
    (7, "seven", "seven"),
    (13, "thirteen", "thirteen"),
    (40, "forty", "forty"),
    (99, "ninety nine", "ninety nine"),
    (100, "one hundred", "one hundred"),
    (105, "one hundred five", "one hundred and five"),
    (310, "three hundred ten", "three hundred and ten"),
    (1000, "one thousand", "one thousand"),
    (1017, "one thousand seventeen", "one thousand seventeen"),
    (4207, "four thousand two hundred seven", "four thousand two hundred and seven"),
    (90000, "ninety thousand", "ninety thousand"),
    (999999, "nine hundred ninety nine thousand nine hundred ninety nine",
     "nine hundred and ninety nine thousand nine hundred and ninety nine"),
])
def test_number_to_words(n, american, british):
    assert " ".join(sd.number_to_words(n)) == american
    assert " ".join(sd.number_to_words(n, british=True)) == british
    assert sd.valid_renderings(n) == {american, british}


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1_000_000, ValueError), (3.0, TypeError),
                                        (True, TypeError)])
def test_number_to_words_rejects(bad, error):
    with pytest.raises(error):
        sd.number_to_words(bad)


def test_every_word_is_in_the_vocabulary():
    words = {w for n in range(0, 1_000_000, 7) for w in sd.number_to_words(n, british=n % 2 == 0)}
    assert words <= set(sd.TGT_VOCAB)
    assert sd.TGT_VOCAB[:3] == ("<pad>", "<bos>", "<eos>") and (sd.PAD, sd.BOS, sd.EOS) == (0, 1, 2)


def test_max_lengths():
    assert sd.max_lengths(10_000) == (4, 8)  # e.g. "seven thousand seven hundred and seventy seven" + EOS
    assert sd.max_lengths(100) == (2, 3)
    with pytest.raises(ValueError):
        sd.max_lengths(0)


def test_encode_numbers_layout_and_round_trip():
    src, tgt = sd.encode_numbers([4207, 0, 17], 4, 8)
    assert src.dtype == tgt.dtype == torch.long and src.shape == (3, 4) and tgt.shape == (3, 8)
    assert src[0].tolist() == [5, 3, 1, 8] and src[1].tolist() == [1, 0, 0, 0]
    assert [sd.decode_digits(s) for s in src] == ["4207", "0", "17"]
    assert [sd.decode_words(t) for t in tgt] == ["four thousand two hundred seven", "zero", "seventeen"]
    assert tgt[2].tolist() == [sd.TGT_VOCAB.index("seventeen"), sd.EOS] + [sd.PAD] * 6


def test_encode_numbers_styles():
    g = torch.Generator().manual_seed(0)
    _, tgt = sd.encode_numbers([105] * 200, 3, 5, british_prob=0.5, generator=g)
    texts = [sd.decode_words(t) for t in tgt]
    assert set(texts) == {"one hundred five", "one hundred and five"}
    assert 60 < texts.count("one hundred and five") < 140
    _, always = sd.encode_numbers([105], 3, 5, british_prob=1.0)
    assert sd.decode_words(always[0]) == "one hundred and five"


@pytest.mark.parametrize("kwargs, match", [
    ({"numbers": [12345], "src_len": 4, "tgt_len": 8}, "src_len"),
    ({"numbers": [], "src_len": 4, "tgt_len": 8}, "at least one"),
    ({"numbers": [5], "src_len": 4, "tgt_len": 8, "british_prob": 1.5}, "british_prob"),
])
def test_encode_numbers_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sd.encode_numbers(**kwargs)


def test_split_numbers_is_a_partition():
    train, test = sd.split_numbers(500, 100, torch.Generator().manual_seed(0))
    assert len(test) == 100 and len(train) == 400
    assert sorted(torch.cat([train, test]).tolist()) == list(range(500))
    with pytest.raises(ValueError):
        sd.split_numbers(10, 10)


def test_tiny_scorer_gives_log_probabilities():
    scorer = sd.TinyScorer(7, 4, batch_size=3, generator=torch.Generator().manual_seed(0))
    prefix = torch.tensor([[sd.BOS, 3, 4], [sd.BOS, 5, 6], [sd.BOS, 3, 4]])
    lp = scorer(prefix)
    assert lp.shape == (3, 7)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(3))
    assert torch.isinf(lp[:, [sd.PAD, sd.BOS]]).all() and torch.isfinite(lp[:, 2:]).all()
    assert not torch.allclose(lp[0], lp[2]), "rows must differ: each row has its own context"
    assert not torch.allclose(lp[0], scorer(prefix[:, :2])[0]), "the output must depend on the prefix length"


def test_single_context_scorer_broadcasts_over_rows():
    scorer = sd.TinyScorer(6, 3, generator=torch.Generator().manual_seed(1))
    one = scorer(torch.tensor([[sd.BOS, 3]]))
    many = scorer(torch.tensor([[sd.BOS, 3], [sd.BOS, 4], [sd.BOS, 3]]))
    assert torch.allclose(many[0], one[0]) and torch.allclose(many[2], one[0])


@pytest.mark.parametrize("seed", range(4))
def test_brute_force_matches_plain_enumeration(seed):
    V, L = 6, 4
    scorer = sd.TinyScorer(V, L, generator=torch.Generator().manual_seed(seed))
    best, best_score = sd.brute_force_best(scorer, V, L)
    words = [v for v in range(3, V)]
    candidates = []
    for length in range(1, L + 1):
        for body in itertools.product(words, repeat=length - 1):
            candidates.append(list(body) + [sd.EOS])
            if length == L:
                candidates += [list(body) + [w] for w in words]
    scores = [sd.sequence_log_prob(scorer, seq) for seq in candidates]
    i = max(range(len(scores)), key=scores.__getitem__)
    assert best == candidates[i] and math.isclose(best_score, scores[i], abs_tol=1e-5)


def test_brute_force_refuses_huge_searches():
    with pytest.raises(ValueError, match="too many"):
        sd.brute_force_best(lambda prefix: None, 50, 6)
