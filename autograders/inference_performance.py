"""Checks for chapter 16, LLM inference performance.

Conventions (stated in the notebook too): FLOPs count a multiply and an add as 2; times are float64
seconds; a matmul is (M, K) @ (K, N); bytes count every operand read and the result written once.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

from autograders.engine.core import EXACT, Check, CheckSet, Mistake, Tolerance
from autograders.harness import inference_performance as H

CHAPTER = H.CHAPTER

RATIO = Tolerance(0.0, 1e-6, "a ratio of exact counts; float32 arithmetic would round it by ~1e-7")
SECONDS = Tolerance(1e-9, 1e-9, "float64 timestamps around 1e4-1e6 s keep ~1e-10 s; float32 would lose "
                                "milliseconds")

_DTYPES = {1: torch.int8, 2: torch.float16, 4: torch.float32, 8: torch.float64}


# ---------------------------------------------------------------------------------------------
# 1. TTFT and TPOT from a timing trace


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
    H.TTFT_TPOT,
    reference=_ttft_tpot_ref,
    tolerance=SECONDS,
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


def _mm_no_two(M, K, N, bytes_per_element):
    return M * K * N / (bytes_per_element * (M * K + K * N + M * N))


def _mm_no_output(M, K, N, bytes_per_element):
    return 2 * M * K * N / (bytes_per_element * (M * K + K * N))


def _mm_elements(M, K, N, bytes_per_element):
    return 2 * M * K * N / (M * K + K * N + M * N)


def _mm_times_bytes(M, K, N, bytes_per_element):
    return 2 * M * K * N * bytes_per_element / (M * K + K * N + M * N)


MATMUL = Check(
    H.MATMUL,
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


ROOFLINE = Check(
    H.ROOFLINE,
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


def _decode_weights_per_sequence(n_params, batch, bytes_per_param, kv_bytes_per_sequence):
    return 2 * n_params * batch / (batch * (n_params * bytes_per_param + kv_bytes_per_sequence))


def _decode_no_cache(n_params, batch, bytes_per_param, kv_bytes_per_sequence):
    return 2 * n_params * batch / (n_params * bytes_per_param)


def _decode_cache_once(n_params, batch, bytes_per_param, kv_bytes_per_sequence):
    return 2 * n_params * batch / (n_params * bytes_per_param + kv_bytes_per_sequence)


def _decode_no_two(n_params, batch, bytes_per_param, kv_bytes_per_sequence):
    return n_params * batch / (n_params * bytes_per_param + batch * kv_bytes_per_sequence)


DECODE = Check(
    H.DECODE,
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
# 5. predicted: the batch at which decode turns compute-bound


def _ridge_batch_ref(inputs):
    P, b, c = inputs["n_params"], inputs["bytes_per_param"], inputs["kv_bytes_per_sequence"]
    ridge = inputs["peak_flops"] / inputs["bandwidth"]
    # 2PB / (Pb + Bc) >= ridge  <=>  B (2P - ridge c) >= ridge P b
    gain = 2 * P - ridge * c
    if gain <= 0:
        return math.inf  # the caches grow as fast as the FLOPs: no batch reaches the ridge point
    return max(1, math.ceil(ridge * P * b / gain))


def _ridge_generic(n_params, bytes_per_param, kv_bytes_per_sequence, peak_flops, bandwidth, *,
                   rounding=math.ceil, cache=True, ridge=None, never=math.inf):
    r = peak_flops / bandwidth if ridge is None else ridge(peak_flops, bandwidth)
    c = kv_bytes_per_sequence if cache else 0
    gain = 2 * n_params - r * c
    if gain <= 0:
        return never
    return max(1, rounding(r * n_params * bytes_per_param / gain))


RIDGE_BATCH = Check(
    H.RIDGE_BATCH,
    reference=_ridge_batch_ref,
    tolerance=EXACT,
    mistakes=(
        Mistake("not rounded", partial(_ridge_generic, rounding=lambda x: x),
                "your batch is the real number where the intensity equals the ridge point: batch sizes are "
                "integers -- return the smallest integer batch that reaches it (round UP)."),
        Mistake("rounded down", partial(_ridge_generic, rounding=math.floor),
                "you rounded down: that batch is still (just) below the ridge point -- round UP."),
        Mistake("cache ignored", partial(_ridge_generic, cache=False),
                "your batch ignores the KV caches: every sequence adds its cache bytes to each step, "
                "2PB / (Pb + Bc) -- the formula of decode_intensity."),
        Mistake("ridge inverted", partial(_ridge_generic, ridge=lambda peak, bw: bw / peak),
                "the ridge point is peak_flops / bandwidth (FLOPs per byte), not bandwidth / peak_flops."),
        Mistake("never is 0", partial(_ridge_generic, never=0),
                "when no batch reaches the ridge point (2P <= ridge * c), return math.inf, not 0."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 6. measured: where measured decode-step times turn from flat to growing


def _knee_generic(batches, step_times, *, sort=True, slope_from="two largest", through_origin=False,
                  swap=False, never=math.inf):
    B, t = batches, step_times
    if sort:
        order = B.argsort()
        B, t = B[order], t[order]
    flat = t[0].item()
    a = 0 if slope_from == "smallest and largest" else -2
    per_sequence = ((t[-1] - t[a]) / (B[-1] - B[a])).item()
    if per_sequence <= 0:
        knee = never
    elif through_origin:
        knee = flat / per_sequence
    else:
        knee = B[-1].item() - (t[-1].item() - flat) / per_sequence
    return (per_sequence, flat, knee) if swap else (flat, per_sequence, knee)


def _knee_ref(inputs):
    return _knee_generic(inputs["batches"], inputs["step_times"])


def _knee_negative(batches, step_times):
    order = batches.argsort()
    B, t = batches[order], step_times[order]
    per_sequence = ((t[-1] - t[-2]) / (B[-1] - B[-2])).item()
    return t[0].item(), per_sequence, B[-1].item() - (t[-1].item() - t[0].item()) / per_sequence


KNEE = Check(
    H.KNEE,
    reference=_knee_ref,
    tolerance=Tolerance(1e-12, 1e-9, "float64 arithmetic on a few measured times; another order of the same "
                                     "operations rounds by ~1e-15 relative"),
    mistakes=(
        Mistake("not sorted", partial(_knee_generic, sort=False),
                "your result uses the first and last entries as given: sort by batch size first (the smallest "
                "batch gives the flat level, the two LARGEST batches the slope)."),
        Mistake("slope from the smallest and the largest batch",
                partial(_knee_generic, slope_from="smallest and largest"),
                "your slope runs from the smallest to the largest batch, across the flat part: take the line "
                "through the two largest batches, where the time grows with the batch."),
        Mistake("knee through the origin", partial(_knee_generic, through_origin=True),
                "your knee is flat_s / per_sequence_s, as if the line went through the origin: take the batch "
                "at which the line through the two largest batches comes down to the flat level."),
        Mistake("results swapped", partial(_knee_generic, swap=True),
                "return (flat_s, per_sequence_s, knee) in this order."),
        Mistake("negative knee", _knee_negative,
                "when the slope is not positive the time does not grow with the batch: the knee is math.inf."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 7. how many chips hold a model

def _chips_ref(inputs):
    total = inputs["n_params"] * inputs["bytes_per_param"] + inputs["kv_cache_bytes"]
    return -(-total // inputs["memory_per_chip"])  # ceiling division on integers


CHIPS = Check(
    H.CHIPS,
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


CHECKS = CheckSet(CHAPTER, [TTFT_TPOT, MATMUL, ROOFLINE, DECODE, RIDGE_BATCH, KNEE, CHIPS])
check = CHECKS.check
