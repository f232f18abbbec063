"""Tasks of chapter 07, the KV cache: inputs, calls and rules (what the grading sandbox sees).

Conventions (stated in the notebook too): keys, values and queries are laid out as
``(B, n_head, T, d_head)``, the layout of ``F.scaled_dot_product_attention`` and of the cache of
``coursekit.gpt`` and of Hugging Face ``transformers``; a layer's cache is a pair ``(k, v)``, a model's
cache a list with one pair per layer; ``None`` means "nothing cached yet".

The models are small random ``coursekit.gpt.GPT``\\ s; the forward pass with a cache starts from the
cache ``GPT.forward(..., use_cache=True)`` builds for the earlier tokens (built with the inputs, before the
student's function runs). ``GPT.forward(past=..., use_cache=True)`` and ``coursekit.gpt.generate`` compute
what Exercises 3 and 4 ask, so those exercises forbid the model's own forward paths (the model's, its
blocks' and their attention's) and ``coursekit.gpt``'s ``generate`` / ``decode_step`` / ``StaticKVCache``
with ``Forbid(callables=...)``: a call is seen however it is reached.

A paged cache (Exercise 5) is a pool ``(num_blocks, n_kv_head, block_size, d_head)`` and a block table:
position ``t`` lives in block ``table[t // block_size]`` at offset ``t % block_size``.
"""

from __future__ import annotations

import torch

from autograders.engine.core import Case, Forbid, Task, TaskSet, randn
from coursekit.gpt import GPT, GPTConfig

CHAPTER = "07_kv_cache"


# ---------------------------------------------------------------------------------------------
# 1. append to a layer's cache

def _chunks(g, B, H, d, lengths, scale=1.0):
    return {"chunks": [(randn(g, B, H, t, d, scale=scale), randn(g, B, H, t, d, scale=scale)) for t in lengths]}


def _call_append(impl, inputs):
    past = None
    for k_new, v_new in inputs["chunks"]:
        result = impl(past, k_new.clone(), v_new.clone())
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise TypeError(f"append_kv must return a pair (k, v), got a {type(result).__name__}")
        past = tuple(result)
    return past


APPEND = Task(
    "append_kv",
    cases=(
        Case("empty cache, then one token", lambda g: _chunks(g, 1, 2, 4, [1, 1])),
        Case("a prompt of 5, then 3 single tokens", lambda g: _chunks(g, 1, 4, 8, [5, 1, 1, 1])),
        Case("batch 2, prompt of 4, then a chunk of 3, then one token", lambda g: _chunks(g, 2, 3, 8, [4, 3, 1]),
             hidden=True),
        Case("only the prompt (nothing cached before)", lambda g: _chunks(g, 3, 2, 4, [6]), hidden=True),
        Case("batch 3, 8 heads, d_head=16, ten single tokens", lambda g: _chunks(g, 3, 8, 16, [1] * 10),
             hidden=True),
    ),
    call=_call_append,
    output_names=("k", "v"),
)


# ---------------------------------------------------------------------------------------------
# 2. attention of the newest queries over the whole cache

def _attn_inputs(g, B, H, T_k, T_q, d, scale=1.0):
    q_all = randn(g, B, H, T_k, d, scale=scale)
    return {"q": q_all[:, :, T_k - T_q:].clone(), "k": randn(g, B, H, T_k, d, scale=scale),
            "v": randn(g, B, H, T_k, d), "q_all": q_all}


def _call_attend(impl, inputs):
    return impl(inputs["q"], inputs["k"], inputs["v"])


ATTEND = Task(
    "attend_with_cache",
    cases=(
        Case("decode: 1 query over 6 cached keys", lambda g: _attn_inputs(g, 1, 2, 6, 1, 8)),
        Case("prefill: 5 queries over their own 5 keys", lambda g: _attn_inputs(g, 1, 2, 5, 5, 8)),
        Case("a chunk of 3 queries over 7 keys", lambda g: _attn_inputs(g, 1, 4, 7, 3, 8)),
        Case("batch 2, 4 queries over 11 keys", lambda g: _attn_inputs(g, 2, 3, 11, 4, 16), hidden=True),
        Case("batch 3, 1 query over 1 key", lambda g: _attn_inputs(g, 3, 2, 1, 1, 4), hidden=True),
        Case("large scores: 2 queries over 9 keys, inputs x4", lambda g: _attn_inputs(g, 2, 2, 9, 2, 8, scale=4.0),
             hidden=True),
        Case("decode over a long cache: 1 query over 40 keys, d_head=32",
             lambda g: _attn_inputs(g, 2, 4, 40, 1, 32), hidden=True),
    ),
    call=_call_attend,
)


# ---------------------------------------------------------------------------------------------
# 3-4. a GPT's forward pass with the cache, and greedy generation with it

def _model(g, vocab=23, d_model=32, n_layer=2, n_head=4, max_len=64):
    """A random GPT whose every weight comes from the case's generator (never the global one, which
    threads that build inputs at the same time would share): GPT-2's init, with larger embeddings."""
    model = GPT(GPTConfig(vocab_size=vocab, d_model=d_model, n_layer=n_layer, n_head=n_head,
                          max_len=max_len)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # the tied head is the token embedding, set once
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                std = {"tok_emb.weight": 1.0, "pos_emb.weight": 0.5}.get(name, 0.02)
                if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                    std = 0.02 / (2 * n_layer) ** 0.5
                # Larger embeddings than GPT-2's init: well separated logits, so greedy choices are clear-cut.
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _forward_inputs(g, B, T_past, T_new, **config):
    model = _model(g, **config)
    V = model.config.vocab_size
    idx_past = torch.randint(0, V, (B, T_past), generator=g) if T_past else None
    past = None
    if idx_past is not None:
        with torch.no_grad():
            _, past = model(idx_past, use_cache=True)  # a known-good cache of the earlier tokens
    return {"model": model, "idx_past": idx_past, "idx_new": torch.randint(0, V, (B, T_new), generator=g),
            "past": past}


# ---- the model's own cached paths, watched while the student's function runs

_SDPA_OPS = ("aten.scaled_dot_product_attention", "aten._scaled_dot_product_attention_math",
             "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_flash_attention_for_cpu",
             "aten._scaled_dot_product_efficient_attention", "aten._scaled_dot_product_cudnn_attention",
             "aten._scaled_dot_product_fused_attention_overrideable", "aten._flash_attention_forward",
             "aten._efficient_attention_forward")
# every route to the model's own cached computation, seen however it is reached (Forbid(callables=...))
_OWN_PATHS = ("coursekit.gpt:GPT.forward", "coursekit.gpt:Block.forward", "coursekit.gpt:CausalSelfAttention.forward",
              "coursekit.gpt:CausalSelfAttention.attend", "coursekit.gpt:generate", "coursekit.gpt:decode_step",
              "coursekit.gpt:StaticKVCache.*")


def _own_calls_rule(exercise, instead):
    return Forbid(
        f"{instead}: the model's own forward (model(...), model.forward, GPT.forward, a block's or its "
        f"attention's forward or attend) and coursekit.gpt's generate / decode_step / StaticKVCache compute "
        f"this exercise for you and are not allowed in {exercise}",
        callables=_OWN_PATHS,
    )


def _stack_cache(cache, n_layer):
    if not isinstance(cache, (list, tuple)) or len(cache) != n_layer:
        raise TypeError(f"the cache must be a list with one (k, v) pair per layer ({n_layer}), got "
                        f"{type(cache).__name__}{'' if not hasattr(cache, '__len__') else f' of length {len(cache)}'}")
    return torch.stack([kv[0] for kv in cache]), torch.stack([kv[1] for kv in cache])


def _call_forward(impl, inputs):
    model = inputs["model"]
    past = None if inputs["past"] is None else [(k.clone(), v.clone()) for k, v in inputs["past"]]
    result = impl(model, inputs["idx_new"], past)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise TypeError("gpt_forward_cached must return a pair (logits, cache)")
    logits, present = result
    return (logits, *_stack_cache(present, model.config.n_layer))


FORWARD = Task(
    "gpt_forward_cached",
    cases=(
        Case("prefill: 6 tokens, nothing cached", lambda g: _forward_inputs(g, 1, 0, 6)),
        Case("decode: 1 new token after 7 cached", lambda g: _forward_inputs(g, 1, 7, 1)),
        Case("batch 2, a chunk of 3 new tokens after 5 cached", lambda g: _forward_inputs(g, 2, 5, 3), hidden=True),
        Case("batch 3, 1 token after 20 cached, 3 layers, d_model=48, 2 heads",
             lambda g: _forward_inputs(g, 3, 20, 1, d_model=48, n_layer=3, n_head=2), hidden=True),
        Case("batch 2, a single-token prompt", lambda g: _forward_inputs(g, 2, 0, 1), hidden=True),
        Case("decode at the last position (max_len=12)",
             lambda g: _forward_inputs(g, 1, 11, 1, max_len=12), hidden=True),
    ),
    call=_call_forward,
    output_names=("logits", "cached keys (stacked over layers)", "cached values (stacked over layers)"),
    rules=(_own_calls_rule("gpt_forward_cached", "build the forward pass from the model's pieces with your "
                           "append_kv and attend_with_cache"),
           Forbid("attention comes from your attend_with_cache (a correct one while this exercise is checked): "
                  "F.scaled_dot_product_attention, which the model's own forward, generate and decode_step run, "
                  "is not allowed directly in gpt_forward_cached",
                  functions=("scaled_dot_product_attention",), ops=_SDPA_OPS)),
    uses=("append_kv", "attend_with_cache"),
)


def _generate_inputs(g, B, T, N, **config):
    model = _model(g, **config)
    return {"model": model, "idx": torch.randint(0, model.config.vocab_size, (B, T), generator=g),
            "max_new_tokens": N}


def _call_generate(impl, inputs):
    model = inputs["model"]
    fed = []
    handle = model.tok_emb.register_forward_hook(lambda module, args, out: fed.append(args[0].shape[-1]))
    try:
        out = impl(model, inputs["idx"].clone(), inputs["max_new_tokens"])
    finally:
        handle.remove()
    return out, torch.tensor([sum(fed)])  # one count, as a 1-element array


GENERATE = Task(
    "generate_cached",
    cases=(
        Case("one prompt of 4 tokens, 10 new tokens", lambda g: _generate_inputs(g, 1, 4, 10)),
        Case("batch 2, prompts of 3 tokens, 6 new tokens", lambda g: _generate_inputs(g, 2, 3, 6)),
        Case("a single-token prompt, 1 new token", lambda g: _generate_inputs(g, 1, 1, 1), hidden=True),
        Case("batch 3, prompts of 5, 25 new tokens, 3 layers",
             lambda g: _generate_inputs(g, 3, 5, 25, n_layer=3), hidden=True),
        Case("up to max_len: prompt of 4, 12 new tokens, max_len=16",
             lambda g: _generate_inputs(g, 2, 4, 12, max_len=16), hidden=True),
    ),
    call=_call_generate,
    output_names=("tokens", "tokens fed to the model"),
    rules=(_own_calls_rule("generate_cached", "generate with your gpt_forward_cached"),),
)


# ---------------------------------------------------------------------------------------------
# 5. a paged cache: gather one sequence's positions from the pool, in block-table order

def _paged_inputs(H, d, block_size, length, num_blocks, extra_blocks=0, scale=1.0):
    def make(g):
        n = -(-length // block_size) + extra_blocks
        return {"pool": randn(g, num_blocks, H, block_size, d, scale=scale),  # other sequences' data too
                "block_table": torch.randperm(num_blocks, generator=g)[:n],  # blocks handed out in any order
                "length": length}
    return make


def _call_gather(impl, inputs):
    return impl(inputs["pool"].clone(), inputs["block_table"].clone(), inputs["length"])


GATHER = Task(
    "gather_blocks",
    cases=(
        Case("10 positions in blocks of 4 (the last block partly filled), 2 heads", _paged_inputs(2, 3, 4, 10, 9)),
        Case("16 positions filling 4 blocks of 4 exactly, 3 heads", _paged_inputs(3, 4, 4, 16, 12)),
        Case("block size 1: the table lists every position's block", _paged_inputs(2, 2, 1, 7, 10), hidden=True),
        Case("one position", _paged_inputs(1, 4, 8, 1, 5), hidden=True),
        Case("the table holds one block more than the length needs", _paged_inputs(2, 4, 4, 9, 10, extra_blocks=1),
             hidden=True),
        Case("100 positions in blocks of 16, 4 heads, d_head 8", _paged_inputs(4, 8, 16, 100, 20), hidden=True),
    ),
    call=_call_gather,
)


TASKS = TaskSet(CHAPTER, [APPEND, ATTEND, FORWARD, GENERATE, GATHER])
