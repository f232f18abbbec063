"""Chapter 18: the solution passes every check; plausible wrong answers and the stubs are rejected."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from autograders import embeddings as ag
from autograders.engine.core import evaluate, make_inputs
from autograders.harness import embeddings as H
from checks_support import assert_accepts, assert_rejects
from notebook_code import load_solutions, not_implemented

sol = load_solutions(ag.CHAPTER)
NAMES = ["mean_pool", "l2_normalize", "cosine_similarity_matrix", "top_k", "spearman"]


def test_every_exercise_has_a_check_and_a_task():
    assert list(ag.CHECKS.checks) == NAMES
    assert list(H.TASKS.tasks) == NAMES
    assert all(ag.CHECKS[n].task is H.TASKS[n] for n in NAMES), "checks must use the harness's tasks"


@pytest.mark.parametrize("name", NAMES)
def test_solution_passes(name):
    assert_accepts(ag.CHECKS, name, getattr(sol, name))


@pytest.mark.parametrize("name", NAMES)
def test_solution_passes_hidden_cases_and_no_warnings(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = evaluate(ag.CHECKS[name], getattr(sol, name), seed=123, hidden=True)
    assert report.passed, report.summary()


@pytest.mark.parametrize("name", NAMES)
def test_stub_fails(name):
    assert "not implemented yet" in assert_rejects(ag.CHECKS, name, not_implemented)


def test_grading_cells_do_not_load_the_model():
    """The sandbox runs the notebook's cells up to the last exercise: MiniLM must not be among them."""
    assert not hasattr(sol, "model") and not hasattr(sol, "sbert") and not hasattr(sol, "tokenizer")


# --- the references are the library's modules, and agree with the formulas -----------------------

def test_pooling_reference_is_the_masked_mean():
    case = next(c for c in H.MEAN_POOL.cases if c.name == "padding on the left")
    inputs = make_inputs(case, seed=3)
    x, m = inputs["token_embeddings"], inputs["attention_mask"].float()
    expected = (x * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    torch.testing.assert_close(ag.MEAN_POOL.reference(inputs), expected)


def test_empty_row_pools_to_zeros_in_the_reference():
    case = next(c for c in H.MEAN_POOL.cases if c.name == "a row that is all padding")
    inputs = make_inputs(case, seed=0)
    out = ag.MEAN_POOL.reference(inputs)
    empty = inputs["attention_mask"].sum(1) == 0
    assert empty.any() and torch.all(out[empty] == 0)


def test_top_k_reference_matches_topk_of_cosines():
    case = H.TOP_K.cases[1]
    inputs = make_inputs(case, seed=5)
    scores, indices = ag.TOP_K.reference(inputs)
    cos = F.normalize(inputs["query_embeddings"], dim=-1) @ F.normalize(inputs["corpus_embeddings"], dim=-1).T
    values, expected = cos.topk(inputs["k"], dim=1)
    assert torch.equal(indices, expected)
    torch.testing.assert_close(scores, values)


def test_cases_catch_padding_counted():
    """Padding outputs are not zero in the inputs, so a plain mean differs from the masked mean."""
    inputs = make_inputs(H.MEAN_POOL.cases[0], seed=0)
    assert (inputs["attention_mask"] == 0).any()
    assert not torch.allclose(inputs["token_embeddings"].mean(1), ag.MEAN_POOL.reference(inputs), atol=1e-3)


# --- mean_pool ----------------------------------------------------------------------------------

def pool_plain_mean(token_embeddings, attention_mask):
    return token_embeddings.mean(dim=1)


def pool_first_token(token_embeddings, attention_mask):
    return token_embeddings[:, 0, :]


def pool_sum(token_embeddings, attention_mask):
    return (token_embeddings * attention_mask.unsqueeze(-1)).sum(1)


def pool_by_T(token_embeddings, attention_mask):
    return (token_embeddings * attention_mask.unsqueeze(-1)).sum(1) / attention_mask.shape[1]


def pool_no_clamp(token_embeddings, attention_mask):
    m = attention_mask.unsqueeze(-1).float()
    return (token_embeddings * m).sum(1) / m.sum(1)


def pool_slicing(token_embeddings, attention_mask):
    lengths = attention_mask.sum(1)
    return torch.stack([token_embeddings[i, : int(n)].mean(0) if n else torch.zeros(token_embeddings.shape[-1])
                        for i, n in enumerate(lengths)])


def pool_inverted(token_embeddings, attention_mask):
    m = (attention_mask == 0).unsqueeze(-1).float()
    return (token_embeddings * m).sum(1) / m.sum(1).clamp(min=1e-9)


def pool_then_normalise(token_embeddings, attention_mask):
    m = attention_mask.unsqueeze(-1).float()
    s = (token_embeddings * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return s / s.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def pool_wrong_axis(token_embeddings, attention_mask):
    m = attention_mask.unsqueeze(-1).float()
    return (token_embeddings * m).sum(2) / m.sum(2).clamp(min=1e-9)


@pytest.mark.parametrize("wrong, hint", [
    (pool_plain_mean, "padding tokens have outputs too"),
    (pool_first_token, "[CLS]"),
    (pool_sum, "masked sum"),
    (pool_by_T, "divides the masked sum by T"),
    (pool_inverted, "1 at real tokens"),
    (pool_then_normalise, "only averages"),
    (pool_wrong_axis, None),  # a shape error
])
def test_mean_pool_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "mean_pool", wrong, hint)


def test_mean_pool_without_clamp_gets_nan_when_graded():
    report = evaluate(ag.CHECKS["mean_pool"], pool_no_clamp, seed=0, hidden=True)
    assert not report.passed and "NaN" in report.summary()
    assert evaluate(ag.CHECKS["mean_pool"], pool_no_clamp, seed=0, hidden=False).passed  # only hidden catches it


def test_mean_pool_slicing_fails_on_left_padding_when_graded():
    assert evaluate(ag.CHECKS["mean_pool"], pool_slicing, seed=0, hidden=False).passed
    report = evaluate(ag.CHECKS["mean_pool"], pool_slicing, seed=0, hidden=True)
    assert not report.passed and "right only when padding is at the end" in report.summary()


# --- l2_normalize -------------------------------------------------------------------------------

def norm_with_F(x, eps=1e-12):
    return F.normalize(x, dim=-1, eps=eps)


def norm_l1(x, eps=1e-12):
    return x / x.abs().sum(-1, keepdim=True)


def norm_no_sqrt(x, eps=1e-12):
    return x / (x ** 2).sum(-1, keepdim=True)


def norm_dim0(x, eps=1e-12):
    return x / x.norm(dim=0, keepdim=True)


def norm_no_eps(x, eps=1e-12):
    return x / torch.sqrt((x ** 2).sum(-1, keepdim=True))


def norm_std(x, eps=1e-12):
    return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True, correction=0)


@pytest.mark.parametrize("wrong, hint", [
    (norm_with_F, "F.normalize is not allowed"),
    (norm_l1, "L1 norm"),
    (norm_no_sqrt, "square root"),
    (norm_dim0, "over the vectors (axis 0)"),
    (norm_std, None),
])
def test_l2_normalize_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "l2_normalize", wrong, hint)


def test_l2_normalize_without_eps_is_caught_when_graded():
    report = evaluate(ag.CHECKS["l2_normalize"], norm_no_eps, seed=0, hidden=True)
    assert not report.passed and "NaN" in report.summary() and "max(norm, eps)" in report.summary()


# --- cosine_similarity_matrix -------------------------------------------------------------------

def cos_F(a, b):
    return F.cosine_similarity(a[:, None, :], b[None, :, :], dim=-1)


def cos_dot(a, b):
    return a @ b.T


def cos_distance(a, b):
    return 1 - sol.l2_normalize(a) @ sol.l2_normalize(b).T


def cos_swapped(a, b):
    return sol.l2_normalize(b) @ sol.l2_normalize(a).T


def cos_one_side(a, b):
    return sol.l2_normalize(a) @ b.T


def cos_pairwise(a, b):
    return (sol.l2_normalize(a) * sol.l2_normalize(b)).sum(-1)


@pytest.mark.parametrize("wrong, hint", [
    (cos_F, "F.cosine_similarity and F.normalize are not allowed"),
    (cos_dot, "plain dot product"),
    (cos_distance, "1 - cosine"),
    (cos_swapped, "entry [i, j] compares a[i] with b[j]"),
    (cos_one_side, "normalises a but not b"),
    (cos_pairwise, None),  # a shape error (or a broadcasting error)
])
def test_cosine_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "cosine_similarity_matrix", wrong, hint)


def test_cosine_is_graded_with_the_given_l2_normalize():
    """A wrong l2_normalize costs points in its own exercise only."""
    namespace = {"l2_normalize": norm_l1}
    exec("def cosine_similarity_matrix(a, b):\n    return l2_normalize(a) @ l2_normalize(b).T", namespace)
    impl = namespace["cosine_similarity_matrix"]
    assert evaluate(ag.CHECKS["cosine_similarity_matrix"], impl, seed=0).passed
    assert namespace["l2_normalize"] is norm_l1, "the student's function must be put back afterwards"


# --- top_k --------------------------------------------------------------------------------------

def topk_smallest(q, c, k):
    return torch.topk(sol.cosine_similarity_matrix(q, c), k, dim=1, largest=False)


def topk_ascending(q, c, k):
    s = sol.cosine_similarity_matrix(q, c)
    order = s.argsort(dim=1)[:, -k:]
    return s.gather(1, order), order


def topk_dot(q, c, k):
    return torch.topk(q @ c.T, k, dim=1)


def topk_wrong_dim(q, c, k):
    v, i = torch.topk(sol.cosine_similarity_matrix(q, c), min(k, q.shape[0]), dim=0)
    return v, i


def topk_float_indices(q, c, k):
    v, i = torch.topk(sol.cosine_similarity_matrix(q, c), k, dim=1)
    return v, i.float()


def topk_one_too_many(q, c, k):
    return torch.topk(sol.cosine_similarity_matrix(q, c), min(k + 1, c.shape[0]), dim=1)


@pytest.mark.parametrize("wrong, hint", [
    (topk_smallest, "least similar"),
    (topk_ascending, "increasing order"),
    (topk_dot, "dot product of unnormalised vectors"),
    (topk_wrong_dim, None),
    (topk_float_indices, "integer tensor"),
    (topk_one_too_many, None),
])
def test_top_k_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "top_k", wrong, hint)


def test_top_k_is_graded_with_the_given_cosine():
    namespace = {"cosine_similarity_matrix": cos_dot}
    exec("import torch\ndef top_k(q, c, k):\n    return torch.topk(cosine_similarity_matrix(q, c), k, dim=1)", namespace)
    assert evaluate(ag.CHECKS["top_k"], namespace["top_k"], seed=0).passed


# --- spearman -----------------------------------------------------------------------------------

def pearson(x, y):
    return torch.corrcoef(torch.stack([x, y]))[0, 1]


def spearman_argsort(x, y):
    return pearson(x.argsort().float(), y.argsort().float())


def spearman_ordinal(x, y):
    return pearson(x.argsort().argsort().float(), y.argsort().argsort().float())


def spearman_shortcut(x, y):
    rx = x.argsort().argsort().float() + 1
    ry = y.argsort().argsort().float() + 1
    n = len(x)
    return 1 - 6 * ((rx - ry) ** 2).sum() / (n * (n ** 2 - 1))


def spearman_min_ranks(x, y):  # ties get the lowest rank ("min"), not the average
    rank = lambda v: (v[None, :] < v[:, None]).sum(1).float() + 1  # noqa: E731
    return pearson(rank(x), rank(y))


@pytest.mark.parametrize("wrong, hint", [
    (pearson, "Pearson's correlation of the values"),
    (spearman_argsort, "ORDER"),
    (spearman_ordinal, "average of the ranks"),
    (spearman_shortcut, "average of the ranks"),
    (spearman_min_ranks, None),
])
def test_spearman_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "spearman", wrong, hint)


def test_spearman_visible_cases_include_ties():
    inputs = make_inputs(H.SPEARMAN.cases[1], seed=0)
    assert len(set(inputs["y"].tolist())) < len(inputs["y"]), "the ratings case must contain ties"


def test_the_libraries_the_checks_compare_with_may_not_compute_the_answer():
    """sentence-transformers' and scipy's versions, called inside an exercise, score 0 with the rule named."""
    from scipy.stats import spearmanr
    from sentence_transformers.util import cos_sim

    assert_rejects(ag.CHECKS, "cosine_similarity_matrix", lambda a, b: cos_sim(a, b), hint="sentence-transformers'")
    assert_rejects(ag.CHECKS, "spearman", lambda x, y: torch.tensor(spearmanr(x, y).statistic, dtype=torch.float64),
                   hint="scipy's spearmanr")
