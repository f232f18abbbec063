"""Tasks of chapter 01, self-attention: inputs, calls and rules (what the grading sandbox sees).

Conventions (stated in the notebook too): a sequence is a (T, d) matrix of row vectors, or a batch
(B, T, d); projections are plain matrices used as ``X @ W``; a boolean mask is True where a query
may attend to a key.
"""

from __future__ import annotations

import torch

from autograders.engine.core import Case, Forbid, Require, Task, TaskSet, Trace, randn

CHAPTER = "01_self_attention"


# ---------------------------------------------------------------------------------------------
# 1. stable softmax

def _with_inf(g):
    s = randn(g, 4, 6)
    s[0, 1] = s[2, 0] = s[2, 5] = s[3, 3] = float("-inf")
    return {"scores": s, "dim": -1}


NO_SOFTMAX = Forbid(
    "compute the softmax yourself (max, exp, sum): torch.softmax, F.softmax, Tensor.softmax, nn.Softmax and "
    "the log_softmax / softmin / logsumexp shortcuts are not allowed in stable_softmax",
    functions=("softmax", "log_softmax", "special_softmax", "special_log_softmax", "softmin", "_softmax",
               "_log_softmax", "logsumexp", "special_logsumexp"),
    ops=("aten._softmax", "aten._log_softmax", "aten._safe_softmax", "aten.softmax", "aten.log_softmax",
         "aten.logsumexp"),
)

SOFTMAX = Task(
    "stable_softmax",
    cases=(
        Case("one row of 5 scores", lambda g: {"scores": randn(g, 5), "dim": -1}),
        Case("4x6 matrix, along the last axis", lambda g: {"scores": randn(g, 4, 6), "dim": -1}),
        Case("3x5 matrix, along axis 0", lambda g: {"scores": randn(g, 3, 5), "dim": 0}),
        Case("scores around 100 (exp overflows in float32)",
             lambda g: {"scores": randn(g, 2, 5, scale=5.0) + 100.0, "dim": -1}),
        Case("large scores (about +-1000)", lambda g: {"scores": randn(g, 3, 7, scale=1000.0), "dim": -1},
             hidden=True),
        Case("masked entries set to -inf", _with_inf, hidden=True),
        Case("batch 2x3x4, along axis 1", lambda g: {"scores": randn(g, 2, 3, 4), "dim": 1}, hidden=True),
        Case("a single score", lambda g: {"scores": randn(g, 1), "dim": -1}, hidden=True),
    ),
    rules=(NO_SOFTMAX,),
)


# ---------------------------------------------------------------------------------------------
# 2. scaled dot-product relevance scores

SCORES = Task(
    "scaled_scores",
    cases=(
        Case("3 queries, 4 keys, d=8", lambda g: {"Q": randn(g, 3, 8), "K": randn(g, 4, 8)}),
        Case("4 queries, 4 keys, d=16", lambda g: {"Q": randn(g, 4, 16), "K": randn(g, 4, 16)}),
        Case("batched: (2, 5, 16) and (2, 7, 16)", lambda g: {"Q": randn(g, 2, 5, 16), "K": randn(g, 2, 7, 16)},
             hidden=True),
        Case("d=1", lambda g: {"Q": randn(g, 3, 1), "K": randn(g, 2, 1)}, hidden=True),
        Case("one query, 6 keys, d=32", lambda g: {"Q": randn(g, 1, 32), "K": randn(g, 6, 32)}, hidden=True),
    ),
)


# ---------------------------------------------------------------------------------------------
# 3-4. attention from a sequence: loop form and matrix form

def _projections(g, T, d_in, d_k, d_v, batch=None, scale=1.0):
    shape = (T, d_in) if batch is None else (batch, T, d_in)
    return {
        "X": randn(g, *shape, scale=scale),
        "W_q": randn(g, d_in, d_k, scale=d_in ** -0.5),
        "W_k": randn(g, d_in, d_k, scale=d_in ** -0.5),
        "W_v": randn(g, d_in, d_v, scale=d_in ** -0.5),
    }


# A product of vectors, however it is written (@, torch.dot, torch.mv, *), as ATen sees it.
PRODUCT_OPS = ("aten.mm", "aten.mv", "aten.dot", "aten.vdot", "aten.bmm", "aten.addmm", "aten.addmv",
               "aten.baddbmm", "aten.addbmm", "aten.mul", "aten.mul_")


def _products(trace: Trace) -> int:
    return trace.count(*PRODUCT_OPS)


# The three projections X @ W are 3 products whatever the form; the matrix form adds only Q @ K^T
# and A @ V (5 in all), the loop form at least one product for each query's scores and one for its
# weighted sum of values (2T + 3 or more). T = 1 cannot tell them apart and does not need to.
ONE_QUERY_AT_A_TIME = Require(
    "attention_loop must loop over the query positions and compute each query's scores and its weighted "
    "sum of values on its own (the checks count at least 2 products -- @, torch.dot or * -- per query)",
    test=lambda trace, inputs: _products(trace) >= 2 * inputs["X"].shape[0],
    found=lambda trace, inputs: (f"it made {_products(trace)} products for T={inputs['X'].shape[0]} queries, "
                                 f"fewer than 2T = {2 * inputs['X'].shape[0]}: that is the matrix form, "
                                 f"not a loop over the queries"),
)

LOOP = Task(
    "attention_loop",
    cases=(
        Case("T=4, d_in=3, d_k=d_v=2", lambda g: _projections(g, 4, 3, 2, 2)),
        Case("T=6, d_in=8, d_k=4, d_v=5", lambda g: _projections(g, 6, 8, 4, 5)),
        Case("a single position (T=1)", lambda g: _projections(g, 1, 4, 3, 3), hidden=True),
        Case("T=9, d_in=16, d_k=8, d_v=4", lambda g: _projections(g, 9, 16, 8, 4), hidden=True),
        Case("large inputs (x10)", lambda g: _projections(g, 5, 6, 6, 6, scale=10.0), hidden=True),
    ),
    rules=(ONE_QUERY_AT_A_TIME,
           Forbid("attention_loop computes attention itself: fused attention (F.scaled_dot_product_attention, "
                  "nn.MultiheadAttention) is not allowed",
                  functions=("scaled_dot_product_attention", "multi_head_attention_forward"),
                  ops=("aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_attention_math",
                       "aten._scaled_dot_product_efficient_attention", "aten._scaled_dot_product_flash_attention",
                       "aten._scaled_dot_product_cudnn_attention", "aten._fused_sdp_choice"))),
    uses=("stable_softmax",),
)

MATRIX = Task(
    "attention_matrix",
    cases=(
        Case("one sequence, T=5, d_in=4, d_k=d_v=3", lambda g: _projections(g, 5, 4, 3, 3)),
        Case("batch of 2, T=4, d_in=6, d_k=4, d_v=2", lambda g: _projections(g, 4, 6, 4, 2, batch=2)),
        Case("batch of 3, T=1", lambda g: _projections(g, 1, 4, 4, 4, batch=3), hidden=True),
        Case("batch of 2, T=12, d_k=32, large inputs", lambda g: _projections(g, 12, 16, 32, 8, batch=2, scale=5.0),
             hidden=True),
    ),
    output_names=("output", "weights"),
    uses=("scaled_scores", "stable_softmax"),
)


# ---------------------------------------------------------------------------------------------
# 5. the SelfAttention module (weights copied in, as nn.Linear weights)

def _module_inputs(g, B, T, d, mask=None, scale=1.0):
    inputs = {"x": randn(g, B, T, d, scale=scale), "d_model": d, "mask": None}
    for name in ("W_q", "W_k", "W_v"):
        inputs[name] = randn(g, d, d, scale=d ** -0.5)  # nn.Linear layout: (out_features, in_features)
    if mask == "causal":
        inputs["mask"] = torch.ones(T, T, dtype=torch.bool).tril()
    elif mask == "random":
        m = torch.rand(B, T, T, generator=g) < 0.6
        m |= torch.eye(T, dtype=torch.bool)  # every query may see at least itself
        inputs["mask"] = m
    return inputs


def _call_module(impl, inputs):
    module = impl(inputs["d_model"])
    for name in ("W_q", "W_k", "W_v"):
        layer = getattr(module, name, None)
        if layer is None or not hasattr(layer, "weight"):
            raise AttributeError(f"SelfAttention must keep its projection {name} as an nn.Linear "
                                 f"attribute (self.{name}), as in the given __init__")
        layer.weight.copy_(inputs[name])
    return module(inputs["x"], mask=inputs["mask"])


MODULE = Task(
    "SelfAttention",
    cases=(
        Case("batch 2, T=4, d_model=8, no mask", lambda g: _module_inputs(g, 2, 4, 8)),
        Case("batch 1, T=5, d_model=8, causal mask", lambda g: _module_inputs(g, 1, 5, 8, mask="causal")),
        Case("batch 3, T=7, d_model=16, a different mask per sequence",
             lambda g: _module_inputs(g, 3, 7, 16, mask="random"), hidden=True),
        Case("batch 2, T=1, d_model=4", lambda g: _module_inputs(g, 2, 1, 4), hidden=True),
        Case("batch 2, T=6, d_model=12, causal mask, large inputs",
             lambda g: _module_inputs(g, 2, 6, 12, mask="causal", scale=4.0), hidden=True),
    ),
    call=_call_module,
    output_names=("output", "weights"),
    uses=("scaled_scores", "stable_softmax"),
)


TASKS = TaskSet(CHAPTER, [SOFTMAX, SCORES, LOOP, MATRIX, MODULE])
