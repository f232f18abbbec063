"""Checks for chapter 08, multi-query and grouped-query attention.

Conventions (stated in the notebook too): heads live on axis 1, so queries are (B, H, T_q, d_head)
and keys/values (B, H_kv, T_k, d_head) with ``H % H_kv == 0``; query head ``h`` uses key/value head
``h // (H // H_kv)`` -- consecutive query heads form a group (the layout of
``F.scaled_dot_product_attention(..., enable_gqa=True)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from autograders.engine.core import EXACT, Check, CheckSet, Mistake, Tolerance
from autograders.harness import grouped_query_attention as H

CHAPTER = H.CHAPTER

FP32_ATTN = Tolerance(1e-4, 1e-4, "float32 attention compared with PyTorch's fused kernels, which order the "
                                  "sums differently; the large-input cases make the softmax sharp")


# ---------------------------------------------------------------------------------------------
# 1. repeat_kv: (B, H_kv, T, d) -> (B, H_kv * n_rep, T, d), each head repeated n_rep times in a row


def _repeat_tiled(x, n_rep):
    return x.repeat(1, n_rep, 1, 1)


def _repeat_time_axis(x, n_rep):
    return torch.repeat_interleave(x, n_rep, dim=2)


def _repeat_expand_wrong_axis(x, n_rep):
    B, H, T, d = x.shape
    return x[:, :, :, None, :].expand(B, H, T, n_rep, d).reshape(B, H * n_rep, T, d)


def _given_repeat_kv(x, n_rep):
    """repeat_kv as grouped_query_attention gets it while it is checked."""
    return torch.repeat_interleave(x, n_rep, dim=1)


REPEAT_KV = Check(
    H.REPEAT_KV,
    reference=lambda inputs: torch.repeat_interleave(inputs["x"], inputs["n_rep"], dim=1),
    tolerance=EXACT,
    mistakes=(
        Mistake("tiled", _repeat_tiled,
                "your heads come out tiled as [kv0, kv1, kv0, kv1, ...]: query head h belongs to group "
                "h // n_rep, so each KV head must be repeated n_rep times IN A ROW [kv0, kv0, kv1, kv1, ...] "
                "(torch.repeat_interleave along dim=1, or x[:, :, None].expand(...).reshape(...))."),
        Mistake("time axis", _repeat_time_axis,
                "you repeated along the time axis (dim=2); the heads are on dim=1."),
        Mistake("expand after the time axis", _repeat_expand_wrong_axis,
                "the new axis was inserted after the time axis, so the reshape mixes time steps into "
                "heads: insert it right after the head axis, x[:, :, None, :, :]."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. grouped_query_attention(q, k, v, causal) == F.scaled_dot_product_attention(..., enable_gqa=True)


def _gqa_ref(inputs):
    return F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"],
                                          is_causal=inputs["causal"], enable_gqa=True)


def _gqa_generic(q, k, v, causal, *, tiled=False, scale=True, use_mask=True, upper=False):
    n_rep = q.shape[1] // k.shape[1]
    if tiled:
        k, v = k.repeat(1, n_rep, 1, 1), v.repeat(1, n_rep, 1, 1)
    else:
        k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    s = q @ k.transpose(-2, -1)
    if scale:
        s = s / math.sqrt(q.shape[-1])
    if causal and use_mask:
        T_q, T_k = s.shape[-2:]
        allowed = torch.ones(T_q, T_k, dtype=torch.bool).tril()
        if upper:
            allowed = torch.ones(T_q, T_k, dtype=torch.bool).triu()
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v


def _given_gqa(q, k, v, causal=False):
    """grouped_query_attention as the GroupedQueryAttention module gets it while it is checked."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


GQA = Check(
    H.GQA,
    reference=_gqa_ref,
    tolerance=FP32_ATTN,
    mistakes=(
        Mistake("tiled KV heads", lambda q, k, v, causal=False: _gqa_generic(q, k, v, causal, tiled=True),
                "the result matches KV heads tiled as [kv0, kv1, kv0, kv1, ...]: query head h must use KV "
                "head h // (H // H_kv) -- consecutive query heads share one KV head (repeat_interleave)."),
        Mistake("no scale", lambda q, k, v, causal=False: _gqa_generic(q, k, v, causal, scale=False),
                "the result matches attention without the 1/sqrt(d_head) scale on the scores."),
        Mistake("mask ignored", lambda q, k, v, causal=False: _gqa_generic(q, k, v, causal, use_mask=False),
                "the result matches attention without the causal mask: with causal=True query i may "
                "only see keys 0..i."),
        Mistake("upper mask", lambda q, k, v, causal=False: _gqa_generic(q, k, v, causal, upper=True),
                "the result matches a mask that lets query i see keys i..T-1 (the future): keep the "
                "LOWER triangle (torch.tril) and fill the rest with -inf."),
    ),
    given={"repeat_kv": _given_repeat_kv},
)


# ---------------------------------------------------------------------------------------------
# 3. GroupedQueryAttention module; with n_kv_head == n_head it is nn.MultiheadAttention


def _module_ref(inputs):
    x, H, H_kv = inputs["x"], inputs["n_head"], inputs["n_kv_head"]
    B, T, d_model = x.shape
    if H == H_kv:  # plain multi-head attention: PyTorch's own module with the same weights
        mha = nn.MultiheadAttention(d_model, H, bias=False, batch_first=True)
        mha.in_proj_weight.copy_(torch.cat([inputs["W_q"], inputs["W_k"], inputs["W_v"]]))
        mha.out_proj.weight.copy_(inputs["W_o"])
        mha.eval()
        mask = torch.ones(T, T, dtype=torch.bool).triu(1) if inputs["causal"] else None  # True = blocked
        return mha(x, x, x, attn_mask=mask, need_weights=False)[0]
    d = d_model // H
    q = (x @ inputs["W_q"].T).view(B, T, H, d).transpose(1, 2)
    k = (x @ inputs["W_k"].T).view(B, T, H_kv, d).transpose(1, 2)
    v = (x @ inputs["W_v"].T).view(B, T, H_kv, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=inputs["causal"], enable_gqa=True)
    return out.transpose(1, 2).reshape(B, T, d_model) @ inputs["W_o"].T


class _ModuleBase(nn.Module):
    def __init__(self, d_model, n_head, n_kv_head):
        super().__init__()
        self.n_head, self.n_kv_head, self.d_head = n_head, n_kv_head, d_model // n_head
        self.W_q = nn.Linear(d_model, d_model, bias=False)
        self.W_k = nn.Linear(d_model, n_kv_head * self.d_head, bias=False)
        self.W_v = nn.Linear(d_model, n_kv_head * self.d_head, bias=False)
        self.W_o = nn.Linear(d_model, d_model, bias=False)

    def heads(self, x, n, split="transpose"):
        B, T, _ = x.shape
        if split == "transpose":
            return x.view(B, T, n, self.d_head).transpose(1, 2)
        return x.reshape(B, n, T, self.d_head)  # mixes time steps and heads

    def run(self, x, causal, split="transpose", tiled=False, project=True):
        B, T, _ = x.shape
        q = self.heads(self.W_q(x), self.n_head, split)
        k = self.heads(self.W_k(x), self.n_kv_head, split)
        v = self.heads(self.W_v(x), self.n_kv_head, split)
        out = _gqa_generic(q, k, v, causal, tiled=tiled)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return self.W_o(out) if project else out


class _HeadsWithoutTranspose(_ModuleBase):
    def forward(self, x, causal=True):
        return self.run(x, causal, split="reshape")


class _TiledModule(_ModuleBase):
    def forward(self, x, causal=True):
        return self.run(x, causal, tiled=True)


class _NoOutputProjection(_ModuleBase):
    def forward(self, x, causal=True):
        return self.run(x, causal, project=False)


MODULE = Check(
    H.MODULE,
    reference=_module_ref,
    tolerance=FP32_ATTN,
    mistakes=(
        Mistake("heads without transpose", _HeadsWithoutTranspose,
                "the result matches splitting heads with a plain reshape to (B, H, T, d_head): that mixes "
                "time steps and heads. View as (B, T, H, d_head) first, then transpose(1, 2)."),
        Mistake("tiled KV heads", _TiledModule,
                "the result matches KV heads tiled as [kv0, kv1, kv0, kv1, ...]: query head h uses KV "
                "head h // (n_head // n_kv_head)."),
        Mistake("no output projection", _NoOutputProjection,
                "the result matches the attention output before W_o: finish with the output projection."),
    ),
    given={"grouped_query_attention": _given_gqa},
)


# ---------------------------------------------------------------------------------------------
# 4. predicted_speedup: a memory-bound decoding step, bytes moved by the baseline over the variant's


def _moved(weights, cache, passes):
    return weights + passes * cache


def _speedup_ref(inputs):
    passes = inputs.get("cache_passes", 1)
    ratio = (_moved(inputs["base_weight_bytes"], inputs["base_cache_bytes"], passes)
             / _moved(inputs["weight_bytes"], inputs["cache_bytes"], passes))
    return torch.tensor([ratio], dtype=torch.float64)  # the shape the task's call gives an answer


def _speedup_wrong(*, invert=False, cache_only=False, weights_only=False, passes_ignored=False,
                   passes_on_weights=False):
    def wrong(base_weight_bytes, base_cache_bytes, weight_bytes, cache_bytes, cache_passes=1):
        p = 1 if passes_ignored else cache_passes
        if cache_only:
            base, mine = base_cache_bytes, cache_bytes
        elif weights_only:
            base, mine = base_weight_bytes, weight_bytes
        elif passes_on_weights:
            base, mine = p * base_weight_bytes + base_cache_bytes, p * weight_bytes + cache_bytes
        else:
            base, mine = base_weight_bytes + p * base_cache_bytes, weight_bytes + p * cache_bytes
        return mine / base if invert else base / mine
    return wrong


SPEEDUP = Check(
    H.SPEEDUP,
    reference=_speedup_ref,
    tolerance=Tolerance(0.0, 1e-6, "a ratio of byte counts; computed in float32 instead of Python floats it "
                                   "is still right to ~1e-7"),
    mistakes=(
        Mistake("inverted", _speedup_wrong(invert=True),
                "your ratio is upside down: the speed-up is the baseline's time over the variant's, i.e. the "
                "baseline's bytes per step over the variant's (> 1 when the variant moves fewer bytes)."),
        Mistake("cache only", _speedup_wrong(cache_only=True),
                "your ratio counts only the cache (it gives n_head / n_kv_head): every step also moves all the "
                "weights, which barely shrink -- add them to both sides."),
        Mistake("weights only", _speedup_wrong(weights_only=True),
                "your ratio counts only the weights: the cache is moved too, cache_passes times per step."),
        Mistake("cache passes ignored", _speedup_wrong(passes_ignored=True),
                "the cache is moved cache_passes times per step (the weights once): multiply the cache bytes, "
                "on both sides, by cache_passes."),
        Mistake("passes on the weights", _speedup_wrong(passes_on_weights=True),
                "cache_passes multiplies the cache bytes, not the weight bytes: the weights are read once per step."),
    ),
)


CHECKS = CheckSet(CHAPTER, [REPEAT_KV, GQA, MODULE, SPEEDUP])
check = CHECKS.check
