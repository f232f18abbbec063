"""Chapter 02: the solution passes every check; plausible wrong answers and the stub are rejected."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autograders import multihead_attention as ag
from checks_support import assert_graded_on_its_own, assert_accepts, assert_rejects
from notebook_code import load_solutions, not_implemented

sol = load_solutions(ag.CHAPTER)  # includes the notebook's given attention() helper

FUNCTIONS = ["split_heads", "merge_heads", "sinusoidal_encoding", "window_mask", "causal_mask", "graph_mask",
             "stacked_footprint"]


def test_every_exercise_has_a_check():
    assert set(ag.CHECKS.checks) == {"split_heads", "merge_heads", "MultiHeadAttention", "sinusoidal_encoding",
                                     "window_mask", "causal_mask", "graph_mask", "stacked_footprint"}


@pytest.mark.parametrize("name", list(ag.CHECKS.checks))
def test_solution_passes(name):
    assert_accepts(ag.CHECKS, name, getattr(sol, name))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_stub_fails(name):
    text = assert_rejects(ag.CHECKS, name, not_implemented)
    assert "not implemented yet" in text


def test_stub_module_fails():
    class Stub(sol.MultiHeadAttention):
        def forward(self, x, mask=None, key_mask=None):
            raise NotImplementedError()
    assert "not implemented yet" in assert_rejects(ag.CHECKS, "MultiHeadAttention", Stub)


def test_solution_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        sol.split_heads(torch.zeros(1, 2, 6), 4)
    with pytest.raises(ValueError, match="divisible"):
        sol.MultiHeadAttention(6, 4)
    with pytest.raises(ValueError, match="even"):
        sol.sinusoidal_encoding(3, 5)
    with pytest.raises(ValueError, match=r"\(E, 2\)"):
        sol.graph_mask(torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="at least 1"):
        sol.stacked_footprint(torch.eye(3, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="square boolean"):
        sol.stacked_footprint(torch.eye(3), 2)
    with pytest.raises(TypeError, match="boolean"):
        sol.attention(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(2, 2))


# --- split_heads / merge_heads ------------------------------------------------------------------

def split_plain_reshape(x, num_heads):
    B, T, d = x.shape
    return x.reshape(B, num_heads, T, d // num_heads)


def split_interleaved(x, num_heads):
    B, T, d = x.shape
    return x.reshape(B, T, d // num_heads, num_heads).permute(0, 3, 1, 2)


def split_no_transpose(x, num_heads):
    B, T, d = x.shape
    return x.reshape(B, T, num_heads, d // num_heads)


def split_heads_first(x, num_heads):  # (h, B, T, d_head)
    return torch.stack(x.chunk(num_heads, dim=-1), dim=0)


@pytest.mark.parametrize("wrong, hint", [
    (split_plain_reshape, "mixes features of different positions"),
    (split_interleaved, "every h-th feature"),
    (split_no_transpose, "move the head axis"),
    (split_heads_first, None),
])
def test_split_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "split_heads", wrong, hint)


def merge_plain_reshape(x):
    B, h, T, dh = x.shape
    return x.reshape(B, T, h * dh)


def merge_interleaved(x):
    B, h, T, dh = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, T, h * dh)


def merge_mean(x):
    return x.mean(1)


def merge_reversed_heads(x):
    return torch.cat(list(x.unbind(1))[::-1], dim=-1)


@pytest.mark.parametrize("wrong, hint", [
    (merge_plain_reshape, "mixes positions"),
    (merge_interleaved, "interleave the heads"),
    (merge_mean, "averaged the heads"),
    (merge_reversed_heads, None),
])
def test_merge_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "merge_heads", wrong, hint)


# --- MultiHeadAttention -------------------------------------------------------------------------

class _Parts(sol.MultiHeadAttention):
    def qkv(self, x, split=None):
        split = split or sol.split_heads
        return (split(self.W_q(x), self.num_heads), split(self.W_k(x), self.num_heads),
                split(self.W_v(x), self.num_heads))

    @staticmethod
    def allowed(mask, key_mask):
        allowed = None
        if mask is not None:
            allowed = mask if mask.dim() == 2 else mask[:, None]
        if key_mask is not None:
            keys = key_mask[:, None, None, :]
            allowed = keys if allowed is None else allowed & keys
        return allowed


class ScaledByDModel(_Parts):
    def forward(self, x, mask=None, key_mask=None):
        q, k, v = self.qkv(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(self.d_model)
        allowed = self.allowed(mask, key_mask)
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        w = torch.softmax(s, -1)
        return self.W_o(sol.merge_heads(w @ v)), w


class NoOutputProjection(_Parts):
    def forward(self, x, mask=None, key_mask=None):
        q, k, v = self.qkv(x)
        out, w = sol.attention(q, k, v, self.allowed(mask, key_mask))
        return sol.merge_heads(out), w


class PyTorchKeyMask(sol.MultiHeadAttention):
    def forward(self, x, mask=None, key_mask=None):
        return super().forward(x, mask, None if key_mask is None else ~key_mask)


class KeyMaskIgnored(sol.MultiHeadAttention):
    def forward(self, x, mask=None, key_mask=None):
        return super().forward(x, mask, None)


class MaskIgnored(sol.MultiHeadAttention):
    def forward(self, x, mask=None, key_mask=None):
        return super().forward(x, None, key_mask)


class PlainReshapeHeads(_Parts):
    def forward(self, x, mask=None, key_mask=None):
        q, k, v = self.qkv(x, split=split_plain_reshape)
        out, w = sol.attention(q, k, v, self.allowed(mask, key_mask))
        return self.W_o(merge_plain_reshape(out)), w


class AveragedWeights(sol.MultiHeadAttention):
    def forward(self, x, mask=None, key_mask=None):
        out, w = super().forward(x, mask, key_mask)
        return out, w.mean(1)


class KeyMaskOnQueries(_Parts):  # masks the rows (queries) instead of the columns (keys)
    def forward(self, x, mask=None, key_mask=None):
        q, k, v = self.qkv(x)
        allowed = self.allowed(mask, None)
        if key_mask is not None:
            rows = key_mask[:, None, :, None]
            allowed = rows if allowed is None else allowed & rows
        out, w = sol.attention(q, k, v, allowed)
        return self.W_o(sol.merge_heads(out)), w


class RenamedOutput(nn.Module):
    def __init__(self, d_model, num_heads):
        super().__init__()
        self.W_q, self.W_k, self.W_v = (nn.Linear(d_model, d_model) for _ in range(3))
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x, mask=None, key_mask=None):
        return x, x


@pytest.mark.parametrize("wrong, hint", [
    (ScaledByDModel, "sqrt(d_head)"),
    (NoOutputProjection, "output projection W_o"),
    (PyTorchKeyMask, "opposite of PyTorch's key_padding_mask"),
    (KeyMaskIgnored, "ignores key_mask"),
    (MaskIgnored, None),
    (PlainReshapeHeads, "plain reshape"),
    (AveragedWeights, "shape"),
    (KeyMaskOnQueries, None),
    (RenamedOutput, "self.W_o"),
])
def test_mha_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "MultiHeadAttention", wrong, hint)


def test_padding_case_is_visible():
    """Key masking is checked in the visible cell, so a student sees a padding bug before grading."""
    from autograders.engine.core import evaluate
    report = evaluate(ag.CHECKS["MultiHeadAttention"], KeyMaskIgnored, seed=0, hidden=False)
    assert not report.passed


# --- sinusoidal_encoding ------------------------------------------------------------------------

def sinusoid(T, d_model, *, halves=False, swap=False, exponent_i=False, start=0, base=10000.0):
    pos = torch.arange(start, start + T, dtype=torch.float32)[:, None]
    i = torch.arange(d_model // 2, dtype=torch.float32)
    angle = pos / base ** ((i if exponent_i else 2 * i) / d_model)
    a, b = (angle.cos(), angle.sin()) if swap else (angle.sin(), angle.cos())
    if halves:
        return torch.cat([a, b], dim=-1)
    return torch.stack([a, b], dim=-1).reshape(T, d_model)


@pytest.mark.parametrize("wrong, hint", [
    (lambda T, d_model: sinusoid(T, d_model, halves=True), "interleaves them"),
    (lambda T, d_model: sinusoid(T, d_model, swap=True), "swapped"),
    (lambda T, d_model: sinusoid(T, d_model, exponent_i=True), "exponent is 2i/d_model"),
    (lambda T, d_model: sinusoid(T, d_model, start=1), "positions start at 0"),
    (lambda T, d_model: sinusoid(T, d_model, base=1000.0), None),
])
def test_sinusoid_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "sinusoidal_encoding", wrong, hint)


def test_sinusoid_float64_is_accepted():
    assert_accepts(ag.CHECKS, "sinusoidal_encoding",
                   lambda T, d_model: sol.sinusoidal_encoding(T, d_model).double())


# --- masks --------------------------------------------------------------------------------------

def grid(T):
    i = torch.arange(T)
    return i[:, None], i[None, :]


@pytest.mark.parametrize("wrong, hint", [
    (lambda T, w: (grid(T)[0] - grid(T)[1]).abs() < w, "one too narrow"),
    (lambda T, w: ((grid(T)[0] - grid(T)[1]) >= 0) & ((grid(T)[0] - grid(T)[1]) <= w), "only looks back"),
    (lambda T, w: (grid(T)[0] - grid(T)[1]).abs() <= w // 2, "half-width"),
    (lambda T, w: ((grid(T)[0] - grid(T)[1]).abs() <= w).int(), "boolean tensor"),
    (lambda T, w: torch.ones(T, T, dtype=torch.bool).tril(w).triu(-w + 1), None),
])
def test_window_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "window_mask", wrong, hint)


@pytest.mark.parametrize("wrong, hint", [
    (lambda T: torch.ones(T, T, dtype=torch.bool).triu(), "FUTURE"),
    (lambda T: torch.ones(T, T, dtype=torch.bool).tril(-1), "own position"),
    (lambda T: torch.ones(T, T).tril(), "boolean tensor"),
    (lambda T: torch.ones(T, T, dtype=torch.bool), "allows every key"),
    (lambda T: torch.ones(T, T, dtype=torch.bool).tril().flip(0), None),
])
def test_causal_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "causal_mask", wrong, hint)


def graph_no_self_loops(edges, num_nodes):
    m = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    m[edges[:, 0], edges[:, 1]] = True
    m[edges[:, 1], edges[:, 0]] = True
    return m


def graph_directed(edges, num_nodes):
    m = torch.eye(num_nodes, dtype=torch.bool)
    m[edges[:, 0], edges[:, 1]] = True
    return m


def graph_edges_only_from_first_row(edges, num_nodes):  # reads edges as (2, E)
    m = torch.eye(num_nodes, dtype=torch.bool)
    if edges.shape[0] >= 2:
        m[edges[0], edges[1]] = True
        m[edges[1], edges[0]] = True
    return m


def graph_as_int(edges, num_nodes):
    return sol.graph_mask(edges, num_nodes).long()


@pytest.mark.parametrize("wrong, hint", [
    (graph_no_self_loops, "self loops"),
    (graph_directed, "undirected"),
    (graph_edges_only_from_first_row, None),
    (graph_as_int, "boolean tensor"),
    (lambda edges, num_nodes: torch.eye(num_nodes, dtype=torch.bool), None),
])
def test_graph_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "graph_mask", wrong, hint)


# --- stacked_footprint ---------------------------------------------------------------------------

def footprint_one_too_few(mask, layers):
    reach = torch.eye(mask.shape[0], dtype=torch.bool)
    for _ in range(layers - 1):
        reach = (reach.float() @ mask.float()) > 0
    return reach


def footprint_union(mask, layers):  # chains of 1 .. layers steps: a stack with residual connections
    reach, total = mask, mask.clone()
    for _ in range(layers - 1):
        reach = (reach.float() @ mask.float()) > 0
        total |= reach
    return total


def footprint_transposed(mask, layers):
    return sol.stacked_footprint(mask.T.contiguous(), layers)


def footprint_elementwise(mask, layers):
    return mask ** layers if mask.dtype != torch.bool else mask & mask


def footprint_float_counts(mask, layers):
    return torch.linalg.matrix_power(mask.float(), layers) > 0


def footprint_int_counts(mask, layers):  # int64 path counts wrap around after a few dozen layers
    return torch.linalg.matrix_power(mask.long(), layers) > 0


def footprint_as_float(mask, layers):
    return sol.stacked_footprint(mask, layers).float()


@pytest.mark.parametrize("wrong, hint", [
    (footprint_one_too_few, "one layer fewer"),
    (footprint_union, None),  # visible cases have self loops or a single key per query: caught when graded
    (footprint_transposed, "transposed"),
    (footprint_elementwise, "element-wise power"),
    (footprint_float_counts, None),
    (footprint_int_counts, None),
    (footprint_as_float, "boolean tensor"),
])
def test_stacked_footprint_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "stacked_footprint", wrong, hint)


@pytest.mark.parametrize("wrong, hint", [
    (footprint_union, "WITH residual"),
    (footprint_float_counts, "overflows"),
])
def test_stacked_footprint_hidden_cases_name_the_mistake(wrong, hint):
    from autograders.engine.core import evaluate
    report = evaluate(ag.CHECKS["stacked_footprint"], wrong, seed=0, hidden=True)
    assert not report.passed and hint in report.summary()


def _passes_only_with_the_given_versions(name, wrong, monkeypatch):
    # sol.split_heads.__globals__: the namespace the notebook's cells ran in
    assert_graded_on_its_own(ag.CHECKS, name, sol.split_heads.__globals__, wrong, monkeypatch)


# --- MultiHeadAttention gets correct split_heads / merge_heads -----------------------------------

def split_interleaved(x, num_heads):
    B, T, d = x.shape
    return x.reshape(B, T, d // num_heads, num_heads).permute(0, 3, 1, 2)


def merge_interleaved(x):
    B, h, T, dh = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, T, h * dh)


@pytest.mark.parametrize("wrong", [{"split_heads": split_interleaved}, {"merge_heads": merge_interleaved},
                                   {"split_heads": split_interleaved, "merge_heads": merge_interleaved}])
def test_wrong_split_or_merge_does_not_fail_multihead_attention(wrong, monkeypatch):
    _passes_only_with_the_given_versions("MultiHeadAttention", wrong, monkeypatch)
