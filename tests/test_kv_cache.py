"""Chapter 07: the solution passes every check; plausible wrong answers and the stub are rejected."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from autograders import kv_cache as ag
from checks_support import assert_graded_on_its_own, assert_accepts, assert_rejects
from coursekit.gpt import generate
from notebook_code import load_solutions, not_implemented

sol = load_solutions(ag.CHAPTER)


def test_every_exercise_has_a_check():
    assert set(ag.CHECKS.checks) == {"append_kv", "attend_with_cache", "gpt_forward_cached", "generate_cached",
                                     "gather_blocks"}


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

def _attend(q, k, v):
    """attend_with_cache written out (the rule of gpt_forward_cached rules out F.scaled_dot_product_attention
    in the function itself; a student's own attend_with_cache is replaced by the given one while checked)."""
    T_q, T_k = q.shape[2], k.shape[2]
    s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(
        ~torch.ones(T_q, T_k, dtype=torch.bool).tril(T_k - T_q), -math.inf)
    return torch.softmax(s, -1) @ v


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
            if skip_own and past is not None:  # attention written out: F.scaled_dot_product_attention is ruled out
                s = q @ past[i][0].transpose(-2, -1) / math.sqrt(q.shape[-1])
                out = torch.softmax(s, dim=-1) @ past[i][1]
            else:
                out = _attend(q, k_all, v_all)
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
        x = x + block.attn.proj(_attend(q, k, v).reshape(B, T, -1))
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

@torch.no_grad()
def gen_no_cache(model, idx, max_new_tokens):  # the whole sequence through gpt_forward_cached at every step
    out = idx
    for _ in range(max_new_tokens):
        logits, _ = sol.gpt_forward_cached(model, out)
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


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
    # sol.append_kv.__globals__: the namespace the notebook's cells ran in
    assert_graded_on_its_own(ag.CHECKS, name, sol.append_kv.__globals__, wrong, monkeypatch)


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


# --- the model's own cached paths are ruled out in gpt_forward_cached and generate_cached ------------

RULE = "broke a rule of the exercise"


def forward_by_the_model(model, idx, past=None):
    return model(idx, past=past, use_cache=True)


def forward_by_the_class(model, idx, past=None):  # past the instance: GPT.forward runs the blocks
    return type(model).forward(model, idx, past=past, use_cache=True)


def forward_by_the_blocks(model, idx, past=None):
    B, T = idx.shape
    T_past = 0 if past is None else past[0][0].shape[2]
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(T_past, T_past + T))
    present = []
    for i, block in enumerate(model.blocks):
        x, kv = block(x, None if past is None else past[i])
        present.append(kv)
    return model.head(model.ln_f(x)), present


def forward_by_attend(model, idx, past=None):  # the attention module's own attend instead of yours
    B, T = idx.shape
    T_past = 0 if past is None else past[0][0].shape[2]
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(T_past, T_past + T))
    present = []
    for i, block in enumerate(model.blocks):
        q, k, v = block.attn.project_qkv(block.ln_1(x))
        k, v = sol.append_kv(None if past is None else past[i], k, v)
        x = x + block.attn.proj(block.attn.attend(q, k, v))
        x = x + block.mlp(block.ln_2(x))
        present.append((k, v))
    return model.head(model.ln_f(x)), present


def forward_with_sdpa(model, idx, past=None):  # right, but attention by F.scaled_dot_product_attention
    B, T = idx.shape
    T_past = 0 if past is None else past[0][0].shape[2]
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(T_past, T_past + T))
    present = []
    for i, block in enumerate(model.blocks):
        q, k, v = block.attn.project_qkv(block.ln_1(x))
        k, v = sol.append_kv(None if past is None else past[i], k, v)
        mask = torch.ones(T, k.shape[2], dtype=torch.bool).tril(k.shape[2] - T)  # right, but fused
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + block.attn.proj(out.transpose(1, 2).reshape(B, T, -1))
        x = x + block.mlp(block.ln_2(x))
        present.append((k, v))
    return model.head(model.ln_f(x)), present


@pytest.mark.parametrize("wrong, said", [
    (forward_by_the_model, "coursekit.gpt.GPT.forward"),
    (forward_by_the_class, "coursekit.gpt.Block.forward"),
    (forward_by_the_blocks, "coursekit.gpt.Block.forward"),
    (forward_by_attend, "coursekit.gpt.CausalSelfAttention.attend"),
    (forward_with_sdpa, "scaled_dot_product_attention"),
])
def test_forward_by_the_models_own_paths_is_rejected(wrong, said):
    text = assert_rejects(ag.CHECKS, "gpt_forward_cached", wrong)
    assert RULE in text and said in text, text


def gen_by_generate(model, idx, max_new_tokens):
    return generate(model, idx, max_new_tokens)


def gen_by_module_attribute(model, idx, max_new_tokens):
    import coursekit.gpt
    return coursekit.gpt.generate(model, idx, max_new_tokens, use_cache=True)


@torch.no_grad()
def gen_by_decode_step(model, idx, max_new_tokens):  # own prefill, then coursekit's decode_step
    from coursekit.gpt import StaticKVCache, decode_step
    logits, past = sol.gpt_forward_cached(model, idx)
    cache = StaticKVCache(past, idx.shape[1] + max_new_tokens)
    token = logits[:, -1].argmax(-1)
    tokens = [token]
    for _ in range(max_new_tokens - 1):
        token = decode_step(model, token, cache).argmax(-1)
        tokens.append(token)
    return torch.cat([idx, torch.stack(tokens, 1)], 1)


@torch.no_grad()
def gen_by_the_model(model, idx, max_new_tokens):
    logits, past = model(idx, use_cache=True)
    out = idx
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
        if out.shape[1] < idx.shape[1] + max_new_tokens:
            logits, past = model(nxt, past=past, use_cache=True)
    return out


@pytest.mark.parametrize("wrong, said", [
    (gen_by_generate, "coursekit.gpt.generate"),
    (gen_by_module_attribute, "coursekit.gpt.generate"),
    (gen_by_decode_step, "coursekit.gpt.StaticKVCache"),
    (gen_by_the_model, "coursekit.gpt.GPT.forward"),
])
def test_generate_by_coursekit_is_rejected(wrong, said):
    text = assert_rejects(ag.CHECKS, "generate_cached", wrong)
    assert RULE in text and said in text, text


def test_nothing_is_left_patched_after_a_check():
    import sys

    import coursekit.gpt
    original = coursekit.gpt.generate
    assert_rejects(ag.CHECKS, "generate_cached", gen_by_generate)
    assert coursekit.gpt.generate is original and generate is original and sys.getprofile() is None
    model = ag.H._model(torch.Generator().manual_seed(0))
    assert "forward" not in vars(model) and "attend" not in vars(model.blocks[0].attn)


# --- gather_blocks ------------------------------------------------------------------------------

def test_gather_reference_reads_what_paged_cache_wrote():
    """The check's reference reads back exactly the contiguous cache that coursekit's pool stored."""
    from coursekit.paged_cache import PagedKVCache
    g = torch.Generator().manual_seed(0)
    cache = PagedKVCache(n_layer=1, n_kv_head=2, d_head=3, block_size=4, num_blocks=16)
    full = {r: torch.randn(1, 2, n, 3, generator=g) for r, n in enumerate([9, 3, 14])}
    for r, k in full.items():
        cache.append(r, k[:, :, :2], k[:, :, :2])
    for r, k in full.items():  # the rest one position at a time, interleaved
        for t in range(2, k.shape[2]):
            cache.append(r, k[:, :, t:t + 1], k[:, :, t:t + 1])
    for r, k in full.items():
        inputs = {"pool": cache.keys[0], "block_table": torch.tensor(cache.block_tables[r]), "length": k.shape[2]}
        assert torch.equal(ag._gather_ref(inputs), k[0])
        assert torch.equal(sol.gather_blocks(**inputs), k[0])


def gather_ignores_length(pool, block_table, length):
    H, bs, d = pool.shape[1:]
    return pool[block_table].permute(1, 0, 2, 3).reshape(H, -1, d)


def gather_positions_first(pool, block_table, length):  # (length, H, d) instead of (H, length, d)
    return sol.gather_blocks(pool, block_table, length).transpose(0, 1)


def gather_offset_by_one_block(pool, block_table, length):
    H, bs, d = pool.shape[1:]
    table = torch.cat([block_table[1:], block_table[:1]])
    return pool[table].permute(1, 0, 2, 3).reshape(H, -1, d)[:, :length]


@pytest.mark.parametrize("wrong, hint", [
    (ag._gather_sorted, "block-table order"),
    (ag._gather_no_permute, "permute(1, 0, 2, 3)"),
    (ag._gather_first_blocks, "pool[block_table]"),
    (ag._gather_last_positions, "first `length` positions"),
    (gather_ignores_length, "shape"),
    (gather_positions_first, "shape"),
    (gather_offset_by_one_block, None),
])
def test_gather_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "gather_blocks", wrong, hint)


def test_gather_beyond_the_table_is_an_error():
    with pytest.raises(ValueError, match="cannot hold"):
        sol.gather_blocks(torch.zeros(4, 1, 2, 1), torch.tensor([0, 1]), 5)
