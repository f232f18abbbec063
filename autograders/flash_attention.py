"""Checks for chapter 06, FlashAttention without Triton.

Conventions (stated in the notebook too): queries ``q`` have shape ``(..., N_q, d)``, keys ``k``
``(..., N_k, d)`` and values ``v`` ``(..., N_k, d_v)`` with any leading batch axes; scores are scaled by
``1/sqrt(d)``; a causal query ``i`` may attend to keys ``j <= i``; ``lse`` is the log-sum-exp of each
query's scaled scores, shape ``(..., N_q)``.

Besides comparing values with PyTorch (``F.scaled_dot_product_attention``, ``torch.logsumexp`` and
autograd through it), the checks watch how the answer is computed, because a correct number computed
the naive way is not the exercise:

* every tensor the implementation creates (forward and backward) is seen through a
  ``TorchDispatchMode``; one larger than twice the inputs, outputs or a ``(block_q, block_k)`` tile
  means the ``N_q x N_k`` matrix (or a block row of it) was materialised;
* the causal variant's matrix-multiply FLOPs (counted at the dispatcher) must stay near those of
  the blocks that are not fully masked, so fully masked blocks must be skipped, not masked;
* the tensors the autograd Function saves for backward (``saved_tensors_hooks`` and the ``ctx``
  attributes) must not include anything of the size of the attention matrix.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from autograders.engine.core import EXACT, Case, Check, CheckSet, Mistake, Tolerance, randn

CHAPTER = "06_flash_attention"

NEG_INF = float("-inf")

STATE_TOL = Tolerance(1e-5, 1e-5, "float32; folding blocks in one at a time and summing all scores at once "
                                  "round differently by ~1e-7 relative")
ATTN_TOL = Tolerance(2e-5, 1e-4, "float32; the online rescaling and PyTorch's own kernels order the sums "
                                 "differently (~1e-6), more with the large-input cases' sharp softmax")
GRAD_TOL = Tolerance(5e-5, 1e-4, "float32 gradients recomputed tile by tile vs autograd through PyTorch's "
                                 "attention: sums in another order, up to ~1e-5 with sharp softmaxes")


class TilingError(RuntimeError):
    """The implementation computed the right thing the wrong way (materialised, did not skip, saved)."""


# ---------------------------------------------------------------------------------------------
# Watching what an implementation does


def _storage_bytes(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def _matmul_flops(name: str, args) -> int:
    """2 * multiply-adds of the matrix products as they reach the dispatcher (matmul becomes mm/bmm)."""
    if name in ("aten.addmm.default", "aten.baddbmm.default"):
        args = args[1:]
    if name in ("aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default"):
        a, b = args[0], args[1]
        return 2 * a.numel() * b.shape[-1]
    if name == "aten.mv.default":
        return 2 * args[0].numel()
    if name == "aten.dot.default":
        return 2 * args[0].numel()
    return 0


class _Watch(TorchDispatchMode):
    """Records the largest tensor any operation creates, the FLOPs of matrix products, and calls to
    PyTorch's fused attention (torch.utils.flop_counter does the FLOPs too, but its first use takes
    seconds)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # nothing here is compiled; the default would import torch._dynamo (seconds)

    def __init__(self):
        super().__init__()
        self.largest = (0, (), "")
        self.fused: str | None = None
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
            self.fused = self.fused or name
        self.flops += _matmul_flops(name, args)
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                size = _storage_bytes(t)
                if size > self.largest[0]:
                    self.largest = (size, tuple(t.shape), name)
        return out


def _batch(t: torch.Tensor) -> int:
    return math.prod(t.shape[:-2])


def _limit_bytes(q, k, v, block_q, block_k) -> int:
    """Twice the largest of: the inputs, the output, one score tile (float32)."""
    B, N_q, N_k, d_v = _batch(q), q.shape[-2], k.shape[-2], v.shape[-1]
    largest = max(q.numel(), k.numel(), v.numel(), B * N_q * d_v, B * block_q * block_k)
    return 2 * 4 * largest


def _verdict(watch: _Watch, limit: int, what: str, block_q: int, block_k: int, N_q: int, N_k: int) -> None:
    if watch.fused:
        raise TilingError(f"{what} calls PyTorch's fused attention ({watch.fused}): compute the tiles "
                          f"yourself with matrix products and your online softmax")
    size, shape, op = watch.largest
    if size > limit:
        raise TilingError(
            f"{what} created a tensor of shape {shape} ({size} bytes, by {op}) -- more than twice the "
            f"inputs, the output or one ({block_q}, {block_k}) tile. With N_q={N_q} and N_k={N_k} that is "
            f"the attention matrix or a block row of it: hold one (block_q, block_k) tile of scores at a "
            f"time and keep only the running max, sum and output per query")


def _attention_call(impl, inputs, causal=False):
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    bq, bk = inputs["block_q"], inputs["block_k"]
    watch = _Watch()
    with watch:
        result = impl(q, k, v, block_q=bq, block_k=bk)
    what = "causal_tiled_attention" if causal else "tiled_attention"
    _verdict(watch, _limit_bytes(q, k, v, bq, bk), what, bq, bk, q.shape[-2], k.shape[-2])
    if causal:
        needed = _causal_flops(q, v, bq, bk)
        everything = 2 * _batch(q) * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        done = watch.flops
        if done > 1.25 * needed and everything > 1.25 * needed:
            raise TilingError(
                f"causal_tiled_attention did {done} matrix-multiply FLOPs; the ({bq}, {bk}) tiles that are "
                f"not entirely masked need {needed} (all tiles: {everything}). Skip the tiles whose keys "
                f"all come after the tile's last query instead of computing and masking them")
    return result


def _causal_flops(q, v, bq, bk) -> int:
    """FLOPs of S = Q_i K_j^T and P_ij V_j over the tiles that are not fully masked."""
    B, N, d, d_v = _batch(q), q.shape[-2], q.shape[-1], v.shape[-1]
    total = 0
    for i in range(0, N, bq):
        rows = min(i + bq, N) - i
        last_query = i + rows - 1
        for j in range(0, N, bk):
            if j <= last_query:
                total += 2 * B * rows * (min(j + bk, N) - j) * (d + d_v)
    return total


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


def _update_inputs(g, n, b_prev, b, d, prefix=(), scale=1.0, shift=0.0, grow=False, masked=None):
    prev_s = randn(g, *prefix, n, b_prev, scale=scale) + shift
    prev_v = randn(g, *prefix, b_prev, d)
    s = randn(g, *prefix, n, b, scale=scale) + shift
    v = randn(g, *prefix, b, d)
    if grow:  # every other row's maximum moves up: the old state must be rescaled
        s[..., ::2, :] += 3.0 * scale
    if masked == "so far":  # rows 0 and 1 have seen only masked scores; row 1 gets real ones now
        prev_s[..., :2, :] = NEG_INF
        s[..., 0, :] = NEG_INF
    elif masked == "some":
        s[..., 1::3, :2] = NEG_INF
    m, l, acc = _state(prev_s, prev_v)
    return {"m": m, "l": l, "acc": acc, "scores": s, "v": v, "prev_scores": prev_s, "prev_v": prev_v}


def _smaller_block(g):
    inputs = _update_inputs(g, 3, 5, 4, 2)
    return inputs | {"scores": inputs["scores"] - 10.0}  # below the running max everywhere: alpha is 1


def _update_ref(inputs):
    return _state(torch.cat([inputs["prev_scores"], inputs["scores"]], -1),
                  torch.cat([inputs["prev_v"], inputs["v"]], -2))


def _update_call(impl, inputs):
    return impl(inputs["m"], inputs["l"], inputs["acc"], inputs["scores"], inputs["v"])


def _describe_update(inputs):
    return (f"m, l: {tuple(inputs['m'].shape)}, acc: {tuple(inputs['acc'].shape)}, "
            f"scores: {tuple(inputs['scores'].shape)}, v: {tuple(inputs['v'].shape)}")


UPDATE = Check(
    name="online_softmax_update",
    cases=(
        Case("first block (m=-inf, l=0, acc=0), 4 rows, 5 keys, d=3", lambda g: _update_inputs(g, 4, 0, 5, 3)),
        Case("second block; the max grows in every other row", lambda g: _update_inputs(g, 6, 4, 3, 2, grow=True)),
        Case("rows that have seen only -inf so far", lambda g: _update_inputs(g, 4, 3, 4, 3, masked="so far")),
        Case("batch (2, 3), scores around 100 (exp overflows)",
             lambda g: _update_inputs(g, 5, 6, 4, 4, prefix=(2, 3), scale=5.0, shift=100.0, grow=True), hidden=True),
        Case("the new block's scores are all smaller", _smaller_block, hidden=True),
        Case("one key per block, d=1", lambda g: _update_inputs(g, 7, 1, 1, 1), hidden=True),
        Case("some -inf entries in the block, batch 2", lambda g: _update_inputs(g, 6, 2, 5, 3, prefix=(2,),
                                                                                  masked="some"), hidden=True),
        Case("masked rows and a growing max, batch 3", lambda g: _update_inputs(g, 5, 4, 3, 2, prefix=(3,),
                                                                                 grow=True, masked="so far"),
             hidden=True),
    ),
    reference=_update_ref,
    call=_update_call,
    tolerance=STATE_TOL,
    output_names=("m", "l", "acc"),
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


def _qkv(g, N_q, N_k, d, d_v=None, prefix=(), block_q=16, block_k=16, scale=1.0):
    d_v = d if d_v is None else d_v
    return {"q": randn(g, *prefix, N_q, d, scale=scale), "k": randn(g, *prefix, N_k, d, scale=scale),
            "v": randn(g, *prefix, N_k, d_v), "block_q": block_q, "block_k": block_k}


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
    name="tiled_attention",
    cases=(
        Case("N=100, d=8, tiles 32x16 (the last ones ragged)", lambda g: _qkv(g, 100, 100, 8, block_q=32, block_k=16)),
        Case("batch 2, N_q=64, N_k=96, d=8, d_v=4, tiles 16x32",
             lambda g: _qkv(g, 64, 96, 8, 4, prefix=(2,), block_q=16, block_k=32)),
        Case("batch (2, 3), N=80, d=4, tiles 16x16", lambda g: _qkv(g, 80, 80, 4, prefix=(2, 3)), hidden=True),
        Case("one query, N_k=50, tiles 8x8", lambda g: _qkv(g, 1, 50, 8, block_q=8, block_k=8), hidden=True),
        Case("large inputs (x3: a sharp softmax), N=96, tiles 32x32",
             lambda g: _qkv(g, 96, 96, 8, block_q=32, block_k=32, scale=3.0), hidden=True),
        Case("tiles larger than the sequence", lambda g: _qkv(g, 20, 30, 8, block_q=64, block_k=64), hidden=True),
        Case("1x1 tiles", lambda g: _qkv(g, 7, 9, 3, block_q=1, block_k=1), hidden=True),
    ),
    reference=_tiled_ref,
    call=_attention_call,
    tolerance=ATTN_TOL,
    output_names=("out", "lse"),
    mistakes=TILED_MISTAKES,
)


# ---------------------------------------------------------------------------------------------
# 3. causal tiled attention that skips fully masked tiles

CAUSAL = Check(
    name="causal_tiled_attention",
    cases=(
        Case("N=128, d=8, tiles 16x16", lambda g: _qkv(g, 128, 128, 8)),
        Case("batch 2, N=100, d=8, tiles 32x16", lambda g: _qkv(g, 100, 100, 8, prefix=(2,), block_q=32, block_k=16)),
        Case("tiles 16x48 (wider than tall), N=120", lambda g: _qkv(g, 120, 120, 8, block_q=16, block_k=48),
             hidden=True),
        Case("batch (2, 2), N=64, d=4, d_v=6, large inputs",
             lambda g: _qkv(g, 64, 64, 4, 6, prefix=(2, 2), scale=3.0), hidden=True),
        Case("a single position", lambda g: _qkv(g, 1, 1, 8), hidden=True),
        Case("one tile covers everything", lambda g: _qkv(g, 12, 12, 8, block_q=32, block_k=32), hidden=True),
    ),
    reference=partial(_tiled_ref, causal=True),
    call=partial(_attention_call, causal=True),
    tolerance=ATTN_TOL,
    output_names=("out", "lse"),
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
# 4. the autograd Function: backward recomputes the tiles from the logsumexp


def _grad_inputs(g, N_q, N_k, d, d_v=None, prefix=(), block=16, causal=False, scale=1.0):
    inputs = _qkv(g, N_q, N_k, d, d_v, prefix, scale=scale)
    del inputs["block_q"], inputs["block_k"]
    inputs |= {"causal": causal, "block_size": block,
               "grad_out": randn(g, *prefix, N_q, inputs["v"].shape[-1])}
    return inputs


def _grad_ref(inputs):
    q, k, v = (inputs[n].clone().requires_grad_(True) for n in "qkv")
    with torch.enable_grad():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=inputs["causal"])
        grads = torch.autograd.grad(out, (q, k, v), inputs["grad_out"])
    return (out.detach(), *grads)


def _function_call(impl, inputs):
    if not (isinstance(impl, type) and issubclass(impl, torch.autograd.Function)):
        raise TypeError(f"expected a subclass of torch.autograd.Function (used as FlashAttention.apply), "
                        f"got {impl!r}")
    q, k, v = (inputs[n].clone().requires_grad_(True) for n in "qkv")
    block = inputs["block_size"]
    limit = _limit_bytes(q, k, v, block, block)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    watch = _Watch()
    with torch.enable_grad(), watch:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = impl.apply(q, k, v, inputs["causal"], block)
        if not isinstance(out, torch.Tensor) or out.grad_fn is None:
            raise TypeError("FlashAttention.apply must return the attention output as one tensor that "
                            "autograd can differentiate")
        stored = [t for t in vars(out.grad_fn).values() if isinstance(t, torch.Tensor)]
        for t in saved + stored:
            if _storage_bytes(t) > limit:
                raise TilingError(
                    f"FlashAttention saves a tensor of shape {tuple(t.shape)} for backward ({_storage_bytes(t)} "
                    f"bytes, N_q={q.shape[-2]}, N_k={k.shape[-2]}): save only q, k, v, the output and the "
                    f"logsumexp, and recompute the attention tiles in backward")
        grads = torch.autograd.grad(out, (q, k, v), inputs["grad_out"])
    _verdict(watch, limit, "FlashAttention (forward or backward)", block, block, q.shape[-2], k.shape[-2])
    return (out.detach(), *grads)


FUNCTION = Check(
    name="FlashAttention",
    cases=(
        Case("N=64, d=8, tiles of 16, not causal", lambda g: _grad_inputs(g, 64, 64, 8)),
        Case("batch 2, N=80, d=8, tiles of 32 (ragged), causal",
             lambda g: _grad_inputs(g, 80, 80, 8, prefix=(2,), block=32, causal=True)),
        Case("N_q=48, N_k=80, d=8, d_v=4, not causal", lambda g: _grad_inputs(g, 48, 80, 8, 4), hidden=True),
        Case("batch (2, 2), N=64, d=4, causal, large inputs",
             lambda g: _grad_inputs(g, 64, 64, 4, prefix=(2, 2), causal=True, scale=3.0), hidden=True),
        Case("tiles larger than the sequence, causal", lambda g: _grad_inputs(g, 10, 10, 8, block=32, causal=True),
             hidden=True),
        Case("tiles of 8, N=60, causal, d_v=12", lambda g: _grad_inputs(g, 60, 60, 8, 12, block=8, causal=True),
             hidden=True),
    ),
    reference=_grad_ref,
    call=_function_call,
    tolerance=GRAD_TOL,
    output_names=("out", "dq", "dk", "dv"),
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
        Mistake("no mask in backward", _flash_function("no mask in backward"),
                "the causal gradients match a backward pass without the mask: when recomputing P in "
                "backward, mask keys j > i with -inf as in forward."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 5. HBM accesses of standard and flash attention (Dao et al. 2022, Algorithms 0 and 1)


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
    name="hbm_accesses",
    cases=(
        Case("N=1024, d=64, M=25000", lambda g: {"N": 1024, "d": 64, "M": 25_000}),
        Case("N=4096, d=128, M=100000", lambda g: {"N": 4096, "d": 128, "M": 100_000}),
        Case("M a multiple of 4d: N=8192, d=64, M=32768", lambda g: {"N": 8192, "d": 64, "M": 32_768}, hidden=True),
        Case("SRAM smaller than 4d (B_c = 1)", lambda g: {"N": 1000, "d": 64, "M": 100}, hidden=True),
        Case("SRAM holds everything (T_c = 1)", lambda g: {"N": 512, "d": 64, "M": 10**9}, hidden=True),
        Case("N=1, d=1, M=4", lambda g: {"N": 1, "d": 1, "M": 4}, hidden=True),
        Case("N=100000, d=128, M=49152", lambda g: {"N": 100_000, "d": 128, "M": 49_152}, hidden=True),
    ),
    reference=_hbm_ref,
    call=lambda impl, inputs: impl(inputs["N"], inputs["d"], inputs["M"]),
    tolerance=EXACT,
    output_names=("standard", "flash"),
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


CHECKS = CheckSet(CHAPTER, [UPDATE, TILED, CAUSAL, FUNCTION, HBM])
check = CHECKS.check
