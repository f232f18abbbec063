"""Checks for chapter 01, self-attention.

Conventions (stated in the notebook too): a sequence is a (T, d) matrix of row vectors, or a batch
(B, T, d); projections are plain matrices used as ``X @ W``; a boolean mask is True where a query
may attend to a key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from autograders.engine.core import Case, Check, CheckSet, Mistake, Tolerance, randn

CHAPTER = "01_self_attention"

FP32 = Tolerance(1e-5, 1e-4, "float32 sums of a few dozen terms; a different but correct order of "
                             "operations differs by ~1e-6")
FP32_SHARP = Tolerance(1e-4, 1e-4, "float32; with inputs scaled up several times the softmax is sharp and a "
                                   "different but correct order of operations moves results by up to ~3e-5")
FP32_MODULE = Tolerance(1e-4, 1e-4, "float32, compared with nn.MultiheadAttention whose fused kernels "
                                    "order the sums differently; large-input cases make the softmax sharp")


# ---------------------------------------------------------------------------------------------
# 1. stable softmax

def _softmax_ref(inputs):
    return torch.softmax(inputs["scores"], dim=inputs["dim"])


def _softmax_no_max(scores, dim=-1):
    e = torch.exp(scores)
    return e / e.sum(dim=dim, keepdim=True)


def _softmax_dim0(scores, dim=-1):
    return torch.softmax(scores, dim=0)


def _softmax_last(scores, dim=-1):
    return torch.softmax(scores, dim=-1)


def _softmax_no_exp(scores, dim=-1):
    return scores / scores.sum(dim=dim, keepdim=True)


def _softmax_global_sum(scores, dim=-1):
    e = torch.exp(scores - scores.max())
    return e / e.sum()


def _with_inf(g):
    s = randn(g, 4, 6)
    s[0, 1] = s[2, 0] = s[2, 5] = s[3, 3] = float("-inf")
    return {"scores": s, "dim": -1}


SOFTMAX = Check(
    name="stable_softmax",
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
    reference=_softmax_ref,
    tolerance=Tolerance(1e-6, 1e-5, "probabilities in [0, 1] from float32 exp; exact up to rounding"),
    mistakes=(
        Mistake("softmax along axis 0", _softmax_dim0,
                "your result matches a softmax along axis 0: normalise along the axis given by `dim`."),
        Mistake("always the last axis", _softmax_last,
                "your result matches a softmax along the last axis: use the `dim` argument."),
        Mistake("no exponential", _softmax_no_exp,
                "your result matches scores / sum(scores): softmax exponentiates first."),
        Mistake("sum over the whole tensor", _softmax_global_sum,
                "your result is divided by the sum over the whole tensor: sum along `dim` only "
                "(keepdim=True keeps the shapes broadcastable)."),
        Mistake("no max subtraction", _softmax_no_max,
                "exp() overflows for large scores: subtract the maximum along `dim` first "
                "(softmax(x) == softmax(x - c) for any constant c)."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. scaled dot-product relevance scores

def _scores_ref(inputs):
    Q, K = inputs["Q"], inputs["K"]
    return torch.matmul(Q, K.transpose(-2, -1)) / math.sqrt(Q.shape[-1])


def _scores_unscaled(Q, K):
    return Q @ K.transpose(-2, -1)


def _scores_by_d(Q, K):
    return Q @ K.transpose(-2, -1) / Q.shape[-1]


def _scores_sqrt_len(Q, K):
    return Q @ K.transpose(-2, -1) / math.sqrt(K.shape[-2])


def _scores_kq(Q, K):
    return K @ Q.transpose(-2, -1) / math.sqrt(Q.shape[-1])


SCORES = Check(
    name="scaled_scores",
    cases=(
        Case("3 queries, 4 keys, d=8", lambda g: {"Q": randn(g, 3, 8), "K": randn(g, 4, 8)}),
        Case("4 queries, 4 keys, d=16", lambda g: {"Q": randn(g, 4, 16), "K": randn(g, 4, 16)}),
        Case("batched: (2, 5, 16) and (2, 7, 16)", lambda g: {"Q": randn(g, 2, 5, 16), "K": randn(g, 2, 7, 16)},
             hidden=True),
        Case("d=1", lambda g: {"Q": randn(g, 3, 1), "K": randn(g, 2, 1)}, hidden=True),
        Case("one query, 6 keys, d=32", lambda g: {"Q": randn(g, 1, 32), "K": randn(g, 6, 32)}, hidden=True),
    ),
    reference=_scores_ref,
    tolerance=FP32,
    mistakes=(
        Mistake("no scale", _scores_unscaled,
                "your scores are not scaled: divide by sqrt(d), the square root of the vector size."),
        Mistake("divided by d", _scores_by_d,
                "your scores are divided by d; the scale is 1/sqrt(d)."),
        Mistake("scaled by the sequence length", _scores_sqrt_len,
                "you scaled by the square root of the number of keys; scale by sqrt(d), the size of a "
                "query/key vector (the last axis)."),
        Mistake("keys times queries", _scores_kq,
                "row i must hold query i's scores against every key: Q @ K^T, not K @ Q^T."),
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


def _attention_ref(inputs):
    X = inputs["X"]
    Q, K, V = X @ inputs["W_q"], X @ inputs["W_k"], X @ inputs["W_v"]
    return F.scaled_dot_product_attention(Q, K, V)


def _attention_weights_ref(inputs):
    X = inputs["X"]
    Q, K = X @ inputs["W_q"], X @ inputs["W_k"]
    return torch.softmax(Q @ K.transpose(-2, -1) / math.sqrt(Q.shape[-1]), dim=-1)


def _attn_generic(X, W_q, W_k, W_v, *, scale=True, softmax_dim=-1, values="V"):
    Q, K, V = X @ W_q, X @ W_k, X @ W_v
    s = Q @ K.transpose(-2, -1)
    if scale:
        s = s / math.sqrt(Q.shape[-1])
    w = torch.softmax(s, dim=softmax_dim)
    return w @ (V if values == "V" else K), w


def _loop_unscaled(X, W_q, W_k, W_v):
    return _attn_generic(X, W_q, W_k, W_v, scale=False)[0]


def _loop_wrong_axis(X, W_q, W_k, W_v):
    return _attn_generic(X, W_q, W_k, W_v, softmax_dim=-2)[0]


def _loop_sums_keys(X, W_q, W_k, W_v):
    return _attn_generic(X, W_q, W_k, W_v, values="K")[0]


def _loop_transposed_weights(X, W_q, W_k, W_v):
    Q, K, V = X @ W_q, X @ W_k, X @ W_v
    w = torch.softmax(Q @ K.transpose(-2, -1) / math.sqrt(Q.shape[-1]), dim=-1)
    return w.transpose(-2, -1) @ V


ATTENTION_MISTAKES = (
    ("no scale", "the result matches attention without the 1/sqrt(d_k) scale on the scores."),
    ("softmax over queries", "the result matches a softmax over the queries (axis -2): each query's "
                             "weights over the keys must sum to 1, so normalise along the last axis."),
    ("weighted sum of keys", "the result matches a weighted sum of the keys: the output mixes the "
                             "values V = X @ W_v."),
    ("transposed weights", "the result matches using the transposed attention matrix: output i = "
                           "sum_j weight[i, j] * v_j."),
)

LOOP = Check(
    name="attention_loop",
    cases=(
        Case("T=4, d_in=3, d_k=d_v=2", lambda g: _projections(g, 4, 3, 2, 2)),
        Case("T=6, d_in=8, d_k=4, d_v=5", lambda g: _projections(g, 6, 8, 4, 5)),
        Case("a single position (T=1)", lambda g: _projections(g, 1, 4, 3, 3), hidden=True),
        Case("T=9, d_in=16, d_k=8, d_v=4", lambda g: _projections(g, 9, 16, 8, 4), hidden=True),
        Case("large inputs (x10)", lambda g: _projections(g, 5, 6, 6, 6, scale=10.0), hidden=True),
    ),
    reference=_attention_ref,
    tolerance=FP32_SHARP,
    mistakes=tuple(Mistake(n, f, h) for (n, h), f in zip(
        ATTENTION_MISTAKES, (_loop_unscaled, _loop_wrong_axis, _loop_sums_keys, _loop_transposed_weights))),
)


def _matrix_mistake(flavour):
    def wrong(X, W_q, W_k, W_v):
        if flavour == "transposed weights":
            out, w = _attn_generic(X, W_q, W_k, W_v)
            return w.transpose(-2, -1) @ (X @ W_v), w.transpose(-2, -1)
        kwargs = {"no scale": {"scale": False}, "softmax over queries": {"softmax_dim": -2},
                  "weighted sum of keys": {"values": "K"}}[flavour]
        return _attn_generic(X, W_q, W_k, W_v, **kwargs)
    return wrong


MATRIX = Check(
    name="attention_matrix",
    cases=(
        Case("one sequence, T=5, d_in=4, d_k=d_v=3", lambda g: _projections(g, 5, 4, 3, 3)),
        Case("batch of 2, T=4, d_in=6, d_k=4, d_v=2", lambda g: _projections(g, 4, 6, 4, 2, batch=2)),
        Case("batch of 3, T=1", lambda g: _projections(g, 1, 4, 4, 4, batch=3), hidden=True),
        Case("batch of 2, T=12, d_k=32, large inputs", lambda g: _projections(g, 12, 16, 32, 8, batch=2, scale=5.0),
             hidden=True),
    ),
    reference=lambda inputs: (_attention_ref(inputs), _attention_weights_ref(inputs)),
    tolerance=FP32_SHARP,
    output_names=("output", "weights"),
    mistakes=tuple(Mistake(n, _matrix_mistake(n), h) for n, h in ATTENTION_MISTAKES),
)


# ---------------------------------------------------------------------------------------------
# 5. the SelfAttention module, against nn.MultiheadAttention with one head and copied weights

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


def _module_ref(inputs):
    d = inputs["d_model"]
    mha = nn.MultiheadAttention(d, num_heads=1, bias=False, batch_first=True)
    mha.in_proj_weight.copy_(torch.cat([inputs["W_q"], inputs["W_k"], inputs["W_v"]]))
    mha.out_proj.weight.copy_(torch.eye(d))
    mha.eval()
    mask = inputs["mask"]
    attn_mask = None if mask is None else ~mask  # MultiheadAttention: True means "may NOT attend"
    x = inputs["x"]
    out, weights = mha(x, x, x, attn_mask=attn_mask, need_weights=True, average_attn_weights=True)
    return out, weights


class _ModuleBase(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.d_model = d_model
        self.W_q = nn.Linear(d_model, d_model, bias=False)
        self.W_k = nn.Linear(d_model, d_model, bias=False)
        self.W_v = nn.Linear(d_model, d_model, bias=False)

    def qkv(self, x):
        return self.W_q(x), self.W_k(x), self.W_v(x)


class _InvertedMask(_ModuleBase):
    def forward(self, x, mask=None):
        q, k, v = self.qkv(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(self.d_model)
        if mask is not None:
            s = s.masked_fill(mask, float("-inf"))
        w = torch.softmax(s, dim=-1)
        return w @ v, w


class _MaskAfterSoftmax(_ModuleBase):
    def forward(self, x, mask=None):
        q, k, v = self.qkv(x)
        w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.d_model), dim=-1)
        if mask is not None:
            w = w * mask
        return w @ v, w


class _MaskToZero(_ModuleBase):
    def forward(self, x, mask=None):
        q, k, v = self.qkv(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(self.d_model)
        if mask is not None:
            s = s * mask
        w = torch.softmax(s, dim=-1)
        return w @ v, w


class _ModuleUnscaled(_ModuleBase):
    def forward(self, x, mask=None):
        q, k, v = self.qkv(x)
        s = q @ k.transpose(-2, -1)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        w = torch.softmax(s, dim=-1)
        return w @ v, w


MODULE = Check(
    name="SelfAttention",
    cases=(
        Case("batch 2, T=4, d_model=8, no mask", lambda g: _module_inputs(g, 2, 4, 8)),
        Case("batch 1, T=5, d_model=8, causal mask", lambda g: _module_inputs(g, 1, 5, 8, mask="causal")),
        Case("batch 3, T=7, d_model=16, a different mask per sequence",
             lambda g: _module_inputs(g, 3, 7, 16, mask="random"), hidden=True),
        Case("batch 2, T=1, d_model=4", lambda g: _module_inputs(g, 2, 1, 4), hidden=True),
        Case("batch 2, T=6, d_model=12, causal mask, large inputs",
             lambda g: _module_inputs(g, 2, 6, 12, mask="causal", scale=4.0), hidden=True),
    ),
    reference=_module_ref,
    call=_call_module,
    tolerance=FP32_MODULE,
    output_names=("output", "weights"),
    mistakes=(
        Mistake("inverted mask", _InvertedMask,
                "the result matches a mask used the wrong way round: True means the query MAY attend "
                "to the key, so fill the positions where the mask is False with -inf."),
        Mistake("mask after softmax", _MaskAfterSoftmax,
                "the result matches zeroing weights after the softmax: the remaining weights no longer "
                "sum to 1. Mask the scores (with -inf) before the softmax."),
        Mistake("mask by multiplying", _MaskToZero,
                "the result matches multiplying scores by the mask: a score of 0 still gets weight "
                "exp(0); masked scores must be -inf."),
        Mistake("no scale", _ModuleUnscaled,
                "the result matches attention without the 1/sqrt(d_model) scale on the scores."),
    ),
)


CHECKS = CheckSet(CHAPTER, [SOFTMAX, SCORES, LOOP, MATRIX, MODULE])
check = CHECKS.check
