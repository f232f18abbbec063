"""Checks for chapter 07, the KV cache.

Conventions (stated in the notebook too): keys, values and queries are laid out as
``(B, n_head, T, d_head)``, the layout of ``F.scaled_dot_product_attention`` and of the cache of
``coursekit.gpt`` and of Hugging Face ``transformers``; a layer's cache is a pair ``(k, v)``, a model's
cache a list with one pair per layer; ``None`` means "nothing cached yet".

References: ``transformers.DynamicCache.update`` for the append, full causal attention recomputed
over the whole sequence for attention over the cache, and ``coursekit.gpt.GPT`` run on the whole
sequence without a cache for the model's forward pass and for greedy generation; for the paged cache,
the pool read position by position through the block table (block ``table[t // block_size]``, offset
``t % block_size``), the definition of a block table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from autograders.engine.core import EXACT, Check, CheckSet, Mistake, Tolerance
from autograders.harness import kv_cache as H
from coursekit.gpt import generate

CHAPTER = H.CHAPTER

FP32 = Tolerance(1e-5, 1e-4, "float32 attention over a few dozen keys; a different but correct order of "
                             "operations (a fused kernel, a masked softmax) differs by ~1e-6")
FP32_MODEL = Tolerance(2e-5, 1e-4, "float32 through a few transformer layers; one token at a time and the whole "
                                   "sequence at once use different kernels and differ by ~1e-6 per layer")


# ---------------------------------------------------------------------------------------------
# 1. append to a layer's cache


def _append_ref(inputs):
    from transformers import DynamicCache  # the cache class transformers' models use

    cache = DynamicCache()
    for k_new, v_new in inputs["chunks"]:
        k, v = cache.update(k_new, v_new, layer_idx=0)
    return k, v


def _append_describe(inputs):
    B, H, _, d = inputs["chunks"][0][0].shape
    return f"B={B}, heads={H}, d_head={d}, appended chunks of lengths {[k.shape[2] for k, _ in inputs['chunks']]}"


def _append_on(dim, new_first=False):
    def wrong(past, k_new, v_new):
        if past is None:
            return k_new, v_new
        parts = lambda old, new: [new, old] if new_first else [old, new]  # noqa: E731
        return torch.cat(parts(past[0], k_new), dim=dim), torch.cat(parts(past[1], v_new), dim=dim)
    return wrong


def _append_forgets(past, k_new, v_new):
    return k_new, v_new


def _append_swaps(past, k_new, v_new):
    if past is None:
        return k_new, v_new
    return torch.cat([past[0], v_new], dim=2), torch.cat([past[1], k_new], dim=2)


APPEND = Check(
    H.APPEND,
    reference=_append_ref,
    tolerance=EXACT,
    describe_inputs=_append_describe,
    mistakes=(
        Mistake("new before old", _append_on(2, new_first=True),
                "the new entries are in front of the old ones: append at the END of the time axis "
                "(torch.cat([old, new], dim=2)), so position t stays at index t."),
        Mistake("appended along the head axis", _append_on(1),
                "you concatenated along axis 1, the heads: the cache grows along the time axis, dim=2 "
                "of (B, n_head, T, d_head)."),
        Mistake("appended along the feature axis", _append_on(-1),
                "you concatenated along the last axis (d_head): the cache grows along the time axis, dim=2."),
        Mistake("forgets the past", _append_forgets,
                "only the newest entries are returned: concatenate the cached keys/values with the new ones."),
        Mistake("keys and values swapped", _append_swaps,
                "keys end up in the value cache and values in the key cache: append k_new to past[0] and "
                "v_new to past[1]."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. attention of the newest queries over the whole cache


def _attend_ref(inputs):
    # Recompute causal attention for the WHOLE sequence and keep the rows of the newest queries.
    q_all, k, v = inputs["q_all"], inputs["k"], inputs["v"]
    T_q = inputs["q"].shape[2]
    return F.scaled_dot_product_attention(q_all, k, v, is_causal=True)[:, :, q_all.shape[2] - T_q:]


def _attend_describe(inputs):
    B, H, T_q, d = inputs["q"].shape
    return f"B={B}, heads={H}, {T_q} new quer{'y' if T_q == 1 else 'ies'}, {inputs['k'].shape[2]} keys, d_head={d}"


def _attend_top_left(q, k, v):  # what is_causal=True does when T_q < T_k
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _attend_no_mask(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _attend_unscaled(q, k, v):
    T_q, T_k = q.shape[2], k.shape[2]
    mask = torch.ones(T_q, T_k, dtype=torch.bool).tril(T_k - T_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


def _attend_softmax_wrong_axis(q, k, v):
    T_q, T_k = q.shape[2], k.shape[2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~torch.ones(T_q, T_k, dtype=torch.bool).tril(T_k - T_q), float("-inf"))
    w = torch.softmax(s, dim=-2).nan_to_num(0.0)
    return w @ v


def _attend_excludes_self(q, k, v):  # off by one: the newest query may not see its own key
    T_q, T_k = q.shape[2], k.shape[2]
    mask = torch.ones(T_q, T_k, dtype=torch.bool).tril(T_k - T_q - 1)
    s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0) @ v


ATTEND = Check(
    H.ATTEND,
    reference=_attend_ref,
    tolerance=FP32,
    describe_inputs=_attend_describe,
    mistakes=(
        Mistake("top-left causal mask", _attend_top_left,
                "your result matches a causal mask aligned to the top-left (what is_causal=True does in "
                "F.scaled_dot_product_attention when there are fewer queries than keys): query i is at "
                "position T_k - T_q + i and may see keys 0 .. T_k - T_q + i."),
        Mistake("no mask", _attend_no_mask,
                "your result matches attention without a mask: with several new queries, earlier ones "
                "must not see the keys of later ones."),
        Mistake("no scale", _attend_unscaled,
                "your result matches attention without the 1/sqrt(d_head) scale on the scores."),
        Mistake("softmax over the queries", _attend_softmax_wrong_axis,
                "your result matches a softmax over the queries (axis -2): normalise each query's "
                "scores over the keys (the last axis)."),
        Mistake("query cannot see itself", _attend_excludes_self,
                "your mask hides each query's own key (off by one): a query attends to its own position too."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 3-4. a GPT's forward pass with the cache, and greedy generation with it


_stack_cache = H._stack_cache


def _forward_ref(inputs):
    model = inputs["model"]
    parts = [p for p in (inputs["idx_past"], inputs["idx_new"]) if p is not None]
    logits, present = model(torch.cat(parts, dim=1), use_cache=True)  # everything recomputed
    T_past = 0 if inputs["idx_past"] is None else inputs["idx_past"].shape[1]
    return (logits[:, T_past:], *_stack_cache(present, model.config.n_layer))


def _forward_describe(inputs):
    B, T_new = inputs["idx_new"].shape
    T_past = 0 if inputs["idx_past"] is None else inputs["idx_past"].shape[1]
    c = inputs["model"].config
    return f"B={B}, {T_past} cached + {T_new} new tokens, d_model={c.d_model}, {c.n_layer} layers, {c.n_head} heads"


def _wrong_forward(*, restart_positions=False, skip_own=False, keep_only_new=False, top_left=False):
    def forward(model, idx, past=None):
        T = idx.shape[1]
        T_past = 0 if past is None else past[0][0].shape[2]
        start = 0 if restart_positions else T_past
        x = model.tok_emb(idx) + model.pos_emb(torch.arange(start, start + T))
        present = []
        for i, block in enumerate(model.blocks):
            attn = block.attn
            q, k, v = attn.project_qkv(block.ln_1(x))
            if past is not None:
                k_all = torch.cat([past[i][0], k], dim=2)
                v_all = torch.cat([past[i][1], v], dim=2)
            else:
                k_all, v_all = k, v
            if skip_own and past is not None:
                out = F.scaled_dot_product_attention(q, past[i][0], past[i][1])
            elif top_left or T == k_all.shape[2]:
                out = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True)
            else:
                mask = torch.ones(T, k_all.shape[2], dtype=torch.bool).tril(k_all.shape[2] - T)
                out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
            B = x.shape[0]
            x = x + attn.proj(out.transpose(1, 2).reshape(B, T, -1))
            x = x + block.mlp(block.ln_2(x))
            present.append((k, v) if keep_only_new else (k_all, v_all))
        return model.head(model.ln_f(x)), present
    return forward


def _given_append(past, k_new, v_new):
    """append_kv as gpt_forward_cached gets it while it is checked."""
    if past is None:
        return k_new, v_new
    return torch.cat([past[0], k_new], dim=2), torch.cat([past[1], v_new], dim=2)


def _given_attend(q, k, v):
    """attend_with_cache as gpt_forward_cached gets it while it is checked: the newest queries are the
    last T_q positions, so query i may see keys 0 .. T_k - T_q + i."""
    T_q, T_k = q.shape[2], k.shape[2]
    mask = torch.ones(T_q, T_k, dtype=torch.bool, device=q.device).tril(T_k - T_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


FORWARD = Check(
    H.FORWARD,
    reference=_forward_ref,
    tolerance=FP32_MODEL,
    describe_inputs=_forward_describe,
    mistakes=(
        Mistake("positions restart at 0", _wrong_forward(restart_positions=True),
                "the new tokens got positions 0, 1, ...: their positions continue after the cached ones "
                "(T_past, T_past + 1, ...), read T_past from the cache."),
        Mistake("new tokens see only the cache", _wrong_forward(skip_own=True),
                "the new tokens attend only to the cached keys: append their own keys and values first, "
                "then attend over the whole cache."),
        Mistake("returns only the new keys/values", _wrong_forward(keep_only_new=True),
                "the returned cache holds only the new tokens' keys and values: return the appended cache "
                "(old + new) for every layer."),
        Mistake("top-left causal mask", _wrong_forward(top_left=True),
                "with several new tokens after a cache, is_causal=True aligns the mask to the top-left: "
                "use your attend_with_cache."),
    ),
    given={"append_kv": _given_append, "attend_with_cache": _given_attend},
)


def _generate_ref(inputs):
    # Recompute the whole sequence at every step: slow, but obviously right.
    out = generate(inputs["model"], inputs["idx"], inputs["max_new_tokens"], use_cache=False)
    return out, torch.tensor([inputs["idx"].shape[1] + inputs["max_new_tokens"] - 1])  # the task's shape


def _generate_describe(inputs):
    B, T = inputs["idx"].shape
    return f"B={B}, prompt of {T} tokens, max_new_tokens={inputs['max_new_tokens']}"


def _gen_no_cache(model, idx, max_new_tokens):
    return generate(model, idx, max_new_tokens, use_cache=False)


def _gen_only_new(model, idx, max_new_tokens):
    return generate(model, idx, max_new_tokens)[:, idx.shape[1]:]


def _gen_refeeds_last_prompt_token(model, idx, max_new_tokens):
    _, past = model(idx[:, :-1], use_cache=True) if idx.shape[1] > 1 else (None, None)
    nxt = idx[:, -1:]
    out = idx
    for _ in range(max_new_tokens):
        logits, past = model(nxt, past=past, use_cache=True)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
    return out  # right tokens, but the last prompt token goes through the model twice


def _gen_extra_step(model, idx, max_new_tokens):
    logits, past = model(idx, use_cache=True)
    out = idx
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
        logits, past = model(nxt, past=past, use_cache=True)  # one step too many: its logits are unused
    return out


def _gen_first_logits(model, idx, max_new_tokens):
    logits, past = model(idx, use_cache=True)
    out = idx
    for _ in range(max_new_tokens):
        nxt = logits[:, 0].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
        logits, past = model(nxt, past=past, use_cache=True)
    return out


GENERATE = Check(
    H.GENERATE,
    reference=_generate_ref,
    tolerance=EXACT,
    describe_inputs=_generate_describe,
    mistakes=(
        Mistake("no cache", _gen_no_cache,
                "the tokens are right but the whole sequence goes through the model at every step: run the "
                "prompt once (prefill), then feed only the newest token with the cache."),
        Mistake("only the new tokens", _gen_only_new,
                "return the prompt followed by the new tokens: shape (B, T + max_new_tokens)."),
        Mistake("last prompt token fed twice", _gen_refeeds_last_prompt_token,
                "the last prompt token went through the model twice: the prefill's logits at the last "
                "position already give the first new token."),
        Mistake("one step too many", _gen_extra_step,
                "the model ran once more after the last token was chosen: max_new_tokens tokens need the "
                "prefill plus max_new_tokens - 1 single-token steps."),
        Mistake("logits of the first position", _gen_first_logits,
                "the next token comes from the logits at the LAST position (logits[:, -1]), not the first."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 5. a paged cache: gather one sequence's positions from the pool, in block-table order


def _gather_ref(inputs):
    pool, table, length = inputs["pool"], inputs["block_table"], inputs["length"]
    bs = pool.shape[2]
    return torch.stack([pool[int(table[t // bs]), :, t % bs] for t in range(length)], dim=1)


def _gather_describe(inputs):
    nb, H, bs, d = inputs["pool"].shape
    return (f"pool of {nb} blocks of {bs} positions, {H} heads, d_head={d}; a table of "
            f"{inputs['block_table'].numel()} block(s); length {inputs['length']}")


def _gather_sorted(pool, block_table, length):
    H, bs, d = pool.shape[1:]
    blocks = pool[block_table.sort().values]
    return blocks.permute(1, 0, 2, 3).reshape(H, -1, d)[:, :length]


def _gather_no_permute(pool, block_table, length):
    H, bs, d = pool.shape[1:]
    return pool[block_table].reshape(H, -1, d)[:, :length]


def _gather_first_blocks(pool, block_table, length):
    H, bs, d = pool.shape[1:]
    return pool[: block_table.numel()].permute(1, 0, 2, 3).reshape(H, -1, d)[:, :length]


def _gather_last_positions(pool, block_table, length):
    H, bs, d = pool.shape[1:]
    flat = pool[block_table].permute(1, 0, 2, 3).reshape(H, -1, d)
    return flat[:, flat.shape[1] - length:]


GATHER = Check(
    H.GATHER,
    reference=_gather_ref,
    tolerance=EXACT,
    describe_inputs=_gather_describe,
    mistakes=(
        Mistake("blocks in id order", _gather_sorted,
                "your positions come from the right blocks but in the order of their ids: blocks are handed "
                "out as they are needed, so a sequence's blocks are anywhere in the pool -- read them in "
                "block-table order (block_table[0] holds positions 0 .. block_size - 1)."),
        Mistake("heads and positions mixed", _gather_no_permute,
                "pool[block_table] is (n_blocks, H, block_size, d_head): move the head axis first "
                "(permute(1, 0, 2, 3)) before merging blocks and positions, or heads get mixed into positions."),
        Mistake("the first blocks of the pool", _gather_first_blocks,
                "you read blocks 0, 1, 2, ... of the pool: the sequence's blocks are the ones its block table "
                "names, pool[block_table]."),
        Mistake("the last positions", _gather_last_positions,
                "the positions of a sequence start at the beginning of its first block; the unfilled slots "
                "are at the END of its last block: keep the first `length` positions."),
    ),
)


CHECKS = CheckSet(CHAPTER, [APPEND, ATTEND, FORWARD, GENERATE, GATHER])
check = CHECKS.check
