"""Tasks of chapter 17, one tower vs two towers: inputs, calls and rules (what the grading sandbox sees).

Conventions (stated in the notebook): token ids are right-padded with ``pad_id`` (0); an attention
mask is 1 at real tokens and 0 at padding; embeddings are rows ``(N, D)``.

The pair inputs use all-MiniLM-L6-v2's special ids (``[CLS]`` = 101, ``[SEP]`` = 102, ``[PAD]`` = 0)
and word ids from its vocabulary, so that the checks can compare with that tokenizer's own pairs. The
bi-encoder task builds a small random :class:`coursekit.matching.TokenEncoder` from the case's seed.
"""

from __future__ import annotations

import math

import torch

from autograders.engine.core import Case, Require, Task, TaskSet, randn
from coursekit import matching

CHAPTER = "17_text_matching"
CLS_ID, SEP_ID, PAD_ID = 101, 102, 0

# Ids of all-MiniLM-L6-v2's vocabulary that are whole lower-case words (each tokenizes to itself).
WORD_IDS = (
    2001, 2097, 2180, 2266, 2352, 2438, 2525, 2621, 2710, 2792, 2881, 2965, 3047, 3134, 3225, 3314,
    3409, 3498, 3585, 3667, 3755, 3844, 3933, 4026, 4111, 4198, 4287, 4374, 4460, 4553, 4650, 4744,
    4844, 4943, 5030, 5120, 5214, 5299, 5390, 5476, 5572, 5674, 5766, 5863, 5952, 6037, 6127, 6232,
    6328, 6430, 6537, 6638, 6733, 6830, 6928, 7019, 7112, 7198, 7288, 7386, 7479, 7575, 7684, 7790,
    7896, 7994, 8103, 8212, 8301, 8399, 8495, 8604, 8703, 8806, 8901, 9005, 9106, 9198, 9294, 9393,
    9480, 9573, 9672, 9767, 9862, 9958, 10046, 10148, 10245, 10348, 10442, 10549, 10650, 10752, 10851, 10949,
    11048, 11146, 11243, 11345, 11435, 11545, 11646, 11742, 11842, 11940, 12029, 12133, 12238, 12343, 12454, 12553,
    12657, 12759, 12864, 12974, 13067, 13171, 13263, 13363, 13467, 13560, 13659, 13771, 13868, 13968, 14070, 14182,
    14290, 14397, 14496, 14610, 14723, 14829, 14936, 15043, 15138, 15244, 15348, 15466, 15579, 15688, 15795, 15887,
    15989, 16105, 16208, 16312, 16439, 16559, 16660, 16763, 16861, 16982, 17097, 17203, 17326, 17445, 17538, 17645,
    17750, 17853, 17967, 18064, 18187, 18288, 18391, 18500, 18614, 18740, 18848, 18961, 19063, 19178, 19294, 19401,
    19509, 19614, 19725, 19838, 19957, 20076, 20193, 20308, 20424, 20532, 20658, 20777, 20914, 21038, 21146, 21271,
    21384, 21495, 21623, 21732, 21862, 21965, 22076, 22185, 22295, 22412, 22528, 22645, 22767, 22883, 23013, 23142,
    23252, 23376, 23481, 23601, 23713, 23832, 23954, 24057, 24195, 24321, 24444, 24557, 24685, 24801, 24927, 25043,
    25159, 25276, 25386, 25513, 25653, 25774, 25901, 26019, 26128, 26258, 26383, 26489, 26603, 26731, 26841, 26939,
    27060, 27183, 27302, 27434, 27555, 27690, 27820, 27962, 28105, 28249, 28374, 28496, 28629, 28750, 28862, 29003,
)


# ---------------------------------------------------------------------------------------------
# 1. the cross-encoder's paired input

def _padded(g: torch.Generator, lengths: list[int], width: int | None = None) -> torch.Tensor:
    width = width or max(lengths)
    ids = torch.full((len(lengths), width), PAD_ID, dtype=torch.long)
    pick = torch.randint(0, len(WORD_IDS), (len(lengths), width), generator=g)
    words = torch.tensor(WORD_IDS)[pick]
    for i, n in enumerate(lengths):
        ids[i, :n] = words[i, :n]
    return ids


def _lengths(g: torch.Generator, B: int, low: int, high: int) -> list[int]:
    return torch.randint(low, high + 1, (B,), generator=g).tolist()


def _pair_inputs(g, B, low_a, high_a, low_b, high_b, extra_padding=0):
    la, lb = _lengths(g, B, low_a, high_a), _lengths(g, B, low_b, high_b)
    return {"a_ids": _padded(g, la, max(la) + extra_padding), "b_ids": _padded(g, lb, max(lb) + extra_padding),
            "cls_id": CLS_ID, "sep_id": SEP_ID, "pad_id": PAD_ID}


def _longest_first(g):
    la, lb = [6, 2, 4, 1], [5, 3, 1, 2]
    return {"a_ids": _padded(g, la), "b_ids": _padded(g, lb), "cls_id": CLS_ID, "sep_id": SEP_ID, "pad_id": PAD_ID}


def _call_pair_input(impl, inputs):
    out = impl(**inputs)
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise TypeError("pair_input must return (input_ids, token_type_ids, attention_mask)")
    for name, t in zip(("input_ids", "token_type_ids", "attention_mask"), out):
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point:
            raise TypeError(f"{name} must be an integer tensor")
    return tuple(t.long() for t in out)


PAIR_INPUT = Task(
    "pair_input",
    cases=(
        Case("batch 3, texts of 2-6 and 1-5 tokens", lambda g: _pair_inputs(g, 3, 2, 6, 1, 5)),
        Case("batch 4, the first row the longest on both sides", lambda g: _longest_first(g)),
        Case("batch 8, texts of 1-12 tokens", lambda g: _pair_inputs(g, 8, 1, 12, 1, 12), hidden=True),
        Case("one-token texts", lambda g: _pair_inputs(g, 3, 1, 1, 1, 1), hidden=True),
        Case("one pair", lambda g: _pair_inputs(g, 1, 4, 9, 4, 9), hidden=True),
        Case("extra padding columns in the inputs", lambda g: _pair_inputs(g, 4, 1, 6, 1, 6, extra_padding=3),
             hidden=True),
    ),
    call=_call_pair_input,
    output_names=("input_ids", "token_type_ids", "attention_mask"),
)


# ---------------------------------------------------------------------------------------------
# 2. the bi-encoder's cosine scorer

def _random_tower(g: torch.Generator, vocab: int, d: int) -> matching.TokenEncoder:
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = matching.TokenEncoder(vocab, matching.encoder_config(d_model=d, n_layers=2, n_heads=2), max_len=32)
        with torch.no_grad():
            tower.tokens.weight.mul_(3.0)       # token identity dominates: padding outputs stay far from the rest
    return tower.eval()


def _side(g, B, low, high, vocab, extra=0):
    lengths = _lengths(g, B, low, high)
    width = max(lengths) + extra
    ids = torch.full((B, width), matching.PAD, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
    return ids, (ids != matching.PAD).long()


def _bi_inputs(g, B, low, high, vocab=40, d=16, extra=0):
    tower = _random_tower(g, vocab, d)
    a_ids, a_mask = _side(g, B, low, high, vocab, extra)
    b_ids, b_mask = _side(g, B, low, high, vocab, extra)
    return {"tower": tower, "a_ids": a_ids, "a_mask": a_mask, "b_ids": b_ids, "b_mask": b_mask}


def _bi_identical(g):
    inputs = _bi_inputs(g, 3, 2, 7)
    inputs["b_ids"], inputs["b_mask"] = inputs["a_ids"].clone(), inputs["a_mask"].clone()
    return inputs


BI_SCORE = Task(
    "bi_encoder_score",
    cases=(
        Case("batch 4, texts of 2-7 tokens", lambda g: _bi_inputs(g, 4, 2, 7)),
        Case("batch 3, each pair a text with itself", _bi_identical),
        Case("batch 6, texts of 1-10 tokens, d_model=32", lambda g: _bi_inputs(g, 6, 1, 10, d=32), hidden=True),
        Case("one pair", lambda g: _bi_inputs(g, 1, 3, 8), hidden=True),
        Case("extra padding columns", lambda g: _bi_inputs(g, 4, 2, 6, extra=4), hidden=True),
    ),
    output_names=("scores",),
)


# ---------------------------------------------------------------------------------------------
# 3. top-k retrieval from a cached index, one chunk at a time

def _unit_rows(g, N, D):
    x = randn(g, N, D)
    return x / x.norm(dim=-1, keepdim=True)


def _retrieve_inputs(g, Q, N, D, k, chunk):
    return {"query_embeddings": _unit_rows(g, Q, D), "index": _unit_rows(g, N, D), "k": k, "chunk_size": chunk}


def _enough_chunks(trace, inputs) -> bool:
    chunks = math.ceil(inputs["index"].shape[0] / inputs["chunk_size"])
    return trace.count("aten.mm", "aten.bmm", "aten.addmm") >= chunks


RETRIEVE = Task(
    "retrieve",
    cases=(
        Case("3 queries, 50 documents in chunks of 16, k=4", lambda g: _retrieve_inputs(g, 3, 50, 8, 4, 16)),
        Case("2 queries, 40 documents in chunks of 10, k=5", lambda g: _retrieve_inputs(g, 2, 40, 12, 5, 10)),
        Case("k larger than a chunk", lambda g: _retrieve_inputs(g, 4, 30, 6, 8, 5), hidden=True),
        Case("one chunk holds everything", lambda g: _retrieve_inputs(g, 2, 20, 8, 3, 64), hidden=True),
        Case("1 query, 1000 documents of size 64, chunks of 128, k=10",
             lambda g: _retrieve_inputs(g, 1, 1000, 64, 10, 128), hidden=True),
        Case("k equal to the number of documents", lambda g: _retrieve_inputs(g, 3, 9, 4, 9, 4), hidden=True),
    ),
    call=lambda impl, inputs: _as_scores_and_indices(impl(**inputs), "retrieve"),
    output_names=("scores", "indices"),
    rules=(Require("score the index one chunk at a time: at least one matrix product per chunk of chunk_size "
                   "documents", _enough_chunks,
                   lambda trace, inputs: f"it made {trace.count('aten.mm', 'aten.bmm', 'aten.addmm')} matrix "
                                         f"product(s) for {math.ceil(inputs['index'].shape[0] / inputs['chunk_size'])} chunks"),),
)


def _as_scores_and_indices(out, name):
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"{name} must return (scores, indices)")
    scores, indices = out
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point:
        raise TypeError(f"{name} must return the indices as an integer tensor")
    return scores, indices


# ---------------------------------------------------------------------------------------------
# 4. re-ranking the retrieved candidates with the cross-encoder's scores

def _rerank_inputs(g, Q, k, N):
    retrieved = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(Q)])
    return {"retrieved": retrieved, "cross_scores": randn(g, Q, k, scale=3.0)}


def _call_rerank(impl, inputs):
    out = impl(**inputs)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("rerank must return (indices, scores)")
    indices, scores = out
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point:
        raise TypeError("rerank must return the indices as an integer tensor")
    return indices, scores


RERANK = Task(
    "rerank",
    cases=(
        Case("2 queries, 5 retrieved each", lambda g: _rerank_inputs(g, 2, 5, 100)),
        Case("4 queries, 10 retrieved each", lambda g: _rerank_inputs(g, 4, 10, 10_000)),
        Case("1 query, 1 retrieved", lambda g: _rerank_inputs(g, 1, 1, 50), hidden=True),
        Case("30 queries, 50 retrieved each", lambda g: _rerank_inputs(g, 30, 50, 10_000), hidden=True),
    ),
    call=lambda impl, inputs: _call_rerank(impl, inputs),
    output_names=("indices", "scores"),
)


TASKS = TaskSet(CHAPTER, [PAIR_INPUT, BI_SCORE, RETRIEVE, RERANK])
