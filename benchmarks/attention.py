"""Attention, naive vs tiled (chapter 06's solution) vs F.scaled_dot_product_attention: time and memory.

    python benchmarks/attention.py             # N = 512 ... 8192, and 16384 when memory allows
    python benchmarks/attention.py --quick     # N = 512 ... 2048, fewer repeats (well under a minute)
    python benchmarks/attention.py --threads 2 --block-q 256 --block-k 256 --max-n 32768

Inputs have shape (1, 1, N, d) with d = 64, float32 (four axes: PyTorch's fused CPU kernel needs them;
with (N, d) matrices SDPA falls back to a path that builds the N x N matrix). For every N the methods
run interleaved in one process, so a burst of load on a shared machine hits them alike; we report
medians with their range. The tiled attention is the chapter's solution, loaded from the solution
notebook (plain PyTorch in two Python loops over tiles of 512 queries x 256 keys). Peak extra memory is measured for
one call in a fresh process (coursekit.memory: VmHWM after a reset through /proc/self/clear_refs,
minus the level with the inputs allocated). A second table does the same for forward + backward:
autograd through naive attention, the chapter's FlashAttention autograd Function, and SDPA.

Writes benchmarks/results/attention.json, attention.md and attention.png (attention_quick.* with --quick).

Targets (issue 4), on the 2-core CPU: max error <= 1e-5 against naive in fp32; peak extra memory linear
in N for the tiled version; tiled >= 1.5x faster than naive for N >= 4096 and within 1.5x of SDPA.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import coursekit  # noqa: E402
from coursekit import memory  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
NOTEBOOK = ROOT / "solutions" / "06_flash_attention" / "flash_attention.ipynb"
PREAMBLE = "import math\nimport torch\nimport torch.nn.functional as F\nfrom torch import nn\n"
MAX_ERROR = 1e-5
TARGET_VS_NAIVE = 1.5   # tiled at least this much faster than naive for N >= LONG
TARGET_VS_SDPA = 1.5    # tiled at most this much slower than SDPA for N >= LONG
LONG = 4096
FORWARD = ("naive", "tiled", "SDPA")
TRAINING = ("naive", "FlashAttention", "SDPA")


def solution_source() -> str:
    """The graded solution cells of chapter 06, as one piece of source code."""
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = [c.source for c in nb.cells if c.cell_type == "code" and c.metadata.get("nbgrader", {}).get("solution")]
    if not cells:
        raise SystemExit(f"no solution cells found in {NOTEBOOK}")
    return PREAMBLE + "\n\n".join(cells) + "\n"


NAIVE = '''
def naive_attention(q, k, v):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v
'''


def methods_source(block_q: int, block_k: int, block: int) -> str:
    return NAIVE + f'''
FORWARD = {{
    "naive": naive_attention,
    "tiled": lambda q, k, v: tiled_attention(q, k, v, {block_q}, {block_k})[0],
    "SDPA": F.scaled_dot_product_attention,
}}
TRAINING = {{
    "naive": naive_attention,
    "FlashAttention": lambda q, k, v: FlashAttention.apply(q, k, v, False, {block}),
    "SDPA": F.scaled_dot_product_attention,
}}
'''


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def fits(N: int, training: bool) -> bool:
    """Naive attention holds a few N x N float32 matrices (more in training); keep a safety margin."""
    matrices = 8 if training else 4
    return matrices * 4 * N * N < 0.5 * available_bytes()


def measure_memory(source: str, table: str, name: str, N: int, d: int, threads: int, training: bool) -> int:
    grad = ", requires_grad=True" if training else ""
    setup = source + f'''
run = {table}[{name!r}]
q, k, v = (torch.randn(1, 1, {N}, {d}{grad}) for _ in range(3))
tiny = [torch.randn(1, 1, 64, {d}{grad}) for _ in range(3)]

def step(q, k, v):
    out = run(q, k, v)
    return torch.autograd.grad(out, (q, k, v), torch.ones_like(out)) if {training} else out
'''
    result = memory.peak_memory("out = step(q, k, v)", setup, warmup="step(*tiny)", threads=threads)
    return result.extra


def run(sizes, train_sizes, repeats, threads, block_q, block_k, block, d=64) -> dict:
    info = coursekit.setup(seed=0, threads=threads, quiet=True)
    memory.start_server()
    source = solution_source() + methods_source(block_q, block_k, block)
    namespace: dict = {"__name__": "chapter06"}
    exec(compile(source, str(NOTEBOOK), "exec"), namespace)
    forward_fns, training_fns = namespace["FORWARD"], namespace["TRAINING"]

    forward_rows, skipped = [], []
    for N in sizes:
        if not fits(N, training=False):
            skipped.append(f"forward N={N}: naive attention would need more memory than is available")
            continue
        q, k, v = (torch.randn(1, 1, N, d) for _ in range(3))
        timings = coursekit.compare_timings({m: (lambda f=forward_fns[m]: f(q, k, v)) for m in FORWARD},
                                            repeats=repeats, warmup=1)
        reference = forward_fns["naive"](q, k, v)
        for m in FORWARD:
            error = (forward_fns[m](q, k, v) - reference).abs().max().item()
            extra = measure_memory(source, "FORWARD", m, N, d, threads, training=False)
            t = timings[m]
            forward_rows.append({"N": N, "method": m, "median_s": t.median, "low_s": t.low, "high_s": t.high,
                                 "seconds": t.seconds, "peak_extra_bytes": extra, "max_error": error})
            print(f"forward N={N:6d} {m:<6} {t.median:8.4f}s [{t.low:.4f}, {t.high:.4f}]  "
                  f"extra {memory.format_bytes(extra):>10}  error {error:.1e}", flush=True)
        del q, k, v, reference

    training_rows = []
    for N in train_sizes:
        if not fits(N, training=True):
            skipped.append(f"training N={N}: naive attention would need more memory than is available")
            continue
        q, k, v = (torch.randn(1, 1, N, d, requires_grad=True) for _ in range(3))
        grad_out = torch.randn(1, 1, N, d)
        timings = coursekit.compare_timings(
            {m: (lambda f=training_fns[m]: torch.autograd.grad(f(q, k, v), (q, k, v), grad_out)) for m in TRAINING},
            repeats=repeats, warmup=1)
        reference = torch.autograd.grad(training_fns["naive"](q, k, v), (q, k, v), grad_out)
        for m in TRAINING:
            grads = torch.autograd.grad(training_fns[m](q, k, v), (q, k, v), grad_out)
            error = max((g - r).abs().max().item() for g, r in zip(grads, reference))
            extra = measure_memory(source, "TRAINING", m, N, d, threads, training=True)
            t = timings[m]
            training_rows.append({"N": N, "method": m, "median_s": t.median, "low_s": t.low, "high_s": t.high,
                                  "seconds": t.seconds, "peak_extra_bytes": extra, "max_grad_error": error})
            print(f"fwd+bwd N={N:6d} {m:<14} {t.median:8.4f}s [{t.low:.4f}, {t.high:.4f}]  "
                  f"extra {memory.format_bytes(extra):>10}  grad error {error:.1e}", flush=True)
        del q, k, v, grad_out, reference

    machine = {
        "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(), "python": platform.python_version(), "torch": torch.__version__,
        "threads": info.threads, "device": "cpu", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_end": os.getloadavg()[0],
    }
    settings = {"d": d, "shape": "(1, 1, N, d)", "dtype": "float32", "block_q": block_q, "block_k": block_k,
                "training_block": block, "repeats": repeats,
                "warmup_calls": 1}
    result = {"machine": machine, "settings": settings, "forward": forward_rows, "training": training_rows,
              "skipped": skipped}
    result["targets"] = evaluate_targets(result)
    return result


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _row(rows, N, method):
    return next(r for r in rows if r["N"] == N and r["method"] == method)


def slope(points: list[tuple[int, int]]) -> float | None:
    """Least-squares slope of log(memory) against log(N): 1 is linear, 2 quadratic."""
    pts = [(math.log(n), math.log(b)) for n, b in points if b > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def evaluate_targets(result: dict) -> list[dict]:
    rows = result["forward"]
    sizes = sorted({r["N"] for r in rows})
    targets = []
    worst = max((r["max_error"] for r in rows if r["method"] == "tiled"), default=None)
    targets.append({"target": f"tiled max error <= {MAX_ERROR:g} against naive (fp32), every N",
                    "measured": None if worst is None else f"worst {worst:.1e}",
                    "met": None if worst is None else worst <= MAX_ERROR})
    tiled_slope = slope([(r["N"], r["peak_extra_bytes"]) for r in rows if r["method"] == "tiled"])
    naive_slope = slope([(r["N"], r["peak_extra_bytes"]) for r in rows if r["method"] == "naive"])
    biggest = max(sizes, default=None)
    per_token = None if biggest is None else _row(rows, biggest, "tiled")["peak_extra_bytes"] / biggest
    targets.append({
        "target": "tiled peak extra memory linear in N (log-log slope <= 1.2; naive holds N^2 floats)",
        "measured": None if tiled_slope is None else
        f"slope tiled {tiled_slope:.2f}, naive {naive_slope:.2f}; tiled at N={biggest}: {per_token:.0f} bytes per token",
        "met": None if tiled_slope is None else tiled_slope <= 1.2})
    long = [n for n in sizes if n >= LONG]
    if long:
        vs_naive = {n: _row(rows, n, "naive")["median_s"] / _row(rows, n, "tiled")["median_s"] for n in long}
        vs_sdpa = {n: _row(rows, n, "tiled")["median_s"] / _row(rows, n, "SDPA")["median_s"] for n in long}
        targets.append({"target": f"tiled >= {TARGET_VS_NAIVE}x faster than naive for N >= {LONG}",
                        "measured": ", ".join(f"N={n}: {s:.2f}x" for n, s in vs_naive.items()),
                        "met": min(vs_naive.values()) >= TARGET_VS_NAIVE})
        targets.append({"target": f"tiled within {TARGET_VS_SDPA}x of SDPA (time ratio tiled/SDPA) for N >= {LONG}",
                        "measured": ", ".join(f"N={n}: {s:.2f}x" for n, s in vs_sdpa.items()),
                        "met": max(vs_sdpa.values()) <= TARGET_VS_SDPA})
    else:
        for what in (f"tiled >= {TARGET_VS_NAIVE}x faster than naive for N >= {LONG}",
                     f"tiled within {TARGET_VS_SDPA}x of SDPA for N >= {LONG}"):
            targets.append({"target": what, "measured": f"not measured (largest N {biggest})", "met": None})
    return targets


def to_markdown(result: dict, quick: bool) -> str:
    m, s = result["machine"], result["settings"]
    lines = [
        "# Attention: naive vs tiled (plain PyTorch) vs F.scaled_dot_product_attention",
        "",
        f"Machine: {m['cpu_count']} cores ({m['cpu_model']}), {m['threads']} torch thread(s), torch {m['torch']}, "
        f"Python {m['python']}; {m['date']}; load average at the end {m['load_average_at_end']:.1f}.",
        f"Inputs of shape {s['shape']}, d={s['d']}, {s['dtype']}; tiled = chapter 06's `tiled_attention` with "
        f"tiles of {s['block_q']} queries x {s['block_k']} keys, `FlashAttention` (training) with "
        f"{s['training_block']}x{s['training_block']} tiles. Medians of {s['repeats']} interleaved runs "
        f"[min, max] after {s['warmup_calls']} warm-up call each. Peak extra memory: one call in a fresh process "
        f"(VmHWM after clear_refs, minus the level with the inputs allocated).",
        "",
        "## Forward",
        "",
        "| N | method | median s | [min, max] s | speed-up vs naive | time / SDPA | peak extra memory | max error vs naive |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = result["forward"]
    for r in rows:
        naive = _row(rows, r["N"], "naive")["median_s"]
        sdpa = _row(rows, r["N"], "SDPA")["median_s"]
        lines.append(f"| {r['N']} | {r['method']} | {r['median_s']:.4f} | [{r['low_s']:.4f}, {r['high_s']:.4f}] | "
                     f"{naive / r['median_s']:.2f}x | {r['median_s'] / sdpa:.2f}x | "
                     f"{memory.format_bytes(r['peak_extra_bytes'])} | {r['max_error']:.1e} |")
    if result["training"]:
        lines += ["", "## Forward + backward (training)", "",
                  "| N | method | median s | [min, max] s | speed-up vs naive | peak extra memory | max grad error vs naive |",
                  "|---:|---|---:|---:|---:|---:|---:|"]
        rows = result["training"]
        for r in rows:
            naive = _row(rows, r["N"], "naive")["median_s"]
            lines.append(f"| {r['N']} | {r['method']} | {r['median_s']:.4f} | [{r['low_s']:.4f}, {r['high_s']:.4f}] | "
                         f"{naive / r['median_s']:.2f}x | {memory.format_bytes(r['peak_extra_bytes'])} | "
                         f"{r['max_grad_error']:.1e} |")
    lines += ["", "## Targets", ""]
    for t in result["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"- {t['target']}: {t['measured']} -- {verdict}")
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(result["skipped"]) + "."]
    lines += ["", "Timings on a shared machine are noisy: compare methods within one N (they ran interleaved), "
                  "and rerun on a quiet machine before reading much into a ratio."]
    if quick:
        lines += ["", "(--quick run: small N only; the speed targets need N >= 4096.)"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
    rows = result["forward"]
    for name in FORWARD:
        mine = [r for r in rows if r["method"] == name]
        ns = [r["N"] for r in mine]
        ax_t.errorbar(ns, [r["median_s"] for r in mine], fmt="-o", label=name,
                      yerr=[[r["median_s"] - r["low_s"] for r in mine], [r["high_s"] - r["median_s"] for r in mine]])
        ax_m.plot(ns, [max(r["peak_extra_bytes"], 1) / 2**20 for r in mine], "-o", label=name)
    ns = sorted({r["N"] for r in rows})
    ax_m.plot(ns, [4 * n * n / 2**20 for n in ns], "k:", label="one N x N float32 matrix")
    m = result["machine"]
    ax_t.set(xscale="log", yscale="log", xlabel="N", ylabel="seconds (median, range)",
             title=f"forward time, d={result['settings']['d']}, {m['threads']} thread(s)")
    ax_m.set(xscale="log", yscale="log", xlabel="N", ylabel="MiB", title="peak extra memory of one call")
    for ax in (ax_t, ax_m):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 512 ... 2048 and 3 repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see coursekit.runtime)")
    parser.add_argument("--block-q", type=int, default=512, help="queries per tile of the tiled forward")
    parser.add_argument("--block-k", type=int, default=256, help="keys per tile of the tiled forward")
    parser.add_argument("--block", type=int, default=256, help="square tile size of FlashAttention (training)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5, 3 with --quick)")
    parser.add_argument("--max-n", type=int, default=16384, help="largest N (skipped if it does not fit)")
    args = parser.parse_args(argv)
    if min(args.threads, args.block, args.block_q, args.block_k) < 1:
        parser.error("--threads and the block sizes must be positive")
    if args.quick:
        sizes, train_sizes, repeats = [512, 1024, 2048], [1024], 3
    else:
        sizes = [n for n in (512, 1024, 2048, 4096, 8192, 16384, 32768) if n <= args.max_n]
        train_sizes, repeats = [n for n in (1024, 2048, 4096) if n <= args.max_n], 5
    repeats = args.repeats or repeats
    print(f"attention benchmark: N={sizes}, training N={train_sizes}, {repeats} repeats, "
          f"{args.threads} thread(s), tiles {args.block_q}x{args.block_k} (training {args.block}), "
          f"torch {torch.__version__}", flush=True)
    result = run(sizes, train_sizes, repeats, args.threads, args.block_q, args.block_k, args.block)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "attention_quick" if args.quick else "attention"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(to_markdown(result, args.quick))
    plot(result, RESULTS / f"{stem}.png")
    print(to_markdown(result, args.quick))
    print(f"wrote {RESULTS.relative_to(ROOT)}/{stem}.json, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
