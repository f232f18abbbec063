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
                                     "chips_needed"}


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
