"""Tasks of chapter 07, the KV cache: inputs, calls and rules (what the grading sandbox sees).

Conventions (stated in the notebook too): keys, values and queries are laid out as
``(B, n_head, T, d_head)``, the layout of ``F.scaled_dot_product_attention`` and of the cache of
``coursekit.gpt`` and of Hugging Face ``transformers``; a layer's cache is a pair ``(k, v)``, a model's
cache a list with one pair per layer; ``None`` means "nothing cached yet".

The models are small random ``coursekit.gpt.GPT``\\ s; the forward pass with a cache starts from the
cache ``GPT.forward(..., use_cache=True)`` builds for the earlier tokens.
"""

from __future__ import annotations

import torch

from autograders.engine.core import Case, Task, TaskSet, randn
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
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(vocab_size=vocab, d_model=d_model, n_layer=n_layer, n_head=n_head,
                              max_len=max_len)).eval()
        with torch.no_grad():
            # Larger embeddings than GPT-2's init: well separated logits, so greedy choices are clear-cut.
            model.tok_emb.weight.normal_(0.0, 1.0)
            model.pos_emb.weight.normal_(0.0, 0.5)
    return model


def _forward_inputs(g, B, T_past, T_new, **config):
    model = _model(g, **config)
    V = model.config.vocab_size
    idx_past = torch.randint(0, V, (B, T_past), generator=g) if T_past else None
    return {"model": model, "idx_past": idx_past, "idx_new": torch.randint(0, V, (B, T_new), generator=g)}


def _stack_cache(cache, n_layer):
    if not isinstance(cache, (list, tuple)) or len(cache) != n_layer:
        raise TypeError(f"the cache must be a list with one (k, v) pair per layer ({n_layer}), got "
                        f"{type(cache).__name__}{'' if not hasattr(cache, '__len__') else f' of length {len(cache)}'}")
    return torch.stack([kv[0] for kv in cache]), torch.stack([kv[1] for kv in cache])


def _call_forward(impl, inputs):
    model = inputs["model"]
    past = None
    if inputs["idx_past"] is not None:
        _, past = model(inputs["idx_past"], use_cache=True)  # a known-good cache of the earlier tokens
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
    return out, sum(fed)


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
)


TASKS = TaskSet(CHAPTER, [APPEND, ATTEND, FORWARD, GENERATE])
