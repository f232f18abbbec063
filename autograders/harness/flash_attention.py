"""Tasks of chapter 06, FlashAttention without Triton: inputs, calls and rules (what the grading
sandbox sees).

Conventions (stated in the notebook too): queries ``q`` have shape ``(..., N_q, d)``, keys ``k``
``(..., N_k, d)`` and values ``v`` ``(..., N_k, d_v)`` with any leading batch axes; scores are scaled by
``1/sqrt(d)``; a causal query ``i`` may attend to keys ``j <= i``; ``lse`` is the log-sum-exp of each
query's scaled scores, shape ``(..., N_q)``.

A correct number computed the naive way is not the exercise, so the calls watch how the answer is
computed (these rules run where the student's code runs, in the sandbox):

* every tensor the implementation creates (forward and backward) is seen through a
  ``TorchDispatchMode``; one larger than twice the largest of the inputs, the output and one
  ``(block_q, block_k)`` tile per batch (in float32 bytes: ``2 * 4 * max(|q|, |k|, |v|, n N_q d_v,
  n block_q block_k)``, n the number of sequences) means the ``N_q x N_k`` matrix (or a block row of
  it) was materialised;
* the causal forward's and the causal backward's matrix-multiply FLOPs (counted at the dispatcher)
  must stay near those of the blocks that are not fully masked, so fully masked blocks must be
  skipped, not masked;
* the tensors the autograd Function saves for backward (``saved_tensors_hooks`` and the ``ctx``
  attributes) must not include anything of the size of the attention matrix;
* PyTorch's fused attention kernels must not be called.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from autograders.engine.core import Case, Task, TaskSet, default_namespace, randn

CHAPTER = "06_flash_attention"


NEG_INF = float("-inf")


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
# 1. the online-softmax update

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
    # The running state after the earlier keys, all of their scores taken at once; rows that saw
    # only -inf (or no key at all) have m=-inf, l=0, acc=0.
    if b_prev == 0:
        m = prev_s.new_full(prev_s.shape[:-1], NEG_INF)
        l, acc = torch.zeros_like(m), prev_s.new_zeros(prev_s.shape[:-1] + (d,))
    else:
        m = prev_s.amax(-1)
        p = torch.exp(prev_s - torch.where(m == NEG_INF, torch.zeros_like(m), m)[..., None])
        l, acc = p.sum(-1), p @ prev_v
    return {"m": m, "l": l, "acc": acc, "scores": s, "v": v, "prev_scores": prev_s, "prev_v": prev_v}


def _smaller_block(g):
    inputs = _update_inputs(g, 3, 5, 4, 2)
    return inputs | {"scores": inputs["scores"] - 10.0}  # below the running max everywhere: alpha is 1


def _update_call(impl, inputs):
    return impl(inputs["m"], inputs["l"], inputs["acc"], inputs["scores"], inputs["v"])


UPDATE = Task(
    "online_softmax_update",
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
    call=_update_call,
    output_names=("m", "l", "acc"),
)


# ---------------------------------------------------------------------------------------------
# 2. tiled attention (forward and logsumexp)

def _qkv(g, N_q, N_k, d, d_v=None, prefix=(), block_q=16, block_k=16, scale=1.0):
    d_v = d if d_v is None else d_v
    return {"q": randn(g, *prefix, N_q, d, scale=scale), "k": randn(g, *prefix, N_k, d, scale=scale),
            "v": randn(g, *prefix, N_k, d_v), "block_q": block_q, "block_k": block_k}


TILED = Task(
    "tiled_attention",
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
    call=_attention_call,
    output_names=("out", "lse"),
    uses=("online_softmax_update",),
)


# ---------------------------------------------------------------------------------------------
# 3. causal tiled attention that skips fully masked tiles

# No given online_softmax_update here: the FLOP rule of this call counts the P @ V products, which the
# given version would compute outside the sandbox (uncounted) when graded, so that a solution which
# does not skip the masked tiles would pass there. A wrong online_softmax_update fails this too.
CAUSAL = Task(
    "causal_tiled_attention",
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
    call=partial(_attention_call, causal=True),
    output_names=("out", "lse"),
)


# ---------------------------------------------------------------------------------------------
# 4. the autograd Function (no mask): backward recomputes the tiles from the logsumexp

def _grad_inputs(g, N_q, N_k, d, d_v=None, prefix=(), block=16, causal=False, scale=1.0):
    inputs = _qkv(g, N_q, N_k, d, d_v, prefix, scale=scale)
    del inputs["block_q"], inputs["block_k"]
    inputs |= {"causal": causal, "block_size": block,
               "grad_out": randn(g, *prefix, N_q, inputs["v"].shape[-1])}
    return inputs


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
            out = impl.apply(q, k, v, False, block)
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


FUNCTION = Task(
    "FlashAttention",
    cases=(
        Case("N=64, d=8, tiles of 16", lambda g: _grad_inputs(g, 64, 64, 8)),
        Case("batch 2, N=80, d=8, tiles of 32 (ragged)", lambda g: _grad_inputs(g, 80, 80, 8, prefix=(2,), block=32)),
        Case("N_q=48, N_k=80, d=8, d_v=4", lambda g: _grad_inputs(g, 48, 80, 8, 4), hidden=True),
        Case("batch (2, 2), N=64, d=4, large inputs",
             lambda g: _grad_inputs(g, 64, 64, 4, prefix=(2, 2), scale=3.0), hidden=True),
        Case("tiles larger than the sequence", lambda g: _grad_inputs(g, 10, 10, 8, block=32), hidden=True),
        Case("tiles of 8, N=60, d_v=12", lambda g: _grad_inputs(g, 60, 60, 8, 12, block=8), hidden=True),
    ),
    call=_function_call,
    output_names=("out", "dq", "dk", "dv"),
    uses=("tiled_attention",),
)


# ---------------------------------------------------------------------------------------------
# 5. the causal backward: masks the diagonal tiles and skips the fully masked ones

def _causal_backward_flops(q, v, block) -> int:
    """FLOPs of S, dV, dP, dQ and dK over the (block, block) tiles that are not fully masked."""
    B, N, d, d_v = _batch(q), q.shape[-2], q.shape[-1], v.shape[-1]
    total = 0
    for i in range(0, N, block):
        rows = min(i + block, N) - i
        for j in range(0, i + rows, block):
            total += 2 * B * rows * (min(j + block, N) - j) * (3 * d + 2 * d_v)
    return total


def _causal_backward_call(impl, inputs):
    forward = (default_namespace(impl) or {}).get("causal_tiled_attention")
    if forward is None:
        raise NameError("causal_flash_backward is checked with out and lse from the notebook's "
                        "causal_tiled_attention (Exercise 3), which is not defined")
    q, k, v, grad_out, block = (inputs[n] for n in ("q", "k", "v", "grad_out", "block_size"))
    out, lse = forward(q, k, v, block, block)
    watch = _Watch()
    with watch:
        grads = impl(q, k, v, out, lse, grad_out, block)
    _verdict(watch, _limit_bytes(q, k, v, block, block), "causal_flash_backward", block, block,
             q.shape[-2], k.shape[-2])
    needed = _causal_backward_flops(q, v, block)
    everything = 2 * _batch(q) * q.shape[-2] * k.shape[-2] * (3 * q.shape[-1] + 2 * v.shape[-1])
    if watch.flops > 1.25 * needed and everything > 1.25 * needed:
        raise TilingError(
            f"causal_flash_backward did {watch.flops} matrix-multiply FLOPs; the ({block}, {block}) tiles that "
            f"are not entirely masked need {needed} (all tiles: {everything}). Skip the tiles whose keys all "
            f"come after the tile's last query, as in causal_tiled_attention")
    if not isinstance(grads, (tuple, list)) or len(grads) != 3:
        raise TypeError("causal_flash_backward must return the tuple (dq, dk, dv)")
    return tuple(grads)


CAUSAL_BACKWARD = Task(
    "causal_flash_backward",
    cases=(
        Case("batch 2, N=80, d=8, tiles of 32 (ragged)",
             lambda g: _grad_inputs(g, 80, 80, 8, prefix=(2,), block=32, causal=True)),
        Case("N=64, d=8, tiles of 16", lambda g: _grad_inputs(g, 64, 64, 8, causal=True)),
        Case("batch (2, 2), N=64, d=4, large inputs",
             lambda g: _grad_inputs(g, 64, 64, 4, prefix=(2, 2), causal=True, scale=3.0), hidden=True),
        Case("tiles larger than the sequence", lambda g: _grad_inputs(g, 10, 10, 8, block=32, causal=True),
             hidden=True),
        Case("tiles of 8, N=60, d_v=12", lambda g: _grad_inputs(g, 60, 60, 8, 12, block=8, causal=True),
             hidden=True),
        Case("a single position", lambda g: _grad_inputs(g, 1, 1, 8, causal=True), hidden=True),
    ),
    call=_causal_backward_call,
    output_names=("dq", "dk", "dv"),
    uses=("causal_tiled_attention",),
)


# ---------------------------------------------------------------------------------------------
# 6. HBM accesses of standard and flash attention (Dao et al. 2022, Algorithms 0 and 1)

HBM = Task(
    "hbm_accesses",
    cases=(
        Case("N=1024, d=64, M=25000", lambda g: {"N": 1024, "d": 64, "M": 25_000}),
        Case("N=4096, d=128, M=100000", lambda g: {"N": 4096, "d": 128, "M": 100_000}),
        Case("M a multiple of 4d: N=8192, d=64, M=32768", lambda g: {"N": 8192, "d": 64, "M": 32_768}, hidden=True),
        Case("SRAM smaller than 4d (B_c = 1)", lambda g: {"N": 1000, "d": 64, "M": 100}, hidden=True),
        Case("SRAM holds everything (T_c = 1)", lambda g: {"N": 512, "d": 64, "M": 10**9}, hidden=True),
        Case("N=1, d=1, M=4", lambda g: {"N": 1, "d": 1, "M": 4}, hidden=True),
        Case("N=100000, d=128, M=49152", lambda g: {"N": 100_000, "d": 128, "M": 49_152}, hidden=True),
    ),
    call=lambda impl, inputs: impl(inputs["N"], inputs["d"], inputs["M"]),
    output_names=("standard", "flash"),
)


TASKS = TaskSet(CHAPTER, [UPDATE, TILED, CAUSAL, FUNCTION, CAUSAL_BACKWARD, HBM])
