"""Chapter 16: the solution passes every check; plausible wrong answers and the stub are rejected."""

from __future__ import annotations

import math

import pytest
import torch

from autograders import inference_performance as ag
from checks_support import assert_accepts, assert_rejects
from notebook_code import load_solutions, not_implemented

sol = load_solutions(ag.CHAPTER)


def test_every_exercise_has_a_check():
    assert set(ag.CHECKS.checks) == {"ttft_tpot", "matmul_intensity", "roofline_time", "decode_intensity",
                                     "compute_bound_batch", "measured_knee", "chips_needed"}


@pytest.mark.parametrize("name", list(ag.CHECKS.checks))
def test_solution_passes(name):
    assert_accepts(ag.CHECKS, name, getattr(sol, name))


@pytest.mark.parametrize("name", list(ag.CHECKS.checks))
def test_stub_fails(name):
    text = assert_rejects(ag.CHECKS, name, not_implemented)
    assert "not implemented yet" in text


def test_matmul_reference_counts_like_the_formula():
    """FlopCounterMode's count of a meta matmul is 2*M*K*N."""
    inputs = {"M": 3, "K": 5, "N": 7, "bytes_per_element": 4}
    assert ag._matmul_ref(inputs) == pytest.approx(2 * 3 * 5 * 7 / (4 * (15 + 35 + 21)))


# --- ttft_tpot ----------------------------------------------------------------------------------

def tt_mean_of_all_gaps(start, token_times):  # gaps from the start, i.e. includes the prefill
    times = torch.cat([start[:, None], token_times], dim=1)
    return token_times[:, 0] - start, times.diff(dim=1).mean(dim=1)


def tt_over_n(start, token_times):
    return token_times[:, 0] - start, (token_times[:, -1] - token_times[:, 0]) / token_times.shape[1]


def tt_absolute(start, token_times):
    return token_times[:, 0], token_times.diff(dim=1).mean(dim=1)


def tt_float32(start, token_times):
    return sol.ttft_tpot(start.float(), token_times.float())


def tt_last_token(start, token_times):  # TTFT measured to the last token
    return token_times[:, -1] - start, token_times.diff(dim=1).mean(dim=1)


def tt_swapped(start, token_times):
    ttft, tpot = sol.ttft_tpot(start, token_times)
    return tpot, ttft


@pytest.mark.parametrize("wrong, hint", [
    (tt_mean_of_all_gaps, "includes the first token's wait"),
    (tt_over_n, "N - 1 decode steps"),
    (tt_absolute, "subtract the request's start"),
    (tt_float32, "float32"),
    (tt_last_token, None),
    (tt_swapped, None),
])
def test_ttft_tpot_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "ttft_tpot", wrong, hint)


# --- matmul_intensity ---------------------------------------------------------------------------

@pytest.mark.parametrize("wrong, hint", [
    (lambda M, K, N, bytes_per_element: M * K * N / (bytes_per_element * (M * K + K * N + M * N)), "2 FLOPs"),
    (lambda M, K, N, bytes_per_element: 2 * M * K * N / (bytes_per_element * (M * K + K * N)), "M x N result"),
    (lambda M, K, N, bytes_per_element: 2 * M * K * N / (M * K + K * N + M * N), "counts elements"),
    (lambda M, K, N, bytes_per_element: 2 * M * K * N / (bytes_per_element * (M * K + K * N + M * N)) * 2, None),
    (lambda M, K, N, bytes_per_element: 2 * M * K * N / (bytes_per_element * (M * N + K * N + M * K) + 1), None),
    (lambda M, K, N, bytes_per_element: 2 * M * N / (bytes_per_element * (M * K + K * N + M * N)), None),
])
def test_matmul_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "matmul_intensity", wrong, hint)


# --- roofline_time ------------------------------------------------------------------------------

@pytest.mark.parametrize("wrong, hint", [
    (lambda flops, bytes_moved, peak_flops, bandwidth: flops / peak_flops + bytes_moved / bandwidth, "LONGER"),
    (lambda flops, bytes_moved, peak_flops, bandwidth: torch.minimum(flops / peak_flops, bytes_moved / bandwidth),
     "shorter"),
    (lambda flops, bytes_moved, peak_flops, bandwidth: bytes_moved / bandwidth, None),
    (lambda flops, bytes_moved, peak_flops, bandwidth: torch.maximum(flops / bandwidth, bytes_moved / peak_flops),
     "FLOPs go with peak_flops"),
    (lambda flops, bytes_moved, peak_flops, bandwidth: torch.maximum(flops * peak_flops, bytes_moved * bandwidth),
     None),
])
def test_roofline_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "roofline_time", wrong, hint)


def test_roofline_python_max_fails_on_vectors():
    """Python's max() on tensors raises; the check reports it instead of crashing."""
    text = assert_rejects(ag.CHECKS, "roofline_time",
                          lambda flops, bytes_moved, peak_flops, bandwidth:
                          max(flops / peak_flops, bytes_moved / bandwidth))
    assert "raised" in text


# --- decode_intensity ---------------------------------------------------------------------------

@pytest.mark.parametrize("wrong, hint", [
    (lambda n_params, batch, bytes_per_param, kv_bytes_per_sequence:
     2 * n_params / (n_params * bytes_per_param + kv_bytes_per_sequence), "ONCE per decode step"),
    (lambda n_params, batch, bytes_per_param, kv_bytes_per_sequence:
     2 * n_params * batch / (n_params * bytes_per_param), "ignores the KV cache"),
    (lambda n_params, batch, bytes_per_param, kv_bytes_per_sequence:
     2 * n_params * batch / (n_params * bytes_per_param + kv_bytes_per_sequence), "each sequence has its own"),
    (lambda n_params, batch, bytes_per_param, kv_bytes_per_sequence:
     n_params * batch / (n_params * bytes_per_param + batch * kv_bytes_per_sequence), "2 FLOPs"),
    (lambda n_params, batch, bytes_per_param, kv_bytes_per_sequence:
     2 * n_params * batch / (n_params + batch * kv_bytes_per_sequence), None),
])
def test_decode_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "decode_intensity", wrong, hint)


# --- compute_bound_batch ------------------------------------------------------------------------

def batch_by_search(n_params, bytes_per_param, kv_bytes_per_sequence, peak_flops, bandwidth):
    """Correct but slow: try batch sizes until the intensity reaches the ridge point (bounded here)."""
    ridge = peak_flops / bandwidth
    for B in range(1, 100_000):
        if sol.decode_intensity(n_params, B, bytes_per_param, kv_bytes_per_sequence) >= ridge:
            return B
    return math.inf


def batch_not_rounded(n_params, bytes_per_param, kv_bytes_per_sequence, peak_flops, bandwidth):
    ridge = peak_flops / bandwidth
    gain = 2 * n_params - ridge * kv_bytes_per_sequence
    return ridge * n_params * bytes_per_param / gain if gain > 0 else math.inf


def batch_rounded(n_params, bytes_per_param, kv_bytes_per_sequence, peak_flops, bandwidth):
    ridge = peak_flops / bandwidth
    gain = 2 * n_params - ridge * kv_bytes_per_sequence
    return max(1, round(ridge * n_params * bytes_per_param / gain)) if gain > 0 else math.inf


def batch_no_cache(n_params, bytes_per_param, kv_bytes_per_sequence, peak_flops, bandwidth):
    return max(1, math.ceil(peak_flops / bandwidth * bytes_per_param / 2))


def batch_ridge_inverted(n_params, bytes_per_param, kv_bytes_per_sequence, peak_flops, bandwidth):
    return sol.compute_bound_batch(n_params, bytes_per_param, kv_bytes_per_sequence, bandwidth, peak_flops)


def batch_never_zero(n_params, bytes_per_param, kv_bytes_per_sequence, peak_flops, bandwidth):
    result = sol.compute_bound_batch(n_params, bytes_per_param, kv_bytes_per_sequence, peak_flops, bandwidth)
    return 0 if result == math.inf else result


def batch_one_more(n_params, bytes_per_param, kv_bytes_per_sequence, peak_flops, bandwidth):  # floor + 1
    ridge = peak_flops / bandwidth
    gain = 2 * n_params - ridge * kv_bytes_per_sequence
    return math.floor(ridge * n_params * bytes_per_param / gain) + 1 if gain > 0 else math.inf


@pytest.mark.parametrize("wrong, hint", [
    (batch_not_rounded, "round UP"),
    (batch_rounded, None),
    (batch_no_cache, "ignores the KV caches"),
    (batch_ridge_inverted, "not bandwidth / peak_flops"),
])
def test_compute_bound_batch_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "compute_bound_batch", wrong, hint)


@pytest.mark.parametrize("wrong, hint", [
    (batch_never_zero, "math.inf"),
    (batch_one_more, None),  # one too many exactly at the ridge point: the batch that reaches it counts
])
def test_compute_bound_batch_hidden_cases_catch(wrong, hint):
    from autograders.engine.core import evaluate
    report = evaluate(ag.CHECKS["compute_bound_batch"], wrong, seed=0, hidden=True)
    assert not report.passed and (hint is None or hint in report.summary())


def test_compute_bound_batch_search_is_accepted():
    """Trying B = 1, 2, ... with a bound is correct (if slow); the exercise asks for the closed form."""
    assert_accepts(ag.CHECKS, "compute_bound_batch", batch_by_search)


def test_compute_bound_batch_reaches_the_ridge_point():
    """The answer is the first batch at or above the ridge point: B - 1 is below it."""
    for case in ag.CHECKS["compute_bound_batch"].cases:
        i = case.make_inputs(torch.Generator().manual_seed(0))
        B = sol.compute_bound_batch(**i)
        ridge = i["peak_flops"] / i["bandwidth"]
        if B == math.inf:
            assert 2 * i["n_params"] <= ridge * i["kv_bytes_per_sequence"]
            continue
        args = (i["n_params"], i["bytes_per_param"], i["kv_bytes_per_sequence"])
        assert sol.decode_intensity(args[0], B, args[1], args[2]) >= ridge
        assert B == 1 or sol.decode_intensity(args[0], B - 1, args[1], args[2]) < ridge


# --- measured_knee ------------------------------------------------------------------------------

def knee_unsorted(batches, step_times):
    flat = step_times[0].item()
    slope = ((step_times[-1] - step_times[-2]) / (batches[-1] - batches[-2])).item()
    return flat, slope, batches[-1].item() - (step_times[-1].item() - flat) / slope if slope > 0 else math.inf


def knee_least_squares(batches, step_times):
    design = torch.stack([torch.ones_like(batches), batches], dim=1)
    fixed, slope = torch.linalg.lstsq(design, step_times[:, None]).solution[:, 0].tolist()
    return step_times[batches.argmin()].item(), slope, fixed / slope if slope > 0 else math.inf


def knee_flat_over_slope(batches, step_times):
    flat, slope, _ = sol.measured_knee(batches, step_times)
    return flat, slope, flat / slope if slope > 0 else math.inf


def knee_smallest_to_largest(batches, step_times):
    order = batches.argsort()
    B, t = batches[order], step_times[order]
    slope = ((t[-1] - t[0]) / (B[-1] - B[0])).item()
    return t[0].item(), slope, B[-1].item() - (t[-1].item() - t[0].item()) / slope


def knee_flat_is_minimum(batches, step_times):  # the smallest time, not the time of the smallest batch
    _, slope, _ = sol.measured_knee(batches, step_times)
    order = batches.argsort()
    flat = step_times.min().item()
    return flat, slope, batches[order][-1].item() - (step_times[order][-1].item() - flat) / slope


def knee_negative(batches, step_times):
    order = batches.argsort()
    B, t = batches[order], step_times[order]
    slope = ((t[-1] - t[-2]) / (B[-1] - B[-2])).item()
    return t[0].item(), slope, B[-1].item() - (t[-1].item() - t[0].item()) / slope


@pytest.mark.parametrize("wrong, hint", [
    (knee_flat_over_slope, "through the origin"),
    (knee_smallest_to_largest, "across the flat part"),
    (knee_least_squares, None),
    (knee_flat_is_minimum, None),
])
def test_measured_knee_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "measured_knee", wrong, hint)


@pytest.mark.parametrize("wrong, hint", [
    (knee_unsorted, "sort by batch size"),
    (knee_negative, "math.inf"),
])
def test_measured_knee_hidden_cases_name_the_mistake(wrong, hint):
    from autograders.engine.core import evaluate
    report = evaluate(ag.CHECKS["measured_knee"], wrong, seed=0, hidden=True)
    assert not report.passed and hint in report.summary()


def test_measured_knee_finds_the_roofline_corner():
    """On a noiseless roofline-shaped curve the knee is where the flat part ends."""
    B = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], dtype=torch.float64)
    t = torch.maximum(torch.full_like(B, 6e-3), 1e-3 * B)
    flat, slope, knee = sol.measured_knee(B, t)
    assert flat == pytest.approx(6e-3) and slope == pytest.approx(1e-3) and knee == pytest.approx(6.0)


# --- chips_needed -------------------------------------------------------------------------------

@pytest.mark.parametrize("wrong, hint", [
    (lambda n_params, bytes_per_param, memory_per_chip, kv_cache_bytes=0:
     (n_params * bytes_per_param + kv_cache_bytes) // memory_per_chip, "round UP"),
    (lambda n_params, bytes_per_param, memory_per_chip, kv_cache_bytes=0:
     int((n_params * bytes_per_param + kv_cache_bytes) / memory_per_chip) + 1, "floor + 1"),
    (lambda n_params, bytes_per_param, memory_per_chip, kv_cache_bytes=0:
     math.ceil(n_params / memory_per_chip), None),
    (lambda n_params, bytes_per_param, memory_per_chip, kv_cache_bytes=0:
     math.ceil(n_params * bytes_per_param / memory_per_chip), None),
    (lambda n_params, bytes_per_param, memory_per_chip, kv_cache_bytes=0:
     (n_params * bytes_per_param + kv_cache_bytes) / memory_per_chip, None),
])
def test_chips_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "chips_needed", wrong, hint)


def test_chips_float_ceiling_is_accepted():
    """math.ceil of a float division is a correct answer at these sizes."""
    assert_accepts(ag.CHECKS, "chips_needed", lambda n_params, bytes_per_param, memory_per_chip, kv_cache_bytes=0:
                   math.ceil((n_params * bytes_per_param + kv_cache_bytes) / memory_per_chip))
