"""Chapter 07: the solution passes every check; plausible wrong answers and the stub are rejected."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from autograders import kv_cache as ag
from checks_support import assert_accepts, assert_rejects
from coursekit.gpt import generate
from notebook_code import load_solutions, not_implemented

sol = load_solutions(ag.CHAPTER)


def test_every_exercise_has_a_check():
    assert set(ag.CHECKS.checks) == {"append_kv", "attend_with_cache", "gpt_forward_cached", "generate_cached"}


@pytest.mark.parametrize("name", list(ag.CHECKS.checks))
def test_solution_passes(name):
    assert_accepts(ag.CHECKS, name, getattr(sol, name))


@pytest.mark.parametrize("name", list(ag.CHECKS.checks))
def test_stub_fails(name):
    text = assert_rejects(ag.CHECKS, name, not_implemented)
    assert "not implemented yet" in text


# --- append_kv ----------------------------------------------------------------------------------

def append_prepends(past, k_new, v_new):
    if past is None:
        return k_new, v_new
    return torch.cat([k_new, past[0]], dim=2), torch.cat([v_new, past[1]], dim=2)


def append_dim1(past, k_new, v_new):
    if past is None:
        return k_new, v_new
    return torch.cat([past[0], k_new], dim=1), torch.cat([past[1], v_new], dim=1)


def append_forgets(past, k_new, v_new):
    return k_new, v_new


def append_stacks(past, k_new, v_new):  # a new axis instead of a longer one
    if past is None:
        return k_new, v_new
    return torch.stack([past[0][:, :, -1:], k_new]).sum(0), torch.stack([past[1][:, :, -1:], v_new]).sum(0)


def append_drops_first_v(past, k_new, v_new):
    if past is None:
        return k_new, v_new[:, :, :0].expand(*v_new.shape[:2], 0, v_new.shape[-1]).clone()
    return torch.cat([past[0], k_new], dim=2), torch.cat([past[1], v_new], dim=2)


@pytest.mark.parametrize("wrong, hint", [
    (append_prepends, "in front of the old ones"),
    (append_dim1, "axis 1, the heads"),
    (append_forgets, "only the newest entries"),
    (append_stacks, None),
    (append_drops_first_v, None),
])
def test_append_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "append_kv", wrong, hint)


# --- attend_with_cache --------------------------------------------------------------------------

def attend_is_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def attend_unmasked(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def attend_unscaled(q, k, v):
    T_q, T_k = q.shape[2], k.shape[2]
    s = (q @ k.transpose(-2, -1)).masked_fill(~torch.ones(T_q, T_k, dtype=torch.bool).tril(T_k - T_q), -math.inf)
    return torch.softmax(s, -1) @ v


def attend_only_last_keys(q, k, v):  # forgets the cache: attends over the new positions only
    T_q = q.shape[2]
    return F.scaled_dot_product_attention(q, k[:, :, -T_q:], v[:, :, -T_q:], is_causal=True)


def attend_mask_zero_not_inf(q, k, v):
    T_q, T_k = q.shape[2], k.shape[2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s * torch.ones(T_q, T_k).tril(T_k - T_q)
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("wrong, hint", [
    (attend_is_causal, "top-left"),
    (attend_unmasked, "without a mask"),
    (attend_unscaled, "1/sqrt(d_head)"),
    (attend_only_last_keys, None),
    (attend_mask_zero_not_inf, None),
])
def test_attend_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "attend_with_cache", wrong, hint)


# --- gpt_forward_cached -------------------------------------------------------------------------

def forward_variant(*, restart=False, skip_own=False, only_new=False, no_residual=False, no_final_norm=False):
    def forward(model, idx, past=None):
        B, T = idx.shape
        T_past = 0 if past is None else past[0][0].shape[2]
        start = 0 if restart else T_past
        x = model.tok_emb(idx) + model.pos_emb(torch.arange(start, start + T))
        present = []
        for i, block in enumerate(model.blocks):
            q, k, v = block.attn.project_qkv(block.ln_1(x))
            k_all, v_all = sol.append_kv(None if past is None else past[i], k, v)
            if skip_own and past is not None:
                out = F.scaled_dot_product_attention(q, past[i][0], past[i][1])
            else:
                out = sol.attend_with_cache(q, k_all, v_all)
            a = block.attn.proj(out.transpose(1, 2).reshape(B, T, -1))
            x = a if no_residual else x + a
            x = x + block.mlp(block.ln_2(x))
            present.append((k, v) if only_new else (k_all, v_all))
        return model.head(x if no_final_norm else model.ln_f(x)), present
    return forward


def forward_heads_merged_wrong(model, idx, past=None):  # (B, H, T, d) reshaped without the transpose
    B, T = idx.shape
    T_past = 0 if past is None else past[0][0].shape[2]
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(T_past, T_past + T))
    present = []
    for i, block in enumerate(model.blocks):
        q, k, v = block.attn.project_qkv(block.ln_1(x))
        k, v = sol.append_kv(None if past is None else past[i], k, v)
        x = x + block.attn.proj(sol.attend_with_cache(q, k, v).reshape(B, T, -1))
        x = x + block.mlp(block.ln_2(x))
        present.append((k, v))
    return model.head(model.ln_f(x)), present


@pytest.mark.parametrize("wrong, hint", [
    (forward_variant(restart=True), "positions continue"),
    (forward_variant(skip_own=True), "attend only to the cached keys"),
    (forward_variant(only_new=True), "only the new tokens' keys"),
    (forward_variant(no_residual=True), None),
    (forward_variant(no_final_norm=True), None),
    (forward_heads_merged_wrong, None),
])
def test_forward_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "gpt_forward_cached", wrong, hint)


def test_forward_restart_positions_caught_in_visible_cases():
    from autograders.engine.core import evaluate
    report = evaluate(ag.CHECKS["gpt_forward_cached"], forward_variant(restart=True), seed=3, hidden=False)
    assert not report.passed


# --- generate_cached ----------------------------------------------------------------------------

def gen_no_cache(model, idx, max_new_tokens):
    return generate(model, idx, max_new_tokens, use_cache=False)


def gen_new_only(model, idx, max_new_tokens):
    return sol.generate_cached(model, idx, max_new_tokens)[:, idx.shape[1]:]


@torch.no_grad()
def gen_refeeds_whole_sequence(model, idx, max_new_tokens):  # keeps the cache AND feeds everything
    out, past = idx, None
    for _ in range(max_new_tokens):
        logits, past = sol.gpt_forward_cached(model, out[:, -min(out.shape[1], 2):], past)
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


@torch.no_grad()
def gen_one_short(model, idx, max_new_tokens):
    return sol.generate_cached(model, idx, max_new_tokens)[:, :-1] if max_new_tokens > 1 else idx


@torch.no_grad()
def gen_extra_step(model, idx, max_new_tokens):
    logits, past = sol.gpt_forward_cached(model, idx)
    out = idx
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
        logits, past = sol.gpt_forward_cached(model, nxt, past)
    return out


@pytest.mark.parametrize("wrong, hint", [
    (gen_no_cache, "whole sequence goes through the model"),
    (gen_new_only, "return the prompt followed by the new tokens"),
    (gen_refeeds_whole_sequence, None),
    (gen_one_short, None),
    (gen_extra_step, "ran once more"),
])
def test_generate_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "generate_cached", wrong, hint)


def _passes_only_with_the_given_versions(name, wrong, monkeypatch):
    """Put wrong earlier functions where the notebook's own code looks them up, then check `name`: it
    passes with the given versions of those functions, and fails without them."""
    from autograders.engine.core import evaluate, judge, produce
    check = ag.CHECKS[name]
    namespace = sol.append_kv.__globals__  # the namespace the notebook's cells ran in
    for earlier, impl in wrong.items():
        assert earlier in check.task.uses, (name, earlier)
        monkeypatch.setitem(namespace, earlier, impl)
    report = evaluate(check, namespace[name], seed=0, namespace=namespace)
    assert report.passed, report.summary()
    alone = judge(check, produce(check.task, namespace[name], 0, None, given={}, namespace=namespace), 0, None)
    assert not alone.passed, "the wrong earlier functions should have failed this exercise without the given ones"


# --- gpt_forward_cached gets correct append_kv / attend_with_cache --------------------------------

def append_new_first(past, k_new, v_new):
    if past is None:
        return k_new, v_new
    return torch.cat([k_new, past[0]], dim=2), torch.cat([v_new, past[1]], dim=2)


def attend_top_left(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("wrong", [{"append_kv": append_new_first}, {"attend_with_cache": attend_top_left}],
                         ids=["append_kv", "attend_with_cache"])
def test_wrong_append_or_attend_does_not_fail_the_forward_pass(wrong, monkeypatch):
    _passes_only_with_the_given_versions("gpt_forward_cached", wrong, monkeypatch)
