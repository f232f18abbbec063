"""Checks for chapter 16, LLM inference performance.

Conventions (stated in the notebook too): FLOPs count a multiply and an add as 2; times are float64
seconds; a matmul is (M, K) @ (K, N); bytes count every operand read and the result written once.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from autograders.engine.core import EXACT, Case, Check, CheckSet, Mistake, Tolerance

CHAPTER = "16_inference_performance"

RATIO = Tolerance(0.0, 1e-6, "a ratio of exact counts; float32 arithmetic would round it by ~1e-7")
SECONDS = Tolerance(1e-9, 1e-9, "float64 timestamps around 1e4-1e6 s keep ~1e-10 s; float32 would lose "
                                "milliseconds")

_DTYPES = {1: torch.int8, 2: torch.float16, 4: torch.float32, 8: torch.float64}


# ---------------------------------------------------------------------------------------------
# 1. TTFT and TPOT from a timing trace

def _trace(R, N, offset, g, first=(0.05, 0.5), gap=(0.005, 0.05)):
    start = offset + torch.rand(R, generator=g, dtype=torch.float64) * 10
    ttft = first[0] + torch.rand(R, 1, generator=g, dtype=torch.float64) * (first[1] - first[0])
    gaps = gap[0] + torch.rand(R, N - 1, generator=g, dtype=torch.float64) * (gap[1] - gap[0])
    token_times = start[:, None] + torch.cat([ttft, ttft + gaps.cumsum(1)], dim=1)
    return {"start": start, "token_times": token_times}


def _ttft_tpot_ref(inputs):
    start, t = inputs["start"], inputs["token_times"]
    n = t.shape[1]
    return t[:, 0] - start, (t[:, -1] - t[:, 0]) / (n - 1)


def _tpot_with_prefill(start, token_times):
    return token_times[:, 0] - start, (token_times[:, -1] - start) / token_times.shape[1]


def _tpot_over_n(start, token_times):
    return token_times[:, 0] - start, (token_times[:, -1] - token_times[:, 0]) / token_times.shape[1]


def _ttft_absolute(start, token_times):
    return token_times[:, 0], (token_times[:, -1] - token_times[:, 0]) / (token_times.shape[1] - 1)


def _float32(start, token_times):
    s, t = start.float(), token_times.float()
    return t[:, 0] - s, (t[:, -1] - t[:, 0]) / (t.shape[1] - 1)


TTFT_TPOT = Check(
    name="ttft_tpot",
    cases=(
        Case("1 request, 5 tokens, start near 0", lambda g: _trace(1, 5, 0.0, g)),
        Case("3 requests, 10 tokens, start near 1e4 s", lambda g: _trace(3, 10, 1e4, g)),
        Case("2 tokens only (one decode step)", lambda g: _trace(4, 2, 100.0, g), hidden=True),
        Case("5 requests, 32 tokens, start near 1e6 s (a long-running process)",
             lambda g: _trace(5, 32, 1e6, g), hidden=True),
        Case("slow prefill, fast decode", lambda g: _trace(2, 6, 50.0, g, first=(2.0, 3.0), gap=(1e-4, 1e-3)),
             hidden=True),
    ),
    reference=_ttft_tpot_ref,
    tolerance=SECONDS,
    output_names=("ttft", "tpot"),
    mistakes=(
        Mistake("TPOT includes the prefill", _tpot_with_prefill,
                "your TPOT matches (last token time - start) / N, which includes the first token's wait: "
                "time per OUTPUT token is measured from the first token, (t_N - t_1) / (N - 1)."),
        Mistake("TPOT over N", _tpot_over_n,
                "your TPOT matches (t_N - t_1) / N: between the first and the N-th token there are N - 1 "
                "decode steps."),
        Mistake("TTFT not relative", _ttft_absolute,
                "your TTFT matches the first token's clock time: subtract the request's start."),
        Mistake("float32", _float32,
                "your result matches computing in float32: clock readings near 1e4 s keep only ~1 ms in "
                "float32. Stay in float64 (the inputs' dtype)."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. arithmetic intensity of a matmul, against PyTorch's FLOP counter and real (meta) tensor sizes

def _matmul_ref(inputs):
    M, K, N = inputs["M"], inputs["K"], inputs["N"]
    dtype = _DTYPES[inputs["bytes_per_element"]]
    dtype = torch.float32 if dtype == torch.int8 else dtype  # the meta matmul needs a float dtype
    a = torch.empty(M, K, dtype=dtype, device="meta")
    b = torch.empty(K, N, dtype=dtype, device="meta")
    with FlopCounterMode(display=False) as counter:
        c = a @ b
    moved = (a.numel() + b.numel() + c.numel()) * inputs["bytes_per_element"]
    return counter.get_total_flops() / moved


def _mm_case(M, K, N, b):
    return lambda g: {"M": M, "K": K, "N": N, "bytes_per_element": b}


def _mm_no_two(M, K, N, bytes_per_element):
    return M * K * N / (bytes_per_element * (M * K + K * N + M * N))


def _mm_no_output(M, K, N, bytes_per_element):
    return 2 * M * K * N / (bytes_per_element * (M * K + K * N))


def _mm_elements(M, K, N, bytes_per_element):
    return 2 * M * K * N / (M * K + K * N + M * N)


def _mm_times_bytes(M, K, N, bytes_per_element):
    return 2 * M * K * N * bytes_per_element / (M * K + K * N + M * N)


MATMUL = Check(
    name="matmul_intensity",
    cases=(
        Case("square 1024 x 1024 x 1024, float32", _mm_case(1024, 1024, 1024, 4)),
        Case("matrix-vector: M=1, K=N=4096, float16 (one token through a layer)", _mm_case(1, 4096, 4096, 2)),
        Case("M=64 tokens, K=8192, N=8192, float16", _mm_case(64, 8192, 8192, 2), hidden=True),
        Case("1 x 1 x 1, float32", _mm_case(1, 1, 1, 4), hidden=True),
        Case("tall and skinny: M=4096, K=64, N=4096, bfloat16-sized", _mm_case(4096, 64, 4096, 2), hidden=True),
        Case("int8: M=16, K=N=4096", _mm_case(16, 4096, 4096, 1), hidden=True),
    ),
    reference=_matmul_ref,
    tolerance=RATIO,
    mistakes=(
        Mistake("no factor 2", _mm_no_two,
                "your intensity is half the right one: each of the M*K*N multiply-adds is 2 FLOPs."),
        Mistake("output not counted", _mm_no_output,
                "your intensity ignores the M x N result: it is written to memory too."),
        Mistake("elements instead of bytes", _mm_elements,
                "your intensity counts elements, not bytes: multiply the element counts by "
                "bytes_per_element."),
        Mistake("multiplied by the bytes", _mm_times_bytes,
                "you multiplied by bytes_per_element instead of dividing: intensity is FLOPs per BYTE."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 3. roofline-predicted time

def _roofline_inputs(flops, moved, peak, bw):
    return lambda g: {"flops": torch.tensor(flops, dtype=torch.float64),
                      "bytes_moved": torch.tensor(moved, dtype=torch.float64),
                      "peak_flops": torch.tensor(peak, dtype=torch.float64),
                      "bandwidth": torch.tensor(bw, dtype=torch.float64)}


def _random_roofline(g):
    n = 7
    return {"flops": 10 ** (6 + 6 * torch.rand(n, generator=g, dtype=torch.float64)),
            "bytes_moved": 10 ** (6 + 4 * torch.rand(n, generator=g, dtype=torch.float64)),
            "peak_flops": torch.tensor(5e13, dtype=torch.float64),
            "bandwidth": torch.tensor(2e12, dtype=torch.float64)}


ROOFLINE = Check(
    name="roofline_time",
    cases=(
        Case("one memory-bound step", _roofline_inputs([2e9], [1e9], [1e12], [1e11])),
        Case("a compute-bound and a memory-bound step", _roofline_inputs([1e12, 1e8], [1e9, 1e9], [1e12, 1e12],
                                                                          [2e11, 2e11])),
        Case("seven steps on one machine (scalar peak and bandwidth)", _random_roofline, hidden=True),
        Case("exactly at the ridge point", _roofline_inputs([4e10], [1e9], [4e12], [1e11]), hidden=True),
        Case("no FLOPs: a pure copy", _roofline_inputs([0.0, 0.0], [1e9, 3e6], [1e13, 1e13], [1e11, 1e11]),
             hidden=True),
    ),
    reference=lambda i: torch.maximum(i["flops"] / i["peak_flops"], i["bytes_moved"] / i["bandwidth"]),
    tolerance=RATIO,
    mistakes=(
        Mistake("sum", lambda flops, bytes_moved, peak_flops, bandwidth:
                flops / peak_flops + bytes_moved / bandwidth,
                "your time matches compute time + memory time: the roofline assumes they overlap, so the "
                "step takes the LONGER of the two (torch.maximum)."),
        Mistake("min", lambda flops, bytes_moved, peak_flops, bandwidth:
                torch.minimum(flops / peak_flops, bytes_moved / bandwidth),
                "your time is the shorter of the two: the slower resource sets the time (maximum)."),
        Mistake("swapped", lambda flops, bytes_moved, peak_flops, bandwidth:
                torch.maximum(flops / bandwidth, bytes_moved / peak_flops),
                "you divided FLOPs by the bandwidth: FLOPs go with peak_flops, bytes with bandwidth."),
        Mistake("compute only", lambda flops, bytes_moved, peak_flops, bandwidth: flops / peak_flops,
                "your time ignores memory traffic: add the bytes_moved / bandwidth bound."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 4. arithmetic intensity of one decode step

def _decode_ref(inputs):
    P, B, b, kv = inputs["n_params"], inputs["batch"], inputs["bytes_per_param"], inputs["kv_bytes_per_sequence"]
    flops = sum(2 * P for _sequence in range(B))  # every sequence's token meets every weight once
    weights = P * b                               # ...but the weights are read once for the whole batch
    caches = sum(kv for _sequence in range(B))    # each sequence reads its own cache
    return flops / (weights + caches)


def _decode_case(P, B, b, kv):
    return lambda g: {"n_params": P, "batch": B, "bytes_per_param": b, "kv_bytes_per_sequence": kv}


def _decode_weights_per_sequence(n_params, batch, bytes_per_param, kv_bytes_per_sequence):
    return 2 * n_params * batch / (batch * (n_params * bytes_per_param + kv_bytes_per_sequence))


def _decode_no_cache(n_params, batch, bytes_per_param, kv_bytes_per_sequence):
    return 2 * n_params * batch / (n_params * bytes_per_param)


def _decode_cache_once(n_params, batch, bytes_per_param, kv_bytes_per_sequence):
    return 2 * n_params * batch / (n_params * bytes_per_param + kv_bytes_per_sequence)


def _decode_no_two(n_params, batch, bytes_per_param, kv_bytes_per_sequence):
    return n_params * batch / (n_params * bytes_per_param + batch * kv_bytes_per_sequence)


DECODE = Check(
    name="decode_intensity",
    cases=(
        Case("7e9 parameters, float16, batch 1, no cache", _decode_case(7_000_000_000, 1, 2, 0)),
        Case("7e9 parameters, float16, batch 8, 0.5 GB of cache each", _decode_case(7_000_000_000, 8, 2, 500_000_000)),
        Case("batch 64, 1 GB of cache each", _decode_case(7_000_000_000, 64, 2, 1_000_000_000), hidden=True),
        Case("13M parameters, float32, batch 16, 4 MB of cache each", _decode_case(13_000_000, 16, 4, 4_000_000),
             hidden=True),
        Case("batch 256, no cache", _decode_case(70_000_000_000, 256, 2, 0), hidden=True),
        Case("batch 1, a cache larger than the weights", _decode_case(1_000_000_000, 1, 2, 8_000_000_000),
             hidden=True),
    ),
    reference=_decode_ref,
    tolerance=RATIO,
    mistakes=(
        Mistake("weights read per sequence", _decode_weights_per_sequence,
                "your intensity does not grow with the batch: the weights are read ONCE per decode step "
                "and used for every sequence in the batch -- only the caches are read per sequence."),
        Mistake("cache ignored", _decode_no_cache,
                "your intensity ignores the KV cache: every sequence reads its whole cache each step."),
        Mistake("one cache", _decode_cache_once,
                "your intensity reads one cache for the whole batch: each sequence has its own cache "
                "(batch * kv_bytes_per_sequence)."),
        Mistake("no factor 2", _decode_no_two,
                "your intensity is half the right one: a parameter meets a token in one multiply-add, "
                "2 FLOPs."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 5. how many chips hold a model

def _chips_ref(inputs):
    total = inputs["n_params"] * inputs["bytes_per_param"] + inputs["kv_cache_bytes"]
    return -(-total // inputs["memory_per_chip"])  # ceiling division on integers


def _chips_case(P, b, mem, kv=0):
    return lambda g: {"n_params": P, "bytes_per_param": b, "memory_per_chip": mem, "kv_cache_bytes": kv}


CHIPS = Check(
    name="chips_needed",
    cases=(
        Case("7e9 parameters in float16 on 80 GB chips", _chips_case(7 * 10**9, 2, 80 * 10**9)),
        Case("70e9 parameters in float16 on 80 GB chips", _chips_case(70 * 10**9, 2, 80 * 10**9)),
        Case("40e9 parameters in float16 (80 GB) on 230 MB chips", _chips_case(40 * 10**9, 2, 230 * 10**6)),
        Case("exactly fills 2 chips", _chips_case(80 * 10**9, 2, 80 * 10**9), hidden=True),
        Case("fits, until the KV cache is added", _chips_case(39 * 10**9, 2, 80 * 10**9, kv=3 * 10**9), hidden=True),
        Case("int8 weights and 20 GB of cache on 24 GB chips", _chips_case(70 * 10**9, 1, 24 * 10**9, kv=20 * 10**9),
             hidden=True),
        Case("one byte too many", _chips_case(1000, 4, 1000, kv=1), hidden=True),
    ),
    reference=_chips_ref,
    tolerance=EXACT,
    mistakes=(
        Mistake("rounded down", lambda n_params, bytes_per_param, memory_per_chip, kv_cache_bytes=0:
                (n_params * bytes_per_param + kv_cache_bytes) // memory_per_chip,
                "you rounded down: the part of the model left over still needs a chip -- round UP."),
        Mistake("rounded", lambda n_params, bytes_per_param, memory_per_chip, kv_cache_bytes=0:
                round((n_params * bytes_per_param + kv_cache_bytes) / memory_per_chip),
                "you rounded to the nearest integer: any remainder needs one more chip -- round UP."),
        Mistake("always one more", lambda n_params, bytes_per_param, memory_per_chip, kv_cache_bytes=0:
                (n_params * bytes_per_param + kv_cache_bytes) // memory_per_chip + 1,
                "your count is one too many when the model fills the chips exactly: use a ceiling, not "
                "floor + 1."),
        Mistake("parameters, not bytes", lambda n_params, bytes_per_param, memory_per_chip, kv_cache_bytes=0:
                -(-(n_params + kv_cache_bytes) // memory_per_chip),
                "your count treats each parameter as one byte: multiply by bytes_per_param."),
        Mistake("cache ignored", lambda n_params, bytes_per_param, memory_per_chip, kv_cache_bytes=0:
                -(-(n_params * bytes_per_param) // memory_per_chip),
                "your count ignores the KV cache: it has to fit in the chips' memory too."),
    ),
)


CHECKS = CheckSet(CHAPTER, [TTFT_TPOT, MATMUL, ROOFLINE, DECODE, CHIPS])
check = CHECKS.check
