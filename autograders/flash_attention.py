"""Checks for chapter 06, FlashAttention without Triton.

Conventions (stated in the notebook too): queries ``q`` have shape ``(..., N_q, d)``, keys ``k``
``(..., N_k, d)`` and values ``v`` ``(..., N_k, d_v)`` with any leading batch axes; scores are scaled by
``1/sqrt(d)``; a causal query ``i`` may attend to keys ``j <= i``; ``lse`` is the log-sum-exp of each
query's scaled scores, shape ``(..., N_q)``.

The values are compared with PyTorch (``F.scaled_dot_product_attention``, ``torch.logsumexp`` and
autograd through it). How the answer is computed (no attention matrix materialised, fully masked
tiles skipped, nothing of that size saved for backward, no fused kernel) is watched by the calls in
:mod:`autograders.harness.flash_attention`, which run in the sandbox with the student's code.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from autograders.engine.core import EXACT, Check, CheckSet, Mistake, Tolerance
from autograders.harness import flash_attention as H

CHAPTER = H.CHAPTER

NEG_INF = H.NEG_INF

STATE_TOL = Tolerance(1e-5, 1e-5, "float32; folding blocks in one at a time and summing all scores at once "
                                  "round differently by ~1e-7 relative")
ATTN_TOL = Tolerance(2e-5, 1e-4, "float32; the online rescaling and PyTorch's own kernels order the sums "
                                 "differently (~1e-6), more with the large-input cases' sharp softmax")
GRAD_TOL = Tolerance(5e-5, 1e-4, "float32 gradients recomputed tile by tile vs autograd through PyTorch's "
                                 "attention: sums in another order, up to ~1e-5 with sharp softmaxes")


TilingError = H.TilingError  # what the watch raises (materialised, did not skip, saved too much)
_batch, _causal_flops = H._batch, H._causal_flops  # the FLOP budget of the causal task, for the tests


# ---------------------------------------------------------------------------------------------
# Reference implementations (tiled, so that the classic mistakes pass the watch)


def _safe(m: torch.Tensor) -> torch.Tensor:
    return torch.where(m == NEG_INF, torch.zeros_like(m), m)


def _update(m, l, acc, s, v, bug=None):
    m_new = s.amax(-1) if bug == "block max" else torch.maximum(m, s.amax(-1))
    shift = m_new if bug == "no -inf guard" else _safe(m_new)
    p = torch.exp(s - shift[..., None])
    alpha = torch.exp(m - shift)
    l_new = (l if bug == "l not rescaled" else alpha * l) + p.sum(-1)
    acc_new = (acc if bug == "acc not rescaled" else alpha[..., None] * acc) + p @ v
    if bug == "normalised":
        return m_new, l_new, acc_new / l_new[..., None]
    return m_new, l_new, acc_new


def _tiled(q, k, v, block_q, block_k, causal=False, bug=None):
    N_q, N_k = q.shape[-2], k.shape[-2]
    scale = 1.0 if bug == "unscaled" else 1 / math.sqrt(q.shape[-1])
    q = q * scale
    m = q.new_full(q.shape[:-1], NEG_INF)
    l = q.new_zeros(q.shape[:-1])
    acc = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    for j in range(0, N_k, block_k):
        k_j, v_j = k[..., j:j + block_k, :], v[..., j:j + block_k, :]
        first = (j // block_q) * block_q if causal else 0
        for i in range(first, N_q, block_q):
            rows = slice(i, i + block_q)
            if causal and bug == "skips the diagonal" and j + block_k - 1 > i:
                continue
            s = q[..., rows, :] @ k_j.transpose(-2, -1)
            if causal and bug != "no mask":
                query = torch.arange(i, min(i + block_q, N_q))[:, None]
                key = torch.arange(j, min(j + block_k, N_k))[None, :]
                hide = {"strict": key >= query, "inverted": key < query}.get(bug, key > query)
                s = s.masked_fill(hide, NEG_INF)
            update_bug = "acc not rescaled" if bug == "no rescale" else None
            m[..., rows], l[..., rows], acc[..., rows, :] = _update(
                m[..., rows], l[..., rows], acc[..., rows, :], s, v_j, update_bug)
    out = acc if bug == "no division" else acc / l[..., None]
    lse = {"lse is the max": m, "lse is log l": torch.log(l)}.get(bug, m + torch.log(l))
    return out, lse


def _flash_function(bug=None):
    """A FlashAttention autograd Function with an optional classic mistake in its backward."""

    class Flash(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, causal=False, block_size=64):
            out, lse = _tiled(q, k, v, block_size, block_size, causal)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.causal, ctx.block = causal, block_size
            return out

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, out, lse = ctx.saved_tensors
            B, causal = ctx.block, ctx.causal
            scale = 1 / math.sqrt(q.shape[-1])
            grad_scale = 1.0 if bug == "unscaled grads" else scale
            D = (grad_out * out).sum(-1)
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
            N_q, N_k = q.shape[-2], k.shape[-2]
            for j in range(0, N_k, B):
                cols = slice(j, j + B)
                k_j, v_j = k[..., cols, :], v[..., cols, :]
                first = (j // B) * B if causal else 0
                for i in range(first, N_q, B):
                    rows = slice(i, i + B)
                    s = q[..., rows, :] @ k_j.transpose(-2, -1) * scale
                    if causal and bug != "no mask in backward":
                        query = torch.arange(i, min(i + B, N_q))[:, None]
                        key = torch.arange(j, min(j + B, N_k))[None, :]
                        s = s.masked_fill(key > query, NEG_INF)
                    if bug == "no lse":
                        p = torch.exp(s - s.amax(-1, keepdim=True))
                    else:
                        p = torch.exp(s - lse[..., rows, None])
                    do_i = grad_out[..., rows, :]
                    dv[..., cols, :] += p.transpose(-2, -1) @ do_i
                    dp = do_i @ v_j.transpose(-2, -1)
                    ds = p * dp if bug == "no D" else p * (dp - D[..., rows, None])
                    dq[..., rows, :] += ds @ k_j * grad_scale
                    dk[..., cols, :] += ds.transpose(-2, -1) @ q[..., rows, :] * grad_scale
            return dq, dk, dv, None, None

    Flash.__name__ = Flash.__qualname__ = f"Flash_{(bug or 'ok').replace(' ', '_')}"
    return Flash


# The given versions of the earlier exercises, as later ones get them while they are checked: the
# tiled versions above, so that they pass the watch of the later exercise's call.

def _given_update(m, l, acc, scores, v):
    return _update(m, l, acc, scores, v)


def _given_tiled(q, k, v, block_q=512, block_k=256):
    return _tiled(q, k, v, block_q, block_k)


def _given_causal_tiled(q, k, v, block_q=512, block_k=256):
    return _tiled(q, k, v, block_q, block_k, causal=True)


# ---------------------------------------------------------------------------------------------
# 1. the online-softmax update


def _state(s: torch.Tensor, v: torch.Tensor):
    """(m, l, acc) of a row of scores seen all at once; rows of only -inf get (-inf, 0, 0)."""
    if s.shape[-1] == 0:
        m = s.new_full(s.shape[:-1], NEG_INF)
        return m, torch.zeros_like(m), s.new_zeros(s.shape[:-1] + (v.shape[-1],))
    m = s.amax(-1)
    p = torch.exp(s - _safe(m)[..., None])
    return m, p.sum(-1), p @ v


def _update_ref(inputs):
    return _state(torch.cat([inputs["prev_scores"], inputs["scores"]], -1),
                  torch.cat([inputs["prev_v"], inputs["v"]], -2))


def _describe_update(inputs):
    return (f"m, l: {tuple(inputs['m'].shape)}, acc: {tuple(inputs['acc'].shape)}, "
            f"scores: {tuple(inputs['scores'].shape)}, v: {tuple(inputs['v'].shape)}")


UPDATE = Check(
    H.UPDATE,
    reference=_update_ref,
    tolerance=STATE_TOL,
    describe_inputs=_describe_update,
    mistakes=(
        Mistake("acc not rescaled", partial(_update, bug="acc not rescaled"),
                "acc was not rescaled: when the running max grows from m to m_new, everything summed so "
                "far was computed relative to the old max, so multiply acc (like l) by exp(m - m_new)."),
        Mistake("l not rescaled", partial(_update, bug="l not rescaled"),
                "l was not rescaled: when the running max grows from m to m_new, multiply the old sum by "
                "exp(m - m_new) before adding the block's terms."),
        Mistake("block max", partial(_update, bug="block max"),
                "the new max must be the running max: m_new = max(m, max of the block), not the block's "
                "max alone."),
        Mistake("normalised", partial(_update, bug="normalised"),
                "your acc is divided by l: keep acc un-normalised (sum of exp(s - m) * v); the division "
                "by l happens once, after the last block."),
        Mistake("no -inf guard", partial(_update, bug="no -inf guard"),
                "rows whose scores are all -inf so far give exp(-inf - (-inf)) = NaN: for rows where "
                "m_new is -inf, subtract 0 instead (torch.where) so they keep m=-inf, l=0, acc=0."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. tiled attention (forward and logsumexp)


def _lse(q, k, causal=False):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        N = q.shape[-2]
        s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), NEG_INF)
    return torch.logsumexp(s, dim=-1)


def _tiled_ref(inputs, causal=False):
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal), _lse(q, k, causal)


TILED_MISTAKES = (
    Mistake("no rescale", partial(_tiled, bug="no rescale"),
            "the output was not rescaled: when a query's running max grows, its accumulated output must be "
            "multiplied by exp(m_old - m_new), like its running sum."),
    Mistake("no division", partial(_tiled, bug="no division"),
            "the output matches the un-normalised accumulator: divide it by the running sum l at the end."),
    Mistake("unscaled", partial(_tiled, bug="unscaled"),
            "the result matches attention without the 1/sqrt(d) scale on the scores."),
    Mistake("lse is the max", partial(_tiled, bug="lse is the max"),
            "lse matches the running max m: the log-sum-exp is m + log(l)."),
    Mistake("lse is log l", partial(_tiled, bug="lse is log l"),
            "lse matches log(l): l was summed relative to the running max, so the log-sum-exp is m + log(l)."),
)

TILED = Check(
    H.TILED,
    reference=_tiled_ref,
    tolerance=ATTN_TOL,
    mistakes=TILED_MISTAKES,
    given={"online_softmax_update": _given_update},
)


# ---------------------------------------------------------------------------------------------
# 3. causal tiled attention that skips fully masked tiles

CAUSAL = Check(
    H.CAUSAL,
    reference=partial(_tiled_ref, causal=True),
    tolerance=ATTN_TOL,
    mistakes=(
        Mistake("no mask in diagonal tiles", partial(_tiled, causal=True, bug="no mask"),
                "the result matches skipping the fully masked tiles but not masking inside the tiles that "
                "straddle the diagonal: there, set the scores of keys j > query i to -inf."),
        Mistake("strict mask", partial(_tiled, causal=True, bug="strict"),
                "a query may attend to itself: mask the keys j > i, not j >= i."),
        Mistake("inverted mask", partial(_tiled, causal=True, bug="inverted"),
                "the result matches attending to the future: mask the keys j > i (after the query)."),
        Mistake("skips the diagonal", partial(_tiled, causal=True, bug="skips the diagonal"),
                "the result matches skipping the tiles on the diagonal too: they are only partly masked and "
                "hold each query's own key; skip only tiles whose keys all come after their last query."),
    ) + TILED_MISTAKES[:2],
)


# ---------------------------------------------------------------------------------------------
# 4. the autograd Function (no mask): backward recomputes the tiles from the logsumexp


def _grad_ref(inputs):
    q, k, v = (inputs[n].clone().requires_grad_(True) for n in "qkv")
    with torch.enable_grad():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=inputs["causal"])
        grads = torch.autograd.grad(out, (q, k, v), inputs["grad_out"])
    return (out.detach(), *grads)


FUNCTION = Check(
    H.FUNCTION,
    reference=_grad_ref,
    tolerance=GRAD_TOL,
    mistakes=(
        Mistake("no D", _flash_function("no D"),
                "dq and dk match dS = P * dP: the softmax's backward subtracts each row's D_i = sum_j P_ij dP_ij "
                "= rowsum(dO * O): dS = P * (dP - D[:, None])."),
        Mistake("unscaled grads", _flash_function("unscaled grads"),
                "dq and dk miss the 1/sqrt(d) of the scores: dQ_i += dS_ij K_j / sqrt(d) and "
                "dK_j += dS_ij^T Q_i / sqrt(d)."),
        Mistake("no lse", _flash_function("no lse"),
                "the gradients match P recomputed as a softmax within each tile: recompute "
                "P_ij = exp(S_ij - lse_i) with the logsumexp of the whole row saved by forward."),
    ),
    given={"tiled_attention": _given_tiled},
)


# ---------------------------------------------------------------------------------------------
# 5. the causal backward: masks the diagonal tiles, skips the fully masked ones


def _causal_backward(q, k, v, out, lse, grad_out, block_size, bug=None):
    """The causal backward, tile by tile (so that it passes the watch), with an optional classic mistake."""
    N, B = q.shape[-2], block_size
    scale = 1 / math.sqrt(q.shape[-1])
    D = (grad_out * out).sum(-1)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for j in range(0, N, B):
        cols = slice(j, j + B)
        k_j, v_j = k[..., cols, :], v[..., cols, :]
        last_key = min(j + B, N) - 1
        for i in range((j // B) * B, N, B):
            if bug == "skips the diagonal" and last_key > i:
                continue
            rows = slice(i, i + B)
            s = q[..., rows, :] @ k_j.transpose(-2, -1) * scale
            if bug != "no mask":
                query = torch.arange(i, min(i + B, N))[:, None]
                key = torch.arange(j, last_key + 1)[None, :]
                s = s.masked_fill(key >= query if bug == "strict" else key > query, NEG_INF)
            p = torch.exp(s - lse[..., rows, None])
            do_i = grad_out[..., rows, :]
            dv[..., cols, :] += p.transpose(-2, -1) @ do_i
            dp = do_i @ v_j.transpose(-2, -1)
            ds = p * dp if bug == "no D" else p * (dp - D[..., rows, None])
            dq[..., rows, :] += ds @ k_j * scale
            dk[..., cols, :] += ds.transpose(-2, -1) @ q[..., rows, :] * scale
    return dq, dk, dv


def _causal_backward_mistake(bug):
    def wrong(q, k, v, out, lse, grad_out, block_size=256):
        return _causal_backward(q, k, v, out, lse, grad_out, block_size, bug)
    return wrong


# The call of this exercise takes out and lse from ``causal_tiled_attention`` in the namespace of the
# implementation it checks: for the student, the notebook's (the given version while checked); for the
# mistakes below, this module's.
causal_tiled_attention = _given_causal_tiled


def _causal_grad_ref(inputs):
    return _grad_ref(inputs)[1:]


CAUSAL_BACKWARD = Check(
    H.CAUSAL_BACKWARD,
    reference=_causal_grad_ref,
    tolerance=GRAD_TOL,
    mistakes=(
        Mistake("no mask", _causal_backward_mistake("no mask"),
                "the gradients match a backward pass that skips the masked tiles but does not mask inside the "
                "tiles on the diagonal: there, set the recomputed scores of keys j > i to -inf before exp()."),
        Mistake("strict mask", _causal_backward_mistake("strict"),
                "a query may attend to itself: mask the keys j > i, not j >= i."),
        Mistake("skips the diagonal", _causal_backward_mistake("skips the diagonal"),
                "the gradients match skipping the tiles on the diagonal too: they are only partly masked; "
                "skip only the tiles whose keys all come after their last query."),
        Mistake("no D", _causal_backward_mistake("no D"),
                "dq and dk match dS = P * dP: subtract each row's D_i = rowsum(dO * O): "
                "dS = P * (dP - D[:, None])."),
    ),
    given={"causal_tiled_attention": _given_causal_tiled},
)


# ---------------------------------------------------------------------------------------------
# 6. HBM accesses of standard and flash attention (Dao et al. 2022, Algorithms 0 and 1)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _hbm_ref(inputs, bug=None):
    N, d, M = inputs["N"], inputs["d"], inputs["M"]
    standard = 4 * N * d + 4 * N * N
    B_c = max(1, M // (4 * d)) if bug == "floor" else _ceil_div(M, 4 * d)
    T_c = _ceil_div(N, B_c)
    if bug == "T_r":
        T_c = _ceil_div(N, min(B_c, d))
    init = 0 if bug == "no init" else N * d + 2 * N
    per_row = 3 * d if bug == "no l, m" else 3 * d + 4
    flash = init + 2 * N * d + T_c * N * per_row
    if bug == "standard without P":
        standard = 4 * N * d + 2 * N * N
    if bug == "theta":
        return N * d + N * N, N * N * d * d / M
    return standard, flash


def _hbm_mistake(bug):
    return lambda N, d, M: _hbm_ref({"N": N, "d": d, "M": M}, bug)


HBM = Check(
    H.HBM,
    reference=_hbm_ref,
    tolerance=EXACT,
    mistakes=(
        Mistake("floor", _hbm_mistake("floor"),
                "B_c = ceil(M / (4d)), rounded up (integers: -(-M // (4 * d)))."),
        Mistake("T_r", _hbm_mistake("T_r"),
                "the inner loop runs once per key/value block: T_c = ceil(N / B_c) passes, not T_r."),
        Mistake("no init", _hbm_mistake("no init"),
                "count the initial writes of O (N*d), l and m (N each) to HBM."),
        Mistake("no l, m", _hbm_mistake("no l, m"),
                "each inner step also reads and writes l_i and m_i: B_r * (3d + 4) elements, not 3d."),
        Mistake("standard without P", _hbm_mistake("standard without P"),
                "standard attention writes S, reads it, writes P and reads P again: 4 N^2, not 2 N^2."),
        Mistake("theta", _hbm_mistake("theta"),
                "these are the Theta() orders; the exercise asks for the exact counts given in the text."),
    ),
)


CHECKS = CheckSet(CHAPTER, [UPDATE, TILED, CAUSAL, FUNCTION, CAUSAL_BACKWARD, HBM])
check = CHECKS.check
