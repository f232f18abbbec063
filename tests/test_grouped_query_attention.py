"""Chapter 08: the solution passes every check; plausible wrong answers and the stub are rejected."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autograders import grouped_query_attention as ag
from autograders.engine.core import evaluate, judge, produce
from checks_support import assert_accepts, assert_rejects
from notebook_code import load_solutions, not_implemented

sol = load_solutions(ag.CHAPTER)


def test_every_exercise_has_a_check():
    assert set(ag.CHECKS.checks) == {"repeat_kv", "grouped_query_attention", "GroupedQueryAttention",
                                     "predicted_speedup"}


@pytest.mark.parametrize("name", list(ag.CHECKS.checks))
def test_solution_passes(name):
    assert_accepts(ag.CHECKS, name, getattr(sol, name))


@pytest.mark.parametrize("name", ["repeat_kv", "grouped_query_attention", "predicted_speedup"])
def test_stub_fails(name):
    text = assert_rejects(ag.CHECKS, name, not_implemented)
    assert "not implemented yet" in text


def test_stub_module_fails():
    class Stub(sol.GroupedQueryAttention):
        def forward(self, x, causal=True):
            raise NotImplementedError()
    assert "not implemented yet" in assert_rejects(ag.CHECKS, "GroupedQueryAttention", Stub)


def test_given_cache_formula_matches_coursekit_gpt():
    """The notebook's (given) formula and the shared GPT's own agree with real cache tensors."""
    from coursekit.gpt import GPT, GPTConfig, kv_cache_bytes
    config = GPTConfig(vocab_size=11, d_model=32, n_layer=2, n_head=4, n_kv_head=2, max_len=16)
    model = GPT(config).eval()
    with torch.no_grad():
        _, past = model(torch.zeros(3, 5, dtype=torch.long), use_cache=True)
    measured = sum(k.nbytes + v.nbytes for k, v in past)
    assert measured == kv_cache_bytes(config, 3, 5) == sol.kv_cache_bytes(2, 4, 2, 32, 3, 5, 4)


# --- predicted_speedup --------------------------------------------------------------------------

def speedup_cache_ratio(base_weight_bytes, base_cache_bytes, weight_bytes, cache_bytes, cache_passes=1):
    return base_cache_bytes / cache_bytes if cache_bytes else 1.0


def speedup_inverted(base_weight_bytes, base_cache_bytes, weight_bytes, cache_bytes, cache_passes=1):
    return 1 / sol.predicted_speedup(base_weight_bytes, base_cache_bytes, weight_bytes, cache_bytes, cache_passes)


def speedup_no_passes(base_weight_bytes, base_cache_bytes, weight_bytes, cache_bytes, cache_passes=1):
    return (base_weight_bytes + base_cache_bytes) / (weight_bytes + cache_bytes)


def speedup_passes_on_weights(base_weight_bytes, base_cache_bytes, weight_bytes, cache_bytes, cache_passes=1):
    return ((cache_passes * base_weight_bytes + base_cache_bytes) / (cache_passes * weight_bytes + cache_bytes))


def speedup_weights_only(base_weight_bytes, base_cache_bytes, weight_bytes, cache_bytes, cache_passes=1):
    return base_weight_bytes / weight_bytes


def speedup_difference(base_weight_bytes, base_cache_bytes, weight_bytes, cache_bytes, cache_passes=1):
    return (base_weight_bytes + cache_passes * base_cache_bytes) - (weight_bytes + cache_passes * cache_bytes)


def speedup_int_division(base_weight_bytes, base_cache_bytes, weight_bytes, cache_bytes, cache_passes=1):
    return (base_weight_bytes + cache_passes * base_cache_bytes) // (weight_bytes + cache_passes * cache_bytes)


@pytest.mark.parametrize("wrong, hint", [
    (speedup_cache_ratio, "counts only the cache"),
    (speedup_inverted, "upside down"),
    (speedup_no_passes, "cache_passes times per step"),
    (speedup_passes_on_weights, "not the weight bytes"),
    (speedup_weights_only, "only the weights"),
    (speedup_difference, None),
    (speedup_int_division, None),
])
def test_speedup_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "predicted_speedup", wrong, hint)


def test_speedup_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no bytes"):
        sol.predicted_speedup(10, 10, 0, 0)


# --- repeat_kv ----------------------------------------------------------------------------------

def repeat_tiled(x, n_rep):
    return torch.cat([x] * n_rep, dim=1)


def repeat_time(x, n_rep):
    return x.repeat_interleave(n_rep, dim=2)


def repeat_wrong_expand(x, n_rep):
    B, H, T, d = x.shape
    return x[:, None].expand(B, n_rep, H, T, d).reshape(B, H * n_rep, T, d)


def repeat_nothing(x, n_rep):
    return x


@pytest.mark.parametrize("wrong, hint", [
    (repeat_tiled, "IN A ROW"),
    (repeat_time, "shape"),
    (repeat_wrong_expand, "IN A ROW"),
    (repeat_nothing, "shape"),
])
def test_repeat_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "repeat_kv", wrong, hint)


# --- grouped_query_attention --------------------------------------------------------------------

def gqa_tiled(q, k, v, causal=False):
    n = q.shape[1] // k.shape[1]
    k, v = k.repeat(1, n, 1, 1), v.repeat(1, n, 1, 1)  # [kv0, kv1, kv0, kv1, ...]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v


def gqa_no_scale(q, k, v, causal=False):
    n = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n, 1), v.repeat_interleave(n, 1)
    s = q @ k.transpose(-2, -1)
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v


def gqa_ignores_causal(q, k, v, causal=False):
    return sol.grouped_query_attention(q, k, v, causal=False)


def gqa_first_kv_head_only(q, k, v, causal=False):  # MQA for everything
    return sol.grouped_query_attention(q, k[:, :1], v[:, :1], causal=causal)


def gqa_softmax_over_queries(q, k, v, causal=False):
    n = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n, 1), v.repeat_interleave(n, 1)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -2).nan_to_num() @ v


@pytest.mark.parametrize("wrong, hint", [
    (gqa_tiled, "h // (H // H_kv)"),
    (gqa_no_scale, "1/sqrt(d_head)"),
    (gqa_ignores_causal, "without the causal mask"),
    (gqa_first_kv_head_only, None),
    (gqa_softmax_over_queries, None),
])
def test_gqa_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "grouped_query_attention", wrong, hint)


@pytest.mark.parametrize("forbidden", [
    lambda q, k, v, causal=False: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True),
    lambda q, k, v, causal=False: F.scaled_dot_product_attention(
        q, sol.repeat_kv(k, q.shape[1] // k.shape[1]), sol.repeat_kv(v, q.shape[1] // k.shape[1]), is_causal=causal),
    lambda q, k, v, causal=False: torch.ops.aten._scaled_dot_product_attention_math(
        q, k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1),
        is_causal=causal)[0],
], ids=["sdpa with enable_gqa", "sdpa after repeat_kv", "the math kernel"])
def test_gqa_with_fused_attention_is_rejected_by_its_rule(forbidden):
    text = assert_rejects(ag.CHECKS, "grouped_query_attention", forbidden)
    assert "broke a rule of the exercise: write the attention yourself" in text
    assert "F.scaled_dot_product_attention" in text and "it called" in text


# --- GroupedQueryAttention ----------------------------------------------------------------------

class NoTranspose(sol.GroupedQueryAttention):
    def forward(self, x, causal=True):
        B, T, d = x.shape
        q = self.W_q(x).reshape(B, self.n_head, T, self.d_head)
        k = self.W_k(x).reshape(B, self.n_kv_head, T, self.d_head)
        v = self.W_v(x).reshape(B, self.n_kv_head, T, self.d_head)
        out = sol.grouped_query_attention(q, k, v, causal)
        return self.W_o(out.transpose(1, 2).reshape(B, T, d))


class NoOutputProjection(sol.GroupedQueryAttention):
    def forward(self, x, causal=True):
        B, T, d = x.shape
        q = self.W_q(x).view(B, T, self.n_head, self.d_head).transpose(1, 2)
        k = self.W_k(x).view(B, T, self.n_kv_head, self.d_head).transpose(1, 2)
        v = self.W_v(x).view(B, T, self.n_kv_head, self.d_head).transpose(1, 2)
        return sol.grouped_query_attention(q, k, v, causal).transpose(1, 2).reshape(B, T, d)


class MergeWithoutTranspose(sol.GroupedQueryAttention):
    def forward(self, x, causal=True):
        B, T, d = x.shape
        q = self.W_q(x).view(B, T, self.n_head, self.d_head).transpose(1, 2)
        k = self.W_k(x).view(B, T, self.n_kv_head, self.d_head).transpose(1, 2)
        v = self.W_v(x).view(B, T, self.n_kv_head, self.d_head).transpose(1, 2)
        return self.W_o(sol.grouped_query_attention(q, k, v, causal).reshape(B, T, d))


class AlwaysCausal(sol.GroupedQueryAttention):
    def forward(self, x, causal=True):
        return super().forward(x, True)


class RenamedOutput(nn.Module):
    def __init__(self, d_model, n_head, n_kv_head):
        super().__init__()
        d_kv = n_kv_head * (d_model // n_head)
        self.W_q = nn.Linear(d_model, d_model, bias=False)
        self.W_k = nn.Linear(d_model, d_kv, bias=False)
        self.W_v = nn.Linear(d_model, d_kv, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, causal=True):
        return x


class FullSizeKV(sol.GroupedQueryAttention):  # K/V projections of MHA size
    def __init__(self, d_model, n_head, n_kv_head):
        super().__init__(d_model, n_head, n_head)


@pytest.mark.parametrize("wrong, hint", [
    (NoTranspose, "plain reshape"),
    (NoOutputProjection, "before W_o"),
    (MergeWithoutTranspose, None),
    (AlwaysCausal, None),
    (RenamedOutput, "self.W_o"),
    (FullSizeKV, "out_features, in_features"),
])
def test_module_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "GroupedQueryAttention", wrong, hint)


# --- later exercises get a correct repeat_kv / grouped_query_attention -------------------------

def repeat_kv_tiled(x, n_rep):
    return x.repeat(1, n_rep, 1, 1)


def gqa_unscaled(q, k, v, causal=False):
    return gqa_no_scale(q, k, v, causal)


@pytest.mark.parametrize("name, earlier, wrong", [
    ("grouped_query_attention", "repeat_kv", repeat_kv_tiled),
    ("GroupedQueryAttention", "grouped_query_attention", gqa_unscaled),
])
def test_a_wrong_earlier_exercise_does_not_fail_a_later_one(name, earlier, wrong, monkeypatch):
    namespace = sol.repeat_kv.__globals__  # where the notebook's functions and classes look names up
    monkeypatch.setitem(namespace, earlier, wrong)
    check = ag.CHECKS[name]
    assert check.task.uses == (earlier,)
    report = evaluate(check, namespace[name], seed=0, namespace=namespace)
    assert report.passed, report.summary()
    alone = judge(check, produce(check.task, namespace[name], 0, None, given={}, namespace=namespace), 0, None)
    assert not alone.passed  # without the given version the wrong earlier function fails this one too
