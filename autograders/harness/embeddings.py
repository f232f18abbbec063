"""Tasks of chapter 18, embeddings: inputs, calls and rules (what the grading sandbox sees).

Conventions (stated in the notebook): token outputs are ``(B, T, D)``; an ``attention_mask`` is
``(B, T)`` with 1 (or True) at real tokens and 0 at padding -- the convention of Hugging Face
tokenizers, the opposite of chapter 3's padding mask. Embeddings are rows: ``(N, D)``.

Every input is random and built from the case's seeded generator; no model is loaded here (the
notebook checks the same functions on the real all-MiniLM-L6-v2 outside grading).
"""

from __future__ import annotations

import torch

from autograders.engine.core import Case, Forbid, Task, TaskSet, randn

CHAPTER = "18_embeddings"


# ---------------------------------------------------------------------------------------------
# 1. masked mean pooling

def _mask(g: torch.Generator, B: int, T: int, *, left: bool = False, empty_row: bool = False,
          full_row: bool = True, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if full_row:
        lengths[0] = T                      # one sentence without padding
    if B > 1:
        lengths[-1] = min(int(lengths[-1]), max(1, T // 3))   # and one with a lot of it
    if empty_row:
        lengths[B // 2] = 0                 # nothing but padding
    positions = torch.arange(T)[None, :]
    real = positions >= (T - lengths[:, None]) if left else positions < lengths[:, None]
    return real.to(dtype)


def _pool_inputs(g, B, T, D, scale=1.0, **mask_options):
    # Token outputs at padding positions are not zero in a real model, and are not zero here.
    return {"token_embeddings": randn(g, B, T, D, scale=scale) + 0.5, "attention_mask": _mask(g, B, T, **mask_options)}


# sentence-transformers and scipy are what these checks compare with (autograders/embeddings.py); inside the
# sandbox they may not compute an exercise's answer either (Forbid(callables=...): seen however reached)
NO_SENTENCE_TRANSFORMERS = Forbid(
    "write it yourself: sentence-transformers' Pooling, Normalize, cos_sim and semantic_search (what the checks "
    "compare with) may not be called here",
    callables=("sentence_transformers.sentence_transformer.modules.pooling:Pooling.*",
               "sentence_transformers.base.modules.normalize:Normalize.*",
               "sentence_transformers.util.similarity:*", "sentence_transformers.util.retrieval:*"))
NO_SCIPY_SPEARMAN = Forbid("rank and correlate yourself: scipy's spearmanr and rankdata (what the checks compare "
                           "with) may not be called here",
                           callables=("scipy.stats._stats_py:spearmanr", "scipy.stats._stats_py:rankdata"))


MEAN_POOL = Task(
    "mean_pool",
    cases=(
        Case("batch 3, T=6, D=8, padding on the right", lambda g: _pool_inputs(g, 3, 6, 8)),
        Case("batch 2, T=5, D=4, no padding", lambda g: {"token_embeddings": randn(g, 2, 5, 4) + 0.5,
                                                         "attention_mask": torch.ones(2, 5, dtype=torch.int64)}),
        Case("batch 4, T=32, D=384 (MiniLM's width)", lambda g: _pool_inputs(g, 4, 32, 384), hidden=True),
        Case("padding on the left", lambda g: _pool_inputs(g, 3, 7, 6, left=True), hidden=True),
        Case("a boolean mask", lambda g: _pool_inputs(g, 3, 6, 5, dtype=torch.bool), hidden=True),
        Case("a row that is all padding", lambda g: _pool_inputs(g, 3, 5, 4, empty_row=True), hidden=True),
        Case("one-token sentences", lambda g: {"token_embeddings": randn(g, 2, 1, 6),
                                               "attention_mask": torch.ones(2, 1, dtype=torch.int64)}, hidden=True),
        Case("large values (x100)", lambda g: _pool_inputs(g, 2, 9, 7, scale=100.0), hidden=True),
    ),
    rules=(NO_SENTENCE_TRANSFORMERS,),
)


# ---------------------------------------------------------------------------------------------
# 2. L2 normalisation

def _rows_of_many_lengths(g, *shape, scale=1.0):
    """Vectors whose lengths differ by orders of magnitude (so an unnormalised result is far off)."""
    x = randn(g, *shape, scale=scale)
    return x * torch.exp(2.0 * randn(g, *shape[:-1], 1))


def _with_zero_row(g, N, D):
    x = _rows_of_many_lengths(g, N, D)
    x[1] = 0.0
    return {"x": x, "eps": 1e-12}


L2_NORMALIZE = Task(
    "l2_normalize",
    cases=(
        Case("5 vectors of size 8", lambda g: {"x": _rows_of_many_lengths(g, 5, 8), "eps": 1e-12}),
        Case("batch 2 x 3 tokens of size 4", lambda g: {"x": _rows_of_many_lengths(g, 2, 3, 4), "eps": 1e-12}),
        Case("a zero vector (eps keeps it finite)", lambda g: _with_zero_row(g, 4, 6), hidden=True),
        Case("one vector of size 384", lambda g: {"x": _rows_of_many_lengths(g, 1, 384), "eps": 1e-12}, hidden=True),
        Case("tiny vectors (norm ~1e-8) and eps=1e-6", lambda g: {"x": randn(g, 3, 5, scale=1e-8), "eps": 1e-6},
             hidden=True),
        Case("size 1 (every vector becomes +-1)", lambda g: {"x": randn(g, 6, 1), "eps": 1e-12}, hidden=True),
    ),
    rules=(Forbid("write the normalisation yourself: F.normalize is not allowed", functions=("normalize",)),
           NO_SENTENCE_TRANSFORMERS),
)


# ---------------------------------------------------------------------------------------------
# 3. the cosine similarity matrix

def _cos_inputs(g, N, M, D, scale=1.0):
    return {"a": _rows_of_many_lengths(g, N, D, scale=scale), "b": _rows_of_many_lengths(g, M, D, scale=scale)}


def _cos_same(g, N, D):
    a = _rows_of_many_lengths(g, N, D)
    return {"a": a, "b": a.clone()}


def _cos_zero_row(g):
    inputs = _cos_inputs(g, 3, 4, 6)
    inputs["b"][2] = 0.0
    return inputs


COSINE = Task(
    "cosine_similarity_matrix",
    cases=(
        Case("3 x 4 vectors of size 5", lambda g: _cos_inputs(g, 3, 4, 5)),
        Case("a set against itself (6 vectors of size 8)", lambda g: _cos_same(g, 6, 8)),
        Case("50 x 70 vectors of size 384", lambda g: _cos_inputs(g, 50, 70, 384), hidden=True),
        Case("one query, 9 candidates", lambda g: _cos_inputs(g, 1, 9, 16), hidden=True),
        Case("a zero vector among the candidates", _cos_zero_row, hidden=True),
        Case("large values (x1000)", lambda g: _cos_inputs(g, 4, 5, 7, scale=1000.0), hidden=True),
    ),
    rules=(Forbid("compute it from normalised vectors and one matrix product: F.cosine_similarity and "
                  "F.normalize are not allowed (call your l2_normalize)",
                  functions=("cosine_similarity", "normalize"), ops=("aten.cosine_similarity",)),
           NO_SENTENCE_TRANSFORMERS),
    uses=("l2_normalize",),
)


# ---------------------------------------------------------------------------------------------
# 4. top-k search

def _search_inputs(g, Q, N, D, k):
    return {"query_embeddings": _rows_of_many_lengths(g, Q, D),
            "corpus_embeddings": _rows_of_many_lengths(g, N, D), "k": k}


def _call_top_k(impl, inputs):
    scores, indices = impl(inputs["query_embeddings"], inputs["corpus_embeddings"], inputs["k"])
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point:
        raise TypeError("top_k must return the indices as an integer tensor")
    return scores, indices


TOP_K = Task(
    "top_k",
    cases=(
        Case("2 queries, 10 documents, k=3", lambda g: _search_inputs(g, 2, 10, 8, 3)),
        Case("4 queries, 30 documents of size 16, k=5", lambda g: _search_inputs(g, 4, 30, 16, 5)),
        Case("1 query, k=1", lambda g: _search_inputs(g, 1, 12, 6, 1), hidden=True),
        Case("k equal to the corpus size (a full ranking)", lambda g: _search_inputs(g, 3, 7, 5, 7), hidden=True),
        Case("20 queries, 500 documents of size 384, k=10", lambda g: _search_inputs(g, 20, 500, 384, 10),
             hidden=True),
        Case("more queries than documents", lambda g: _search_inputs(g, 9, 6, 4, 2), hidden=True),
    ),
    call=_call_top_k,
    output_names=("scores", "indices"),
    uses=("cosine_similarity_matrix",),
    rules=(NO_SENTENCE_TRANSFORMERS,),
)


# ---------------------------------------------------------------------------------------------
# 5. Spearman's rank correlation

def _ratings(g, n, levels=6):
    """Integer ratings 0..levels-1 as floats (many ties, as in human similarity judgements)."""
    return torch.randint(0, levels, (n,), generator=g).float()


def _scores_like(g, ratings, noise=1.0):
    return ratings / 5.0 + noise * randn(g, ratings.numel(), scale=0.3)


def _spearman_ratings(g, n, noise=1.0):
    y = _ratings(g, n)
    return {"x": _scores_like(g, y, noise), "y": y}


def _call_spearman(impl, inputs):
    rho = torch.as_tensor(impl(inputs["x"], inputs["y"]))
    if rho.numel() != 1:
        raise TypeError(f"spearman must return one number, got a tensor of shape {tuple(rho.shape)}")
    # One number as a 1-element tensor: it crosses the sandbox boundary intact (a 0-d array does not).
    return rho.reshape(1)


def _both_tied(g, n):
    y = _ratings(g, n)
    return {"x": torch.round(_scores_like(g, y) * 4) / 4, "y": y}


SPEARMAN = Task(
    "spearman",
    cases=(
        Case("8 scores without ties", lambda g: {"x": randn(g, 8), "y": randn(g, 8)}),
        Case("model scores against 20 ratings 0-5 (ties in the ratings)", lambda g: _spearman_ratings(g, 20)),
        Case("ties in both", lambda g: _both_tied(g, 30), hidden=True),
        Case("a monotone but non-linear relation", lambda g: (lambda x: {"x": x, "y": torch.exp(3 * x)})(randn(g, 15)),
             hidden=True),
        Case("negatively related, 200 pairs", lambda g: (lambda d: {"x": -d["x"], "y": d["y"]})(_spearman_ratings(g, 200, 0.5)),
             hidden=True),
        Case("two pairs", lambda g: {"x": randn(g, 2), "y": randn(g, 2)}, hidden=True),
    ),
    call=_call_spearman,
    output_names=("rho",),
    rules=(NO_SCIPY_SPEARMAN,),
)


TASKS = TaskSet(CHAPTER, [MEAN_POOL, L2_NORMALIZE, COSINE, TOP_K, SPEARMAN])
