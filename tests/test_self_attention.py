"""Chapter 01: the solution passes every check; plausible wrong answers and the stub are rejected."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autograders import self_attention as ag
from autograders.engine.core import evaluate
from checks_support import assert_accepts, assert_rejects
from notebook_code import load_solutions, not_implemented

sol = load_solutions(ag.CHAPTER)


def test_every_exercise_has_a_check():
    assert set(ag.CHECKS.checks) == {"stable_softmax", "scaled_scores", "attention_loop",
                                     "attention_matrix", "SelfAttention"}


@pytest.mark.parametrize("name", list(ag.CHECKS.checks))
def test_solution_passes(name):
    assert_accepts(ag.CHECKS, name, getattr(sol, name))


@pytest.mark.parametrize("name", ["stable_softmax", "scaled_scores", "attention_loop", "attention_matrix"])
def test_stub_fails(name):
    text = assert_rejects(ag.CHECKS, name, not_implemented)
    assert "not implemented yet" in text


def test_stub_module_fails():
    class Stub(sol.SelfAttention):
        def forward(self, x, mask=None):
            raise NotImplementedError()
    assert_rejects(ag.CHECKS, "SelfAttention", Stub)


# --- stable_softmax -----------------------------------------------------------------------------

def softmax_no_max(scores, dim=-1):
    e = scores.exp()
    return e / e.sum(dim, keepdim=True)


def softmax_wrong_axis(scores, dim=-1):
    return sol.stable_softmax(scores, dim=0)


def softmax_no_keepdim(scores, dim=-1):  # broadcasts the sums along the wrong axis for square inputs
    e = (scores - scores.max(dim, keepdim=True).values).exp()
    return e / e.sum(dim).unsqueeze(0)


def softmax_of_exp_minus_one(scores, dim=-1):
    e = (scores - scores.max(dim, keepdim=True).values).exp() - 1
    return e / e.sum(dim, keepdim=True)


@pytest.mark.parametrize("wrong, hint", [
    (softmax_no_max, "subtract the maximum"),
    (softmax_wrong_axis, "axis 0"),
    (softmax_no_keepdim, None),
    (softmax_of_exp_minus_one, None),
])
def test_softmax_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "stable_softmax", wrong, hint)


@pytest.mark.parametrize("forbidden", [
    lambda scores, dim=-1: torch.softmax(scores, dim),
    lambda scores, dim=-1: torch.nn.functional.softmax(scores, dim=dim),
    lambda scores, dim=-1: scores.softmax(dim),
    lambda scores, dim=-1: nn.Softmax(dim=dim)(scores),
    lambda scores, dim=-1: torch.special.softmax(scores, dim),
    lambda scores, dim=-1: torch.log_softmax(scores, dim).exp(),
    lambda scores, dim=-1: torch.nn.functional.softmin(-scores, dim),
], ids=["torch.softmax", "F.softmax", "Tensor.softmax", "nn.Softmax", "special.softmax", "log_softmax", "softmin"])
def test_softmax_with_torch_softmax_is_rejected_by_its_rule(forbidden):
    text = assert_rejects(ag.CHECKS, "stable_softmax", forbidden)
    assert "broke a rule of the exercise: compute the softmax yourself" in text
    assert "it called" in text


def test_softmax_overflow_is_visible():
    """The overflow case runs in the visible test cell, so students see it before grading."""
    report = evaluate(ag.CHECKS["stable_softmax"], softmax_no_max, seed=0, hidden=False)
    assert not report.passed and "NaN" in report.summary()


# --- scaled_scores ------------------------------------------------------------------------------

@pytest.mark.parametrize("wrong, hint", [
    (lambda Q, K: Q @ K.transpose(-2, -1), "not scaled"),
    (lambda Q, K: Q @ K.transpose(-2, -1) / Q.shape[-1], "divided by d"),
    (lambda Q, K: K @ Q.transpose(-2, -1) / math.sqrt(Q.shape[-1]), "shape"),
    (lambda Q, K: Q @ K.transpose(-2, -1) * math.sqrt(Q.shape[-1]), None),
])
def test_scores_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "scaled_scores", wrong, hint)


# --- attention_loop / attention_matrix ----------------------------------------------------------

def loop_unscaled(X, W_q, W_k, W_v):
    Q, K, V = X @ W_q, X @ W_k, X @ W_v
    return torch.stack([torch.softmax(Q[i] @ K.T, -1) @ V for i in range(X.shape[0])])


def loop_softmax_columns(X, W_q, W_k, W_v):  # a loop, but every query's weights normalised over the queries
    Q, K, V = X @ W_q, X @ W_k, X @ W_v
    scores = torch.stack([Q[i] @ K.T / math.sqrt(Q.shape[-1]) for i in range(X.shape[0])])
    A = torch.softmax(scores, dim=0)
    return torch.stack([A[i] @ V for i in range(X.shape[0])])


def loop_off_by_one(X, W_q, W_k, W_v):  # forgets the last key
    Q, K, V = X @ W_q, X @ W_k, X @ W_v
    T = X.shape[0]
    out = []
    for i in range(T):
        n = max(T - 1, 1)
        w = torch.softmax(Q[i] @ K[:n].T / math.sqrt(Q.shape[-1]), -1)
        out.append(w @ V[:n])
    return torch.stack(out)


def loop_values_are_inputs(X, W_q, W_k, W_v):
    Q, K = X @ W_q, X @ W_k
    A = torch.softmax(Q @ K.T / math.sqrt(Q.shape[-1]), -1)
    return A @ (X @ W_q if W_q.shape == W_v.shape else X[:, : W_v.shape[1]])


@pytest.mark.parametrize("wrong, hint", [
    (loop_unscaled, "1/sqrt(d_k)"),
    (loop_softmax_columns, "softmax over the queries"),
    (loop_off_by_one, None),
    (loop_values_are_inputs, None),
])
def test_loop_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "attention_loop", wrong, hint)


def loop_vectorised(X, W_q, W_k, W_v):  # the right numbers, but the matrix form
    Q, K, V = X @ W_q, X @ W_k, X @ W_v
    return torch.softmax(Q @ K.T / math.sqrt(Q.shape[-1]), -1) @ V


def loop_scores_only(X, W_q, W_k, W_v):  # scores one query at a time, the weighted sums all at once
    Q, K, V = X @ W_q, X @ W_k, X @ W_v
    A = torch.stack([torch.softmax(Q[i] @ K.T / math.sqrt(Q.shape[-1]), -1) for i in range(X.shape[0])])
    return A @ V


def loop_einsum(X, W_q, W_k, W_v):
    Q, K, V = X @ W_q, X @ W_k, X @ W_v
    A = torch.softmax(torch.einsum("id,jd->ij", Q, K) / math.sqrt(Q.shape[-1]), -1)
    return torch.einsum("ij,jd->id", A, V)


@pytest.mark.parametrize("wrong", [loop_vectorised, loop_scores_only, loop_einsum])
def test_loop_without_a_loop_is_rejected_by_its_rule(wrong):
    text = assert_rejects(ag.CHECKS, "attention_loop", wrong)
    assert "broke a rule of the exercise: attention_loop must loop over the query positions" in text
    assert "that is the matrix form" in text


def test_loop_rule_counts_the_products_of_the_solution():
    from autograders.engine.core import Watch, make_inputs
    for case in ag.CHECKS["attention_loop"].cases:
        inputs = make_inputs(case, 0)
        watch = Watch(ag.H.LOOP.rules)
        with torch.no_grad(), watch:
            sol.attention_loop(**inputs)
        assert not watch.broken(inputs), case.name


def matrix_weights_transposed(X, W_q, W_k, W_v):
    out, A = sol.attention_matrix(X, W_q, W_k, W_v)
    return out, A.transpose(-2, -1)


def matrix_unscaled(X, W_q, W_k, W_v):
    Q, K, V = X @ W_q, X @ W_k, X @ W_v
    A = torch.softmax(Q @ K.transpose(-2, -1), -1)
    return A @ V, A


def matrix_unbatched_transpose(X, W_q, W_k, W_v):  # K.T flips the batch axis for 3-D inputs
    Q, K, V = X @ W_q, X @ W_k, X @ W_v
    A = torch.softmax(Q @ K.mT / math.sqrt(Q.shape[-1]), -1) if X.ndim == 2 else \
        torch.softmax(torch.einsum("bqd,bkd->bkq", Q, K) / math.sqrt(Q.shape[-1]), -1)
    return A @ V, A


def matrix_output_only_weights_swapped(X, W_q, W_k, W_v):
    out, A = sol.attention_matrix(X, W_q, W_k, W_v)
    return A, out


@pytest.mark.parametrize("wrong, hint", [
    (matrix_weights_transposed, None),
    (matrix_unscaled, "1/sqrt(d_k)"),
    (matrix_unbatched_transpose, None),
    (matrix_output_only_weights_swapped, "shape"),
])
def test_matrix_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "attention_matrix", wrong, hint)


# --- SelfAttention ------------------------------------------------------------------------------

class InvertedMask(sol.SelfAttention):
    def forward(self, x, mask=None):
        return super().forward(x, None if mask is None else ~mask)


class MaskIgnored(sol.SelfAttention):
    def forward(self, x, mask=None):
        return super().forward(x, None)


class NoScale(sol.SelfAttention):
    def forward(self, x, mask=None):
        s = self.W_q(x) @ self.W_k(x).transpose(-2, -1)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        w = torch.softmax(s, -1)
        return w @ self.W_v(x), w


class KeysAsValues(sol.SelfAttention):
    def forward(self, x, mask=None):
        out, w = super().forward(x, mask)
        return w @ self.W_k(x), w


class RenamedProjections(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.q = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, mask=None):
        return x, x


@pytest.mark.parametrize("wrong, hint", [
    (InvertedMask, "wrong way round"),
    (MaskIgnored, None),
    (NoScale, "1/sqrt(d_model)"),
    (KeysAsValues, None),
    (RenamedProjections, "self.W_q"),
])
def test_module_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "SelfAttention", wrong, hint)


# --- later exercises get a correct stable_softmax / scaled_scores ------------------------------

def softmax_without_exp(scores, dim=-1):
    return scores / scores.sum(dim, keepdim=True)


def scores_unscaled(Q, K):
    return Q @ K.transpose(-2, -1)


@pytest.mark.parametrize("name", ["attention_loop", "attention_matrix", "SelfAttention"])
def test_a_wrong_earlier_exercise_does_not_fail_a_later_one(name, monkeypatch):
    """The notebook's own later functions look stable_softmax and scaled_scores up by name; while a
    later exercise is checked they get the given (correct) versions, so a mistake costs points once."""
    from autograders.engine.core import judge, produce
    namespace = sol.stable_softmax.__globals__  # where the notebook's functions and classes live
    monkeypatch.setitem(namespace, "stable_softmax", softmax_without_exp)
    monkeypatch.setitem(namespace, "scaled_scores", scores_unscaled)
    check = ag.CHECKS[name]
    assert set(check.task.uses) <= {"stable_softmax", "scaled_scores"} and check.task.uses
    report = evaluate(check, namespace[name], seed=0, namespace=namespace)
    assert report.passed, report.summary()
    # Without the given versions the wrong stable_softmax would have failed this exercise too.
    alone = judge(check, produce(check.task, namespace[name], 0, None, given={}, namespace=namespace), 0, None)
    assert not alone.passed
    assert namespace["stable_softmax"] is softmax_without_exp  # restored afterwards
