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

from autograders.engine.core import Check, CheckSet, Mistake, Tolerance
from autograders.harness import self_attention as H

CHAPTER = H.CHAPTER

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


def _given_softmax(scores, dim=-1):
    """stable_softmax as later exercises get it while they are checked."""
    return torch.softmax(scores, dim=dim)


SOFTMAX = Check(
    H.SOFTMAX,
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


def _given_scores(Q, K):
    """scaled_scores as later exercises get it while they are checked."""
    return _scores_ref({"Q": Q, "K": K})


SCORES = Check(
    H.SCORES,
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
    H.LOOP,
    reference=_attention_ref,
    tolerance=FP32_SHARP,
    mistakes=tuple(Mistake(n, f, h) for (n, h), f in zip(
        ATTENTION_MISTAKES, (_loop_unscaled, _loop_wrong_axis, _loop_sums_keys, _loop_transposed_weights))),
    given={"stable_softmax": _given_softmax},
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
    H.MATRIX,
    reference=lambda inputs: (_attention_ref(inputs), _attention_weights_ref(inputs)),
    tolerance=FP32_SHARP,
    mistakes=tuple(Mistake(n, _matrix_mistake(n), h) for n, h in ATTENTION_MISTAKES),
    given={"scaled_scores": _given_scores, "stable_softmax": _given_softmax},
)


# ---------------------------------------------------------------------------------------------
# 5. the SelfAttention module, against nn.MultiheadAttention with one head and copied weights

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
    H.MODULE,
    reference=_module_ref,
    tolerance=FP32_MODULE,
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
    given={"scaled_scores": _given_scores, "stable_softmax": _given_softmax},
)


CHECKS = CheckSet(CHAPTER, [SOFTMAX, SCORES, LOOP, MATRIX, MODULE])
check = CHECKS.check
