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
# 3. GroupedQueryAttention module; with n_kv_head == n_head it is nn.MultiheadAttention

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


# ---------------------------------------------------------------------------------------------
# 4. predicted_speedup: a memory-bound decoding step, bytes moved by the baseline over the variant's

def _speedup_case(base_w, base_c, w, c, passes=None):
    def make(g):
        inputs = {"base_weight_bytes": base_w, "base_cache_bytes": base_c, "weight_bytes": w, "cache_bytes": c}
        if passes is not None:
            inputs["cache_passes"] = passes
        return inputs
    return make


def _random_speedup_case(g):
    n_head = [8, 16, 32][int(torch.randint(0, 3, (), generator=g))]
    n_kv = [1, 2, 4, 8][int(torch.randint(0, 4, (), generator=g))]
    base_w = int(torch.randint(10**6, 10**9, (), generator=g))
    base_c = int(torch.randint(10**5, 10**9, (), generator=g))
    # the variant's weights shrink a little (smaller key/value projections), its cache by n_head / n_kv
    w = base_w - int(torch.randint(0, base_w // 10, (), generator=g))
    return {"base_weight_bytes": base_w, "base_cache_bytes": base_c, "weight_bytes": w,
            "cache_bytes": base_c * n_kv // n_head, "cache_passes": int(torch.randint(1, 4, (), generator=g))}


def _call_speedup(impl, inputs):
    value = impl(**inputs)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"predicted_speedup must return one number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"predicted_speedup must return a number, got {type(value).__name__}")
    return torch.tensor([float(value)], dtype=torch.float64)  # one number, as a 1-element array


SPEEDUP = Task(
    "predicted_speedup",
    cases=(
        Case("GQA (2 of 8 KV heads), one pass over the cache, weights and cache of equal size",
             _speedup_case(12_000_000, 12_000_000, 10_500_000, 3_000_000)),
        Case("MQA, 3 passes over the cache (the torch.cat cache)",
             _speedup_case(13_424_640, 12_845_056, 11_582_464, 1_605_632, 3)),
        Case("a tiny cache next to the weights: almost no speed-up", _speedup_case(8_000_000_000, 2_000_000,
                                                                                 7_500_000_000, 250_000),
             hidden=True),
        Case("a huge cache (long context, large batch), 1 pass", _speedup_case(14_000_000_000, 64_000_000_000,
                                                                              13_000_000_000, 8_000_000_000),
             hidden=True),
        Case("the same model (speed-up 1)", _speedup_case(5_000, 7_000, 5_000, 7_000, 2), hidden=True),
        Case("2 passes, an empty baseline cache", _speedup_case(1_000_000, 0, 900_000, 0, 2), hidden=True),
        Case("a random configuration", _random_speedup_case, hidden=True),
    ),
    call=_call_speedup,
)


TASKS = TaskSet(CHAPTER, [REPEAT_KV, GQA, MODULE, SPEEDUP])
