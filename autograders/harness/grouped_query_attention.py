"""Tasks of chapter 08, multi-query and grouped-query attention: inputs, calls and rules (what the
grading sandbox sees).

Conventions (stated in the notebook too): heads live on axis 1, so queries are (B, H, T_q, d_head)
and keys/values (B, H_kv, T_k, d_head) with ``H % H_kv == 0``; query head ``h`` uses key/value head
``h // (H // H_kv)`` -- consecutive query heads form a group.
"""

from __future__ import annotations

import torch

from autograders.engine.core import Case, Forbid, Task, TaskSet, randn

CHAPTER = "08_grouped_query_attention"


# ---------------------------------------------------------------------------------------------
# 1. repeat_kv: (B, H_kv, T, d) -> (B, H_kv * n_rep, T, d), each head repeated n_rep times in a row

def _kv_inputs(B, H_kv, T, d, n_rep, scale=1.0):
    return lambda g: {"x": randn(g, B, H_kv, T, d, scale=scale), "n_rep": n_rep}


REPEAT_KV = Task(
    "repeat_kv",
    cases=(
        Case("2 KV heads repeated twice", _kv_inputs(1, 2, 3, 4, 2)),
        Case("3 KV heads repeated 2 times, batch 2", _kv_inputs(2, 3, 5, 4, 2)),
        Case("MQA: one KV head repeated 4 times", _kv_inputs(2, 1, 5, 4, 4), hidden=True),
        Case("n_rep=1 leaves the tensor as it is", _kv_inputs(2, 4, 3, 8, 1), hidden=True),
        Case("4 KV heads repeated 3 times, T=1", _kv_inputs(3, 4, 1, 8, 3), hidden=True),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. grouped_query_attention(q, k, v, causal) == F.scaled_dot_product_attention(..., enable_gqa=True)

def _gqa_inputs(B, H, H_kv, T_q, T_k, d, causal, scale=1.0):
    def make(g):
        return {"q": randn(g, B, H, T_q, d, scale=scale), "k": randn(g, B, H_kv, T_k, d, scale=scale),
                "v": randn(g, B, H_kv, T_k, d), "causal": causal}
    return make


# F.scaled_dot_product_attention(..., enable_gqa=True) computes the whole exercise; every route to
# PyTorch's fused attention (the kernels it dispatches to, nn.MultiheadAttention) is refused.
NO_FUSED_ATTENTION = Forbid(
    "write the attention yourself (scores, mask, softmax, weighted sum): F.scaled_dot_product_attention "
    "and nn.MultiheadAttention are not allowed in grouped_query_attention",
    functions=("scaled_dot_product_attention", "multi_head_attention_forward", "_scaled_dot_product_attention_math",
               "_native_multi_head_attention"),
    ops=("aten.scaled_dot_product_attention", "aten._scaled_dot_product_attention_math",
         "aten._scaled_dot_product_attention_math_for_mps", "aten._scaled_dot_product_flash_attention",
         "aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_efficient_attention",
         "aten._scaled_dot_product_cudnn_attention", "aten._scaled_dot_product_fused_attention_overrideable",
         "aten._flash_attention_forward", "aten._efficient_attention_forward", "aten._native_multi_head_attention"),
)

GQA = Task(
    "grouped_query_attention",
    cases=(
        Case("GQA: 4 query heads, 2 KV heads, T=5, d=8", _gqa_inputs(1, 4, 2, 5, 5, 8, False)),
        Case("MQA: 4 query heads, 1 KV head, batch 2, causal", _gqa_inputs(2, 4, 1, 6, 6, 8, True)),
        Case("MHA: 3 query heads, 3 KV heads, causal (plain multi-head attention)",
             _gqa_inputs(2, 3, 3, 4, 4, 8, True), hidden=True),
        Case("one new query against 7 cached keys (decoding), 8 heads, 2 KV heads",
             _gqa_inputs(2, 8, 2, 1, 7, 16, False), hidden=True),
        Case("6 query heads, 3 KV heads, T=9, causal, large inputs",
             _gqa_inputs(3, 6, 3, 9, 9, 16, True, scale=4.0), hidden=True),
        Case("4 query heads, 2 KV heads, 3 queries, 6 keys, no mask", _gqa_inputs(1, 4, 2, 3, 6, 4, False),
             hidden=True),
    ),
    rules=(NO_FUSED_ATTENTION,),
    uses=("repeat_kv",),
)


# ---------------------------------------------------------------------------------------------
# 3. kv_cache_bytes: the size of the cache, against the bytes of real (meta) tensors of that shape

def _cache_case(n_layer, n_head, n_kv_head, d_model, batch, seq_len, bytes_per_element):
    return lambda g: {"n_layer": n_layer, "n_head": n_head, "n_kv_head": n_kv_head, "d_model": d_model,
                      "batch": batch, "seq_len": seq_len, "bytes_per_element": bytes_per_element}


def _random_cache_case(g):
    n_head = int(torch.randint(1, 5, (), generator=g)) * 4
    n_kv_head = [1, 2, 4][int(torch.randint(0, 3, (), generator=g))]
    return {"n_layer": int(torch.randint(1, 13, (), generator=g)), "n_head": n_head, "n_kv_head": n_kv_head,
            "d_model": n_head * 16, "batch": int(torch.randint(1, 9, (), generator=g)),
            "seq_len": int(torch.randint(1, 2049, (), generator=g)), "bytes_per_element": 4}


KV_CACHE = Task(
    "kv_cache_bytes",
    cases=(
        Case("MHA: 4 layers, 8 heads, d_model=256, batch 1, 128 tokens, float32",
             _cache_case(4, 8, 8, 256, 1, 128, 4)),
        Case("GQA: 32 layers, 32 heads, 8 KV heads, d_model=4096, batch 1, 4096 tokens, float16",
             _cache_case(32, 32, 8, 4096, 1, 4096, 2)),
        Case("MQA: 12 layers, 12 heads, 1 KV head, d_model=768, batch 8, 1024 tokens, float32",
             _cache_case(12, 12, 1, 768, 8, 1024, 4), hidden=True),
        Case("80 layers, 64 heads, 8 KV heads, d_model=8192, batch 16, 4096 tokens, float16",
             _cache_case(80, 64, 8, 8192, 16, 4096, 2), hidden=True),
        Case("int8 cache, 2 layers, 4 heads, 2 KV heads, batch 3, 5 tokens", _cache_case(2, 4, 2, 64, 3, 5, 1),
             hidden=True),
        Case("an empty cache (seq_len=0)", _cache_case(4, 8, 2, 256, 2, 0, 4), hidden=True),
        Case("a random configuration", _random_cache_case, hidden=True),
    ),
)


# ---------------------------------------------------------------------------------------------
# 4. GroupedQueryAttention module; with n_kv_head == n_head it is nn.MultiheadAttention

def _module_inputs(B, T, d_model, n_head, n_kv_head, causal, scale=1.0):
    def make(g):
        d_kv = n_kv_head * (d_model // n_head)
        return {"x": randn(g, B, T, d_model, scale=scale), "d_model": d_model, "n_head": n_head,
                "n_kv_head": n_kv_head, "causal": causal,
                # nn.Linear layout: (out_features, in_features)
                "W_q": randn(g, d_model, d_model, scale=d_model ** -0.5),
                "W_k": randn(g, d_kv, d_model, scale=d_model ** -0.5),
                "W_v": randn(g, d_kv, d_model, scale=d_model ** -0.5),
                "W_o": randn(g, d_model, d_model, scale=d_model ** -0.5)}
    return make


def _call_module(impl, inputs):
    module = impl(inputs["d_model"], inputs["n_head"], inputs["n_kv_head"])
    for name in ("W_q", "W_k", "W_v", "W_o"):
        layer = getattr(module, name, None)
        if layer is None or not hasattr(layer, "weight"):
            raise AttributeError(f"GroupedQueryAttention must keep its projection {name} as an nn.Linear "
                                 f"attribute (self.{name}), as in the given __init__")
        if tuple(layer.weight.shape) != tuple(inputs[name].shape):
            raise ValueError(f"self.{name}.weight has shape {tuple(layer.weight.shape)}, expected "
                             f"{tuple(inputs[name].shape)} (out_features, in_features)")
        layer.weight.copy_(inputs[name])
    return module(inputs["x"], causal=inputs["causal"])


MODULE = Task(
    "GroupedQueryAttention",
    cases=(
        Case("GQA: d_model=16, 4 heads, 2 KV heads, batch 2, T=5, causal", _module_inputs(2, 5, 16, 4, 2, True)),
        Case("MHA: d_model=16, 4 heads, 4 KV heads, causal (vs nn.MultiheadAttention)",
             _module_inputs(2, 5, 16, 4, 4, True)),
        Case("MQA: d_model=32, 8 heads, 1 KV head, T=7, causal", _module_inputs(2, 7, 32, 8, 1, True), hidden=True),
        Case("GQA: d_model=24, 6 heads, 3 KV heads, no mask", _module_inputs(3, 6, 24, 6, 3, False), hidden=True),
        Case("MHA: d_model=12, 3 heads, no mask (vs nn.MultiheadAttention)",
             _module_inputs(1, 4, 12, 3, 3, False), hidden=True),
        Case("a single position (T=1), 4 heads, 2 KV heads", _module_inputs(2, 1, 16, 4, 2, True), hidden=True),
        Case("large inputs, 8 heads, 2 KV heads, causal", _module_inputs(2, 6, 32, 8, 2, True, scale=4.0),
             hidden=True),
    ),
    call=_call_module,
    uses=("grouped_query_attention",),
)


TASKS = TaskSet(CHAPTER, [REPEAT_KV, GQA, KV_CACHE, MODULE])
