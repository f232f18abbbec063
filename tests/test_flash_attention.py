"""Chapter 06: the solution passes every check; plausible wrong answers, the naive way and the stub are
rejected; nothing of size N x N is saved for backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from autograders import flash_attention as ag
from checks_support import assert_graded_on_its_own, assert_accepts, assert_rejects
from notebook_code import load_solutions, not_implemented

sol = load_solutions(ag.CHAPTER)
NEG_INF = float("-inf")
# causal_flash_backward is checked with out and lse from `causal_tiled_attention` as the implementation's
# namespace finds it: the wrong implementations below live in this module, so it is here too.
causal_tiled_attention = sol.causal_tiled_attention


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Loops of small operations are many times slower with two threads on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_exercise_has_a_check():
    assert set(ag.CHECKS.checks) == {"online_softmax_update", "tiled_attention", "causal_tiled_attention",
                                     "FlashAttention", "causal_flash_backward", "hbm_accesses"}


@pytest.mark.parametrize("name", list(ag.CHECKS.checks))
def test_solution_passes(name):
    assert_accepts(ag.CHECKS, name, getattr(sol, name))


@pytest.mark.parametrize("name", ["online_softmax_update", "tiled_attention", "causal_tiled_attention",
                                  "causal_flash_backward", "hbm_accesses"])
def test_stub_fails(name):
    text = assert_rejects(ag.CHECKS, name, not_implemented)
    assert "not implemented yet" in text


def test_stub_function_fails():
    class Stub(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, causal=False, block_size=256):
            raise NotImplementedError()

        @staticmethod
        def backward(ctx, grad_out):
            raise NotImplementedError()

    assert "not implemented yet" in assert_rejects(ag.CHECKS, "FlashAttention", Stub)


# --- online_softmax_update ----------------------------------------------------------------------

def update_acc_not_rescaled(m, l, acc, scores, v):
    m_new = torch.maximum(m, scores.amax(-1))
    shift = torch.where(m_new == NEG_INF, 0.0, m_new)
    p = torch.exp(scores - shift[..., None])
    return m_new, torch.exp(m - shift) * l + p.sum(-1), acc + p @ v


def update_normalised(m, l, acc, scores, v):
    m_new, l_new, acc_new = sol.online_softmax_update(m, l, acc, scores, v)
    return m_new, l_new, acc_new / l_new[..., None]


def update_without_guard(m, l, acc, scores, v):
    m_new = torch.maximum(m, scores.amax(-1))
    p = torch.exp(scores - m_new[..., None])
    alpha = torch.exp(m - m_new)
    return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + p @ v


def update_old_max(m, l, acc, scores, v):  # exponentiates relative to the old max and never rescales
    shift = torch.where(m == NEG_INF, 0.0, m)
    p = torch.exp(scores - shift[..., None])
    return torch.maximum(m, scores.amax(-1)), l + p.sum(-1), acc + p @ v


def update_block_max(m, l, acc, scores, v):
    m_new = scores.amax(-1)
    shift = torch.where(m_new == NEG_INF, 0.0, m_new)
    p = torch.exp(scores - shift[..., None])
    alpha = torch.exp(m - shift)
    return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + p @ v


@pytest.mark.parametrize("wrong, hint", [
    (update_acc_not_rescaled, "acc was not rescaled"),
    (update_normalised, "divided by l"),
    (update_without_guard, "exp(-inf - (-inf)) = NaN"),
    (update_old_max, None),
    (update_block_max, "running max"),
])
def test_update_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "online_softmax_update", wrong, hint)


def test_update_nan_is_visible():
    """The masked-rows case runs in the visible test cell, so students meet it before grading."""
    from autograders.engine.core import evaluate
    report = evaluate(ag.CHECKS["online_softmax_update"], update_without_guard, seed=0, hidden=False)
    assert not report.passed and "NaN" in report.summary()


# --- tiled_attention ----------------------------------------------------------------------------

def naive_with_lse(q, k, v, block_q=256, block_k=256):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def sdpa_with_tiled_lse(q, k, v, block_q=256, block_k=256):
    return F.scaled_dot_product_attention(q, k, v), sol.tiled_attention(q, k, v, block_q, block_k)[1]


def block_rows(q, k, v, block_q=256, block_k=256):  # tiles the queries only: a (block_q, N_k) strip
    outs, lses = [], []
    for i in range(0, q.shape[-2], block_q):
        o, l = naive_with_lse(q[..., i:i + block_q, :], k, v)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, -2), torch.cat(lses, -1)


def tiled_no_rescale(q, k, v, block_q=256, block_k=256):
    return ag._tiled(q, k, v, block_q, block_k, bug="no rescale")


def tiled_lse_base_2(q, k, v, block_q=256, block_k=256):
    out, lse = sol.tiled_attention(q, k, v, block_q, block_k)
    return out, lse / math.log(2)


def tiled_unscaled(q, k, v, block_q=256, block_k=256):
    return sol.tiled_attention(q * math.sqrt(q.shape[-1]), k, v, block_q, block_k)


def tiled_drops_last_block(q, k, v, block_q=256, block_k=256):
    N_k = k.shape[-2]
    full = max(block_k, (N_k // block_k) * block_k)
    return sol.tiled_attention(q, k[..., :full, :], v[..., :full, :], block_q, block_k)


@pytest.mark.parametrize("wrong, hint", [
    (naive_with_lse, "created a tensor of shape"),
    (sdpa_with_tiled_lse, "fused attention"),
    (block_rows, "block row"),
    (tiled_no_rescale, "was not rescaled"),
    (tiled_lse_base_2, None),
    (tiled_unscaled, "1/sqrt(d)"),
    (tiled_drops_last_block, None),
])
def test_tiled_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "tiled_attention", wrong, hint)


def test_tiled_lse_hint():
    assert_rejects(ag.CHECKS, "tiled_attention", lambda q, k, v, block_q, block_k:
                   ag._tiled(q, k, v, block_q, block_k, bug="lse is the max"), "m + log(l)")


# --- causal_tiled_attention ---------------------------------------------------------------------

def causal_without_skipping(q, k, v, block_q=256, block_k=256):
    """Correct values, but every tile is computed and masked."""
    N = q.shape[-2]
    qs = q / math.sqrt(q.shape[-1])
    m = q.new_full(q.shape[:-1], NEG_INF)
    l = q.new_zeros(q.shape[:-1])
    acc = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    for j in range(0, N, block_k):
        for i in range(0, N, block_q):
            s = qs[..., i:i + block_q, :] @ k[..., j:j + block_k, :].transpose(-2, -1)
            query = torch.arange(i, min(i + block_q, N))[:, None]
            key = torch.arange(j, min(j + block_k, N))[None, :]
            s = s.masked_fill(key > query, NEG_INF)
            m[..., i:i + block_q], l[..., i:i + block_q], acc[..., i:i + block_q, :] = sol.online_softmax_update(
                m[..., i:i + block_q], l[..., i:i + block_q], acc[..., i:i + block_q, :], s, v[..., j:j + block_k, :])
    return acc / l[..., None], m + torch.log(l)


def causal_naive(q, k, v, block_q=256, block_k=256):
    N = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), NEG_INF)
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def causal_strict(q, k, v, block_q=256, block_k=256):
    return ag._tiled(q, k, v, block_q, block_k, causal=True, bug="strict")


def causal_not_masked_inside(q, k, v, block_q=256, block_k=256):
    return ag._tiled(q, k, v, block_q, block_k, causal=True, bug="no mask")


def causal_is_full(q, k, v, block_q=256, block_k=256):
    return sol.tiled_attention(q, k, v, block_q, block_k)


def causal_local_positions(q, k, v, block_q=256, block_k=256):
    """Masks with positions inside the tile (j > i locally) instead of global ones."""
    N = q.shape[-2]
    qs = q / math.sqrt(q.shape[-1])
    m, l = q.new_full(q.shape[:-1], NEG_INF), q.new_zeros(q.shape[:-1])
    acc = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    for j in range(0, N, block_k):
        for i in range((j // block_q) * block_q, N, block_q):
            s = qs[..., i:i + block_q, :] @ k[..., j:j + block_k, :].transpose(-2, -1)
            rows, cols = s.shape[-2:]
            s = s.masked_fill(torch.ones(rows, cols, dtype=torch.bool).triu(1), NEG_INF)
            m[..., i:i + block_q], l[..., i:i + block_q], acc[..., i:i + block_q, :] = sol.online_softmax_update(
                m[..., i:i + block_q], l[..., i:i + block_q], acc[..., i:i + block_q, :], s, v[..., j:j + block_k, :])
    return acc / l[..., None], m + torch.log(l)


@pytest.mark.parametrize("wrong, hint", [
    (causal_without_skipping, "Skip the tiles"),
    (causal_naive, "created a tensor of shape"),
    (causal_strict, "attend to itself"),
    (causal_not_masked_inside, "straddle the diagonal"),
    (causal_is_full, None),
    (causal_local_positions, None),
])
def test_causal_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "causal_tiled_attention", wrong, hint)


def test_causal_needs_square_inputs():
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match="as many keys as queries"):
        sol.causal_tiled_attention(q, torch.randn(5, 8), torch.randn(5, 8))


def test_causal_flop_bound_separates_skipping():
    """The visible cases leave room between the tiles that must be computed and all tiles."""
    for case in ag.CAUSAL.select(hidden=False):
        inputs = case.make_inputs(torch.Generator().manual_seed(0))
        q, k, v = inputs["q"], inputs["k"], inputs["v"]
        needed = ag._causal_flops(q, v, inputs["block_q"], inputs["block_k"])
        everything = 2 * ag._batch(q) * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        assert everything >= 1.5 * needed, case.name


# --- FlashAttention -----------------------------------------------------------------------------

def probabilities(q, k, causal):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), NEG_INF)
    return torch.softmax(s, -1)


def backward_from(q, k, v, p, grad_out):
    dv = p.transpose(-2, -1) @ grad_out
    dp = grad_out @ v.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    scale = 1 / math.sqrt(q.shape[-1])
    return ds @ k * scale, ds.transpose(-2, -1) @ q * scale, dv, None, None


def tiled_forward(q, k, v, causal, block_size):
    return (sol.causal_tiled_attention if causal else sol.tiled_attention)(q, k, v, block_size, block_size)[0]


class SavesP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal=False, block_size=256):
        ctx.save_for_backward(q, k, v, probabilities(q, k, causal))
        return tiled_forward(q, k, v, causal, block_size)

    @staticmethod
    def backward(ctx, grad_out):
        return backward_from(*ctx.saved_tensors, grad_out)


class KeepsPOnCtx(torch.autograd.Function):
    """Hides the matrix in a ctx attribute instead of save_for_backward."""

    @staticmethod
    def forward(ctx, q, k, v, causal=False, block_size=256):
        ctx.save_for_backward(q, k, v)
        ctx.p = probabilities(q, k, causal)
        return tiled_forward(q, k, v, causal, block_size)

    @staticmethod
    def backward(ctx, grad_out):
        return backward_from(*ctx.saved_tensors, ctx.p, grad_out)


class AutogradInBackward(torch.autograd.Function):
    """Saves little, but the backward pass runs autograd through naive attention."""

    @staticmethod
    def forward(ctx, q, k, v, causal=False, block_size=256):
        out, _ = (sol.causal_tiled_attention if causal else sol.tiled_attention)(q, k, v, block_size, block_size)
        ctx.save_for_backward(q, k, v)
        ctx.causal = causal
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = (t.detach().requires_grad_(True) for t in ctx.saved_tensors)
        with torch.enable_grad():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=ctx.causal)
            return (*torch.autograd.grad(out, (q, k, v), grad_out), None, None)


class ForwardOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal=False, block_size=256):
        return (sol.causal_tiled_attention if causal else sol.tiled_attention)(q, k, v, block_size, block_size)[0]

    @staticmethod
    def backward(ctx, grad_out):
        return torch.zeros_like(grad_out), None, None, None, None


@pytest.mark.parametrize("wrong, hint", [
    (SavesP, "saves a tensor of shape"),
    (KeepsPOnCtx, "saves a tensor of shape"),
    (AutogradInBackward, "fused attention"),
    (ag._flash_function("no D"), "rowsum(dO * O)"),
    (ag._flash_function("unscaled grads"), "1/sqrt(d)"),
    (ag._flash_function("no lse"), "exp(S_ij - lse_i)"),
    (ForwardOnly, None),
])
def test_function_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "FlashAttention", wrong, hint)


def test_function_must_be_an_autograd_function():
    text = assert_rejects(ag.CHECKS, "FlashAttention", sol.tiled_attention)
    assert "torch.autograd.Function" in text


@pytest.mark.parametrize("causal", [False, True])
def test_solution_saves_nothing_quadratic(causal):
    N, d = 256, 16
    q, k, v = (torch.randn(N, d, requires_grad=True) for _ in range(3))
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sol.FlashAttention.apply(q, k, v, causal, 64)
    assert saved and all(math.prod(s) <= N * d for s in saved), saved
    assert not [t for t in vars(out.grad_fn).values() if isinstance(t, torch.Tensor)]
    grad_out = torch.randn(N, d)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=causal), (q, k, v), grad_out)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


def test_function_is_checked_without_a_mask():
    """Exercise 4 is the Function without a mask; the causal backward is Exercise 5."""
    for case in ag.CHECKS["FlashAttention"].cases:
        assert case.make_inputs(torch.Generator().manual_seed(0))["causal"] is False, case.name
    assert ag.CHECKS["FlashAttention"].task.uses == ("tiled_attention",)


# --- causal_flash_backward ----------------------------------------------------------------------

def causal_backward_all_tiles(q, k, v, out, lse, grad_out, block_size=256):
    """Right numbers, but the tiles above the diagonal are computed (and masked) instead of skipped."""
    N, B = q.shape[-2], block_size
    scale = 1 / math.sqrt(q.shape[-1])
    D = (grad_out * out).sum(-1)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for j in range(0, N, B):
        cols = slice(j, j + B)
        for i in range(0, N, B):
            rows = slice(i, i + B)
            s = q[..., rows, :] @ k[..., cols, :].transpose(-2, -1) * scale
            key = torch.arange(j, min(j + B, N))[None, :]
            query = torch.arange(i, min(i + B, N))[:, None]
            p = torch.exp(s.masked_fill(key > query, NEG_INF) - lse[..., rows, None])
            do_i = grad_out[..., rows, :]
            dv[..., cols, :] += p.transpose(-2, -1) @ do_i
            ds = p * (do_i @ v[..., cols, :].transpose(-2, -1) - D[..., rows, None])
            dq[..., rows, :] += ds @ k[..., cols, :] * scale
            dk[..., cols, :] += ds.transpose(-2, -1) @ q[..., rows, :] * scale
    return dq, dk, dv


def causal_backward_whole_matrix(q, k, v, out, lse, grad_out, block_size=256):
    p = probabilities(q, k, causal=True)
    return backward_from(q, k, v, p, grad_out)[:3]


def causal_backward_autograd(q, k, v, out, lse, grad_out, block_size=256):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    with torch.enable_grad():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.autograd.grad(o, (q, k, v), grad_out)


def causal_backward_unscaled(q, k, v, out, lse, grad_out, block_size=256):
    dq, dk, dv = sol.causal_flash_backward(q, k, v, out, lse, grad_out, block_size)
    return dq * math.sqrt(q.shape[-1]), dk * math.sqrt(q.shape[-1]), dv


def causal_backward_two_results(q, k, v, out, lse, grad_out, block_size=256):
    return sol.causal_flash_backward(q, k, v, out, lse, grad_out, block_size)[:2]


@pytest.mark.parametrize("wrong, hint", [
    (ag._causal_backward_mistake("no mask"), "does not mask inside the tiles on the diagonal"),
    (ag._causal_backward_mistake("strict"), "not j >= i"),
    (ag._causal_backward_mistake("skips the diagonal"), "skipping the tiles on the diagonal"),
    (ag._causal_backward_mistake("no D"), "rowsum(dO * O)"),
    (causal_backward_all_tiles, "Skip the tiles whose keys all come after"),
    (causal_backward_whole_matrix, "created a tensor of shape"),
    (causal_backward_autograd, "fused attention"),
    (causal_backward_unscaled, None),
    (causal_backward_two_results, "(dq, dk, dv)"),
])
def test_causal_backward_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "causal_flash_backward", wrong, hint)


def test_causal_backward_flop_bound_separates_skipping():
    """The visible cases leave room between the tiles that must be computed and all tiles."""
    for case in ag.CAUSAL_BACKWARD.select(hidden=False):
        inputs = case.make_inputs(torch.Generator().manual_seed(0))
        q, k, v, block = inputs["q"], inputs["k"], inputs["v"], inputs["block_size"]
        needed = ag.H._causal_backward_flops(q, v, block)
        everything = 2 * ag._batch(q) * q.shape[-2] * k.shape[-2] * (3 * q.shape[-1] + 2 * v.shape[-1])
        assert everything >= 1.4 * needed, case.name  # the rule allows 1.25


def test_causal_backward_needs_square_inputs():
    q, k = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="as many keys as queries"):
        sol.causal_flash_backward(q, k, k, q, torch.zeros(4), q, 2)


# --- hbm_accesses -------------------------------------------------------------------------------

def hbm(bug):
    return ag._hbm_mistake(bug)


@pytest.mark.parametrize("wrong, hint", [
    (hbm("floor"), "rounded up"),
    (hbm("no init"), "initial writes"),
    (hbm("theta"), "Theta"),
    (hbm("T_r"), "T_c = ceil(N / B_c)"),
    (hbm("standard without P"), "4 N^2"),
    (lambda N, d, M: (4 * N * d + 4 * N * N, 12 * N * N * d * d // M), None),
])
def test_hbm_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "hbm_accesses", wrong, hint)


def test_hbm_matches_the_papers_order():
    """The exact count is about 12 N^2 d^2 / M once there are many key/value blocks."""
    standard, flash = sol.hbm_accesses(8192, 64, 4 * 64 * 64)  # B_c = 64
    assert standard == 4 * 8192 * 64 + 4 * 8192 ** 2
    assert flash == 8192 * 64 + 2 * 8192 + 2 * 8192 * 64 + 128 * 8192 * (3 * 64 + 4)
    ratio = flash / (8192 ** 2 * 64 ** 2 / (4 * 64 * 64))
    assert 11 < ratio < 13


def _passes_only_with_the_given_versions(name, wrong, monkeypatch):
    # sol.online_softmax_update.__globals__: the namespace the notebook's cells ran in
    assert_graded_on_its_own(ag.CHECKS, name, sol.online_softmax_update.__globals__, wrong, monkeypatch)


# --- later exercises get correct online_softmax_update / tiled attention ---------------------------

def update_acc_not_rescaled(m, l, acc, scores, v):
    m_new = torch.maximum(m, scores.amax(-1))
    shift = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
    p = torch.exp(scores - shift[..., None])
    return m_new, torch.exp(m - shift) * l + p.sum(-1), acc + p @ v


def tiled_unnormalised(q, k, v, block_q=512, block_k=256):
    out, lse = sol.tiled_attention(q, k, v, block_q, block_k)
    return out * 2.0, lse


def causal_tiled_wrong_lse(q, k, v, block_q=512, block_k=256):
    out, lse = sol.causal_tiled_attention(q, k, v, block_q, block_k)
    return out, lse + 1.0


@pytest.mark.parametrize("name, wrong", [
    ("tiled_attention", {"online_softmax_update": update_acc_not_rescaled}),
    ("FlashAttention", {"tiled_attention": tiled_unnormalised}),
    ("causal_flash_backward", {"causal_tiled_attention": causal_tiled_wrong_lse}),
], ids=["tiled", "FlashAttention", "causal_flash_backward"])
def test_a_wrong_earlier_exercise_does_not_fail_a_later_one(name, wrong, monkeypatch):
    _passes_only_with_the_given_versions(name, wrong, monkeypatch)


def test_causal_tiled_attention_gets_no_given_update():
    """Its FLOP rule counts the P @ V products that online_softmax_update makes: a given version,
    answered outside the sandbox in grading, would hide them (see the harness)."""
    assert ag.CHECKS["causal_tiled_attention"].task.uses == ()
