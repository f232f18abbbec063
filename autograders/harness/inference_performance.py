"""Tasks of chapter 16, LLM inference performance: inputs, calls and rules (what the grading
sandbox sees).

Conventions (stated in the notebook too): FLOPs count a multiply and an add as 2; times are float64
seconds; a matmul is (M, K) @ (K, N); bytes count every operand read and the result written once.
"""

from __future__ import annotations

import torch

from autograders.engine.core import Case, Task, TaskSet

CHAPTER = "16_inference_performance"


# ---------------------------------------------------------------------------------------------
# 1. TTFT and TPOT from a timing trace

def _trace(R, N, offset, g, first=(0.05, 0.5), gap=(0.005, 0.05)):
    start = offset + torch.rand(R, generator=g, dtype=torch.float64) * 10
    ttft = first[0] + torch.rand(R, 1, generator=g, dtype=torch.float64) * (first[1] - first[0])
    gaps = gap[0] + torch.rand(R, N - 1, generator=g, dtype=torch.float64) * (gap[1] - gap[0])
    token_times = start[:, None] + torch.cat([ttft, ttft + gaps.cumsum(1)], dim=1)
    return {"start": start, "token_times": token_times}


TTFT_TPOT = Task(
    "ttft_tpot",
    cases=(
        Case("1 request, 5 tokens, start near 0", lambda g: _trace(1, 5, 0.0, g)),
        Case("3 requests, 10 tokens, start near 1e4 s", lambda g: _trace(3, 10, 1e4, g)),
        Case("2 tokens only (one decode step)", lambda g: _trace(4, 2, 100.0, g), hidden=True),
        Case("5 requests, 32 tokens, start near 1e6 s (a long-running process)",
             lambda g: _trace(5, 32, 1e6, g), hidden=True),
        Case("slow prefill, fast decode", lambda g: _trace(2, 6, 50.0, g, first=(2.0, 3.0), gap=(1e-4, 1e-3)),
             hidden=True),
    ),
    output_names=("ttft", "tpot"),
)


# ---------------------------------------------------------------------------------------------
# 2. arithmetic intensity of a matmul, against PyTorch's FLOP counter and real (meta) tensor sizes

def _mm_case(M, K, N, b):
    return lambda g: {"M": M, "K": K, "N": N, "bytes_per_element": b}


MATMUL = Task(
    "matmul_intensity",
    cases=(
        Case("square 1024 x 1024 x 1024, float32", _mm_case(1024, 1024, 1024, 4)),
        Case("matrix-vector: M=1, K=N=4096, float16 (one token through a layer)", _mm_case(1, 4096, 4096, 2)),
        Case("M=64 tokens, K=8192, N=8192, float16", _mm_case(64, 8192, 8192, 2), hidden=True),
        Case("1 x 1 x 1, float32", _mm_case(1, 1, 1, 4), hidden=True),
        Case("tall and skinny: M=4096, K=64, N=4096, bfloat16-sized", _mm_case(4096, 64, 4096, 2), hidden=True),
        Case("int8: M=16, K=N=4096", _mm_case(16, 4096, 4096, 1), hidden=True),
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


ROOFLINE = Task(
    "roofline_time",
    cases=(
        Case("one memory-bound step", _roofline_inputs([2e9], [1e9], [1e12], [1e11])),
        Case("a compute-bound and a memory-bound step", _roofline_inputs([1e12, 1e8], [1e9, 1e9], [1e12, 1e12],
                                                                          [2e11, 2e11])),
        Case("seven steps on one machine (scalar peak and bandwidth)", _random_roofline, hidden=True),
        Case("exactly at the ridge point", _roofline_inputs([4e10], [1e9], [4e12], [1e11]), hidden=True),
        Case("no FLOPs: a pure copy", _roofline_inputs([0.0, 0.0], [1e9, 3e6], [1e13, 1e13], [1e11, 1e11]),
             hidden=True),
    ),
)


# ---------------------------------------------------------------------------------------------
# 4. arithmetic intensity of one decode step

def _decode_case(P, B, b, kv):
    return lambda g: {"n_params": P, "batch": B, "bytes_per_param": b, "kv_bytes_per_sequence": kv}


DECODE = Task(
    "decode_intensity",
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
)


# ---------------------------------------------------------------------------------------------
# 5. predicted: the batch at which decode turns compute-bound (inputs are a machine's measured numbers)

def _ridge_case(P, b, kv, peak, bw):
    return lambda g: {"n_params": P, "bytes_per_param": b, "kv_bytes_per_sequence": kv,
                      "peak_flops": float(peak), "bandwidth": float(bw)}


def _random_machine(g):
    """A random model and machine, as measured numbers come: nothing lands exactly on an integer."""
    u = torch.rand(5, generator=g, dtype=torch.float64).tolist()
    return {"n_params": int(10 ** (7 + 3 * u[0])), "bytes_per_param": 4, "kv_bytes_per_sequence": int(1e5 + 1e6 * u[1]),
            "peak_flops": 5e10 * (1 + 4 * u[2]), "bandwidth": 1e10 * (1 + 4 * u[3])}


RIDGE_BATCH = Task(
    "compute_bound_batch",
    cases=(
        Case("7e9 parameters, float16, no cache, an H100's claimed 989 TFLOP/s and 3.35 TB/s",
             _ridge_case(7_000_000_000, 2, 0, 989e12, 3.35e12)),
        Case("the chapter's GPT on a CPU core: 13.2M parameters, float32, 0.4 MB of cache, 97 GFLOP/s, 41.9 GB/s",
             _ridge_case(13_172_736, 4, 393_216, 97.3e9, 41.9e9)),
        Case("7e9 parameters, float16, 20 MB of cache per sequence, H100 figures",
             _ridge_case(7_000_000_000, 2, 20_000_000, 989e12, 3.35e12)),
        Case("long contexts: 0.5 GB of cache per sequence on H100 figures (never compute-bound)",
             _ridge_case(7_000_000_000, 2, 500_000_000, 989e12, 3.35e12), hidden=True),
        Case("a slow chip with fast memory: compute-bound from batch 1",
             _ridge_case(1_000_000, 4, 1000, 1e9, 1e11), hidden=True),
        Case("int8 weights, Groq-like claimed figures (188 TFLOP/s, 80 TB/s)",
             _ridge_case(70_000_000_000, 1, 0, 188e12, 80e12), hidden=True),
        Case("a random model on a random machine", _random_machine, hidden=True),
        Case("exactly at the ridge point at batch 8 (round numbers)", _ridge_case(1_000_000, 4, 0, 4e12, 1e12),
             hidden=True),
        Case("70e9 parameters, float16, 1.3 GB of cache (Llama-2-70B at 4096 tokens), H100 figures",
             _ridge_case(70_000_000_000, 2, 1_342_177_280, 989e12, 3.35e12), hidden=True),
    ),
)


# ---------------------------------------------------------------------------------------------
# 6. measured: where measured decode-step times turn from flat to growing

def _step_times(batches, fixed, per_sequence, noise, g, shape="roofline"):
    B = torch.tensor(batches, dtype=torch.float64)
    if shape == "roofline":  # flat, then growing: max(fixed, per_sequence * B)
        t = torch.maximum(torch.full_like(B, fixed), per_sequence * B)
    else:  # a straight line: growing from the first batch on
        t = fixed + per_sequence * B
    t = t * (1 + noise * (2 * torch.rand(len(batches), generator=g, dtype=torch.float64) - 1))
    return {"batches": B, "step_times": t}


KNEE = Task(
    "measured_knee",
    cases=(
        Case("a roofline-shaped curve, flat up to batch 8, 2% noise",
             lambda g: _step_times((1, 2, 4, 8, 16, 32, 64), 8e-3, 1e-3, 0.02, g)),
        Case("growing from the first batch (1 ms shared + 0.2 ms per sequence), 5% noise",
             lambda g: _step_times((1, 2, 4, 8, 16, 32), 1e-3, 2e-4, 0.05, g, shape="line")),
        Case("three batch sizes, no noise", lambda g: _step_times((1, 4, 16), 2e-3, 5e-4, 0.0, g), hidden=True),
        Case("a GPU-like sweep: 4 ms flat, 15 us per sequence",
             lambda g: _step_times((1, 8, 64, 256, 512, 1024), 4e-3, 1.5e-5, 0.03, g), hidden=True),
        Case("unsorted batch sizes", lambda g: _step_times((16, 1, 32, 8, 2, 4), 3e-3, 4e-4, 0.05, g), hidden=True),
        Case("the time falls at the largest batches (noise): no knee",
             lambda g: {"batches": torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64),
                        "step_times": torch.tensor([5e-3, 5.1e-3, 5.3e-3, 5.2e-3], dtype=torch.float64)},
             hidden=True),
    ),
    output_names=("flat_s", "per_sequence_s", "knee"),
)


# ---------------------------------------------------------------------------------------------
# 7. how many chips hold a model

def _chips_case(P, b, mem, kv=0):
    return lambda g: {"n_params": P, "bytes_per_param": b, "memory_per_chip": mem, "kv_cache_bytes": kv}


CHIPS = Task(
    "chips_needed",
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
)


TASKS = TaskSet(CHAPTER, [TTFT_TPOT, MATMUL, ROOFLINE, DECODE, RIDGE_BATCH, KNEE, CHIPS])
