"""Checks for chapter 18, embeddings: references, tolerances, classic mistakes.

The references are sentence-transformers' own code, the code behind ``SentenceTransformer.encode``
and its search helpers:

* ``mean_pool``      -- ``sentence_transformers.sentence_transformer.modules.Pooling(D, "mean")``
  applied to ``{"token_embeddings", "attention_mask"}``, the module all-MiniLM-L6-v2 uses;
* ``l2_normalize``   -- ``sentence_transformers.base.modules.Normalize`` (``F.normalize(p=2, dim=-1)``;
  the hidden case with another ``eps`` uses ``F.normalize`` with that eps);
* ``cosine_similarity_matrix`` -- ``sentence_transformers.util.cos_sim``;
* ``top_k``          -- ``sentence_transformers.util.semantic_search`` (cosine, best first);
* ``spearman``       -- ``scipy.stats.spearmanr`` (average ranks for ties), the statistic
  sentence-transformers' ``EmbeddingSimilarityEvaluator`` reports on STS benchmarks.

sentence-transformers is imported on first use only: it takes seconds.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from autograders.engine.core import Check, CheckSet, Mistake, Tolerance
from autograders.harness import embeddings as H

CHAPTER = H.CHAPTER

POOL_TOL = Tolerance(1e-5, 1e-5, "float32 means of up to 32 token vectors; summing in another order (or "
                                 "dividing before summing) moves the result by ~1e-7 relative")
UNIT_TOL = Tolerance(1e-6, 1e-5, "float32 unit vectors and cosines in [-1, 1]; another correct order of the "
                                 "sums over up to 384 features differs by ~1e-7")
SEARCH_TOL = Tolerance(1e-5, 1e-5, "cosine scores in float32 (~1e-7 apart between correct orders of the sums); "
                                   "indices are integers and must be equal (random scores have no ties)")
RANK_TOL = Tolerance(1e-5, 1e-5, "a correlation in [-1, 1]; float32 ranks and sums of a few hundred terms "
                                 "are exact to ~1e-7")


@functools.cache
def _st():
    """sentence-transformers' modules and helpers (imported once, on first use)."""
    from sentence_transformers.base.modules import Normalize
    from sentence_transformers.sentence_transformer.modules import Pooling
    from sentence_transformers.util import cos_sim, semantic_search

    return Pooling, Normalize, cos_sim, semantic_search


# ---------------------------------------------------------------------------------------------
# 1. masked mean pooling

def _pool_ref(inputs):
    Pooling = _st()[0]
    x = inputs["token_embeddings"]
    pooling = Pooling(x.shape[-1], pooling_mode="mean")
    return pooling({"token_embeddings": x, "attention_mask": inputs["attention_mask"]})["sentence_embedding"]


def _pool_plain_mean(token_embeddings, attention_mask):
    return token_embeddings.mean(dim=1)


def _pool_cls(token_embeddings, attention_mask):
    return token_embeddings[:, 0]


def _pool_sum(token_embeddings, attention_mask):
    return (token_embeddings * attention_mask[..., None].to(token_embeddings.dtype)).sum(dim=1)


def _pool_divide_by_T(token_embeddings, attention_mask):
    return _pool_sum(token_embeddings, attention_mask) / token_embeddings.shape[1]


def _pool_inverted(token_embeddings, attention_mask):
    m = 1.0 - attention_mask[..., None].to(token_embeddings.dtype)
    return (token_embeddings * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _pool_max(token_embeddings, attention_mask):
    m = attention_mask[..., None].bool()
    return token_embeddings.masked_fill(~m, float("-inf")).max(dim=1).values


def _pool_normalised(token_embeddings, attention_mask):
    m = attention_mask[..., None].to(token_embeddings.dtype)
    return F.normalize((token_embeddings * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def _pool_first_L(token_embeddings, attention_mask):
    """Averages the first `length` positions: right only when the padding is on the right."""
    lengths = attention_mask.sum(dim=1)
    out = torch.zeros(token_embeddings.shape[0], token_embeddings.shape[2])
    for i, n in enumerate(lengths.tolist()):
        if n:
            out[i] = token_embeddings[i, :n].mean(dim=0)
    return out


MEAN_POOL = Check(
    H.MEAN_POOL,
    reference=_pool_ref,
    tolerance=POOL_TOL,
    mistakes=(
        Mistake("padding counted", _pool_plain_mean,
                "your result is the plain mean over all T positions: padding tokens have outputs too (they "
                "are not zero), so multiply by the attention mask and divide by the number of real tokens."),
        Mistake("the first token", _pool_cls,
                "your result is the output at position 0 (the [CLS] token): all-MiniLM-L6-v2 averages the "
                "outputs of all real tokens."),
        Mistake("sum, not mean", _pool_sum,
                "your result is the masked sum: divide by the number of real tokens, mask.sum(dim=1)."),
        Mistake("divided by T", _pool_divide_by_T,
                "your result divides the masked sum by T, the padded length: divide by each sentence's own "
                "number of real tokens, mask.sum(dim=1)."),
        Mistake("inverted mask", _pool_inverted,
                "your result averages the padding positions: attention_mask is 1 at real tokens and 0 at "
                "padding (the opposite of chapter 3's padding mask)."),
        Mistake("max pooling", _pool_max,
                "your result is the maximum over the tokens (max pooling): this exercise is the mean."),
        Mistake("normalised already", _pool_normalised,
                "your result is the mean normalised to length 1: mean_pool only averages; normalising is "
                "the next exercise (sentence-transformers keeps them as separate modules)."),
        Mistake("the first `length` positions", _pool_first_L,
                "your result averages the first n positions of each row (n = its number of real tokens): "
                "that is right only when padding is at the end; weight every position by the mask instead."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. L2 normalisation

def _normalize_ref(inputs):
    x, eps = inputs["x"], inputs["eps"]
    if eps == 1e-12:  # Normalize's own (F.normalize's default) eps
        Normalize = _st()[1]
        return Normalize()({"sentence_embedding": x})["sentence_embedding"]
    return F.normalize(x, p=2, dim=-1, eps=eps)


def _norm_l1(x, eps=1e-12):
    return x / x.abs().sum(dim=-1, keepdim=True).clamp(min=eps)


def _norm_squared(x, eps=1e-12):
    return x / (x * x).sum(dim=-1, keepdim=True).clamp(min=eps)


def _norm_axis0(x, eps=1e-12):
    return x / x.norm(dim=0, keepdim=True).clamp(min=eps)


def _norm_whole(x, eps=1e-12):
    return x / x.norm().clamp(min=eps)


def _norm_no_eps(x, eps=1e-12):
    return x / x.norm(dim=-1, keepdim=True)


def _norm_standardised(x, eps=1e-12):
    c = x - x.mean(dim=-1, keepdim=True)
    return c / c.norm(dim=-1, keepdim=True).clamp(min=eps)


def _norm_eps_added(x, eps=1e-12):
    return x / (x.norm(dim=-1, keepdim=True) + eps)


L2_NORMALIZE = Check(
    H.L2_NORMALIZE,
    reference=_normalize_ref,
    tolerance=UNIT_TOL,
    mistakes=(
        Mistake("L1 norm", _norm_l1,
                "your vectors are divided by the sum of absolute values (the L1 norm): divide by the "
                "Euclidean length, sqrt of the sum of squares."),
        Mistake("squared norm", _norm_squared,
                "your vectors are divided by the sum of squares: take its square root first."),
        Mistake("over axis 0", _norm_axis0,
                "your result normalises each feature over the vectors (axis 0): normalise each vector, "
                "i.e. over the last axis."),
        Mistake("one norm for the whole tensor", _norm_whole,
                "your result divides everything by one norm of the whole tensor: each vector needs its own."),
        Mistake("no eps", _norm_no_eps,
                "a zero vector gives 0/0 = NaN: divide by max(norm, eps), as F.normalize does."),
        Mistake("centred first", _norm_standardised,
                "your result subtracts each vector's mean before normalising: L2 normalisation only scales."),
        Mistake("eps added", _norm_eps_added,
                "your result divides by norm + eps: F.normalize divides by max(norm, eps), which leaves "
                "vectors longer than eps exactly unit length."),
    ),
)


def l2_normalize_given(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The grader's l2_normalize, used while the exercises that call it are checked."""
    return F.normalize(x, p=2, dim=-1, eps=eps)


# ---------------------------------------------------------------------------------------------
# 3. the cosine similarity matrix

def _cos_ref(inputs):
    return _st()[2](inputs["a"], inputs["b"])


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _cos_dot(a, b):
    return a @ b.T


def _cos_norm_a_only(a, b):
    return _unit(a) @ b.T


def _cos_wrong_axis(a, b):
    return (a / a.norm(dim=0, keepdim=True)) @ (b / b.norm(dim=0, keepdim=True)).T


def _cos_distance(a, b):
    return 1.0 - _unit(a) @ _unit(b).T


def _cos_transposed(a, b):
    return _unit(b) @ _unit(a).T


def _cos_euclid(a, b):
    return torch.cdist(_unit(a), _unit(b))


def _cos_no_eps(a, b):
    return (a @ b.T) / (a.norm(dim=-1)[:, None] * b.norm(dim=-1)[None, :])


COSINE = Check(
    H.COSINE,
    reference=_cos_ref,
    tolerance=UNIT_TOL,
    given={"l2_normalize": l2_normalize_given},
    mistakes=(
        Mistake("dot product", _cos_dot,
                "your result is the plain dot product a @ b.T: normalise both sets of vectors first, so "
                "the length of a vector does not count."),
        Mistake("only a normalised", _cos_norm_a_only,
                "your result normalises a but not b: normalise both."),
        Mistake("normalised over the wrong axis", _cos_wrong_axis,
                "your result normalises each feature (axis 0) instead of each vector (the last axis)."),
        Mistake("cosine distance", _cos_distance,
                "your result is 1 - cosine (the cosine distance): return the similarity itself."),
        Mistake("b against a", _cos_transposed,
                "your result has the rows of b and the columns of a: entry [i, j] compares a[i] with b[j]."),
        Mistake("Euclidean distance", _cos_euclid,
                "your result is the Euclidean distance between the normalised vectors: return the cosine."),
        Mistake("no eps", _cos_no_eps,
                "a zero vector gives 0/0 = NaN: use your l2_normalize (which divides by max(norm, eps))."),
    ),
)


def cosine_given(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The grader's cosine_similarity_matrix, used while top_k is checked."""
    return l2_normalize_given(a) @ l2_normalize_given(b).T


# ---------------------------------------------------------------------------------------------
# 4. top-k search

def _top_k_ref(inputs):
    semantic_search = _st()[3]
    hits = semantic_search(inputs["query_embeddings"], inputs["corpus_embeddings"], top_k=inputs["k"])
    scores = torch.tensor([[h["score"] for h in row] for row in hits], dtype=torch.float32)
    indices = torch.tensor([[h["corpus_id"] for h in row] for row in hits], dtype=torch.int64)
    return scores, indices


def _top_k_with(score_fn, largest=True, reverse=False):
    def top_k(query_embeddings, corpus_embeddings, k):
        scores = score_fn(query_embeddings, corpus_embeddings)
        values, indices = torch.topk(scores, k, dim=1, largest=largest)
        if reverse:
            values, indices = values.flip(1), indices.flip(1)
        return values, indices
    return top_k


def _top_k_sorted_by_index(query_embeddings, corpus_embeddings, k):
    values, indices = torch.topk(cosine_given(query_embeddings, corpus_embeddings), k, dim=1)
    indices, order = indices.sort(dim=1)
    return values.gather(1, order), indices


def _top_k_over_queries(query_embeddings, corpus_embeddings, k):
    scores = cosine_given(query_embeddings, corpus_embeddings)
    values, indices = torch.topk(scores.T, min(k, scores.shape[0]), dim=1)
    return values.T, indices.T


def _euclid_score(q, c):
    return -torch.cdist(q, c)


TOP_K = Check(
    H.TOP_K,
    reference=_top_k_ref,
    tolerance=SEARCH_TOL,
    given={"cosine_similarity_matrix": cosine_given},
    mistakes=(
        Mistake("least similar", _top_k_with(cosine_given, largest=False),
                "your result holds the k least similar documents: the best matches have the largest cosine."),
        Mistake("best k, worst first", _top_k_with(cosine_given, reverse=True),
                "your k documents are right but in increasing order: return the best match first."),
        Mistake("dot product", _top_k_with(lambda q, c: q @ c.T),
                "your ranking uses the dot product of unnormalised vectors, so long vectors win: rank by "
                "cosine similarity (your cosine_similarity_matrix)."),
        Mistake("Euclidean distance", _top_k_with(_euclid_score),
                "your ranking uses the Euclidean distance of unnormalised vectors: rank by cosine similarity."),
        Mistake("sorted by index", _top_k_sorted_by_index,
                "your k documents are right but listed by index: list them by score, best first."),
        Mistake("over the queries", _top_k_over_queries,
                "your result ranks queries for each document: take the top k along the documents (dim=1)."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 5. Spearman's rank correlation

def _spearman_ref(inputs):
    from scipy.stats import spearmanr

    x = inputs["x"].double().numpy()
    y = inputs["y"].double().numpy()
    return torch.tensor([spearmanr(x, y).statistic], dtype=torch.float64)  # (1,), as the task returns it


def _pearson(x, y):
    xc, yc = x - x.mean(), y - y.mean()
    return (xc * yc).sum() / (xc.norm() * yc.norm())


def _spearman_argsort_once(x, y):
    return _pearson(x.argsort().float(), y.argsort().float())


def _ordinal_ranks(v):
    return v.argsort().argsort().float()


def _spearman_ordinal(x, y):
    return _pearson(_ordinal_ranks(x), _ordinal_ranks(y))


def _average_ranks(v):
    less = (v[None, :] < v[:, None]).sum(dim=1).double()
    equal = (v[None, :] == v[:, None]).sum(dim=1).double()
    return less + (equal + 1.0) / 2.0


def _spearman_shortcut_average(x, y):
    d = _average_ranks(x) - _average_ranks(y)
    n = x.numel()
    return 1.0 - 6.0 * (d * d).sum() / (n * (n * n - 1))


SPEARMAN = Check(
    H.SPEARMAN,
    reference=_spearman_ref,
    tolerance=RANK_TOL,
    mistakes=(
        Mistake("Pearson", _pearson,
                "your result is Pearson's correlation of the values themselves: Spearman's is Pearson's "
                "correlation of their ranks."),
        Mistake("argsort is not a rank", _spearman_argsort_once,
                "your ranks come from one argsort, which gives the ORDER (the index of the smallest value "
                "first), not each value's rank: the rank of x[i] is argsort(argsort(x))[i], or count the "
                "values below it."),
        Mistake("ties ranked in order", _spearman_ordinal,
                "tied values must share the average of the ranks they occupy (scipy's 'average' method); "
                "your ranks break ties by position, so equal ratings get different ranks (the shortcut "
                "1 - 6 sum(d^2) / (n (n^2 - 1)) on such ranks gives the same wrong value)."),
        Mistake("no-ties shortcut on average ranks", _spearman_shortcut_average,
                "1 - 6 sum(d^2) / (n (n^2 - 1)) is exact only without ties, even with average ranks: "
                "compute Pearson's correlation of the ranks."),
    ),
)


CHECKS = CheckSet(CHAPTER, [MEAN_POOL, L2_NORMALIZE, COSINE, TOP_K, SPEARMAN])
check = CHECKS.check
