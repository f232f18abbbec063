"""Greedy generation with and without a KV cache: the course's GPT and transformers' GPT-2, same size.

    python benchmarks/kv_cache.py            # 128, 256 and 512 new tokens, 3 interleaved repeats
    python benchmarks/kv_cache.py --quick    # 64 and 128 new tokens (a few seconds)
    python benchmarks/kv_cache.py --threads 2

For every length the four methods (coursekit.gpt.generate with use_cache=False/True, and
transformers' GPT2LMHeadModel.generate with use_cache=False/True) run interleaved in one process,
so a burst of load on a shared machine hits them alike; we report medians with their range, tokens
per second, and the speed-ups. Both models are randomly initialised (nothing is downloaded): the
time of a decoding step does not depend on the values of the weights. Writes
benchmarks/results/kv_cache.json and .md (kv_cache_quick.* with --quick).

Targets (issue 4): >= 20x speed-up of the cache at 512 new tokens, and the course GPT's cached
generation >= 1.5x the tokens/s of transformers' cached generate at the same model size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import coursekit  # noqa: E402
from coursekit.gpt import GPT, GPTConfig, generate, kv_cache_bytes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGET_SPEEDUP_AT_512 = 20.0
TARGET_VS_TRANSFORMERS = 1.5
METHODS = ("ours, no cache", "ours, cache", "transformers, no cache", "transformers, cache")


def build_models(vocab: int, d_model: int, n_layer: int, n_head: int, max_len: int, device):
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    ours = GPT(GPTConfig(vocab_size=vocab, d_model=d_model, n_layer=n_layer, n_head=n_head,
                         max_len=max_len)).to(device).eval()
    hf_config = GPT2Config(vocab_size=vocab, n_positions=max_len, n_embd=d_model, n_layer=n_layer, n_head=n_head,
                           bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = GPT2LMHeadModel(hf_config).to(device).eval()
    hf.generation_config.eos_token_id = None  # an untrained model must not stop early
    hf.generation_config.pad_token_id = 0
    return ours, hf


def hf_generate(model, prompt, n_new, use_cache):
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                              min_new_tokens=n_new, do_sample=False, use_cache=use_cache)


def run(sizes, repeats, threads, prompt_len=16, vocab=65, d_model=256, n_layer=4, n_head=4) -> dict:
    info = coursekit.setup(seed=0, threads=threads)
    device = info.device
    max_len = max(1024, prompt_len + max(sizes))
    ours, hf = build_models(vocab, d_model, n_layer, n_head, max_len, device)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)

    # One short warm-up call of each method (first-call allocations, lazy imports).
    generate(ours, prompt, 8, use_cache=False), generate(ours, prompt, 8, use_cache=True)
    hf_generate(hf, prompt, 8, False), hf_generate(hf, prompt, 8, True)

    rows = []
    for n in sizes:
        outputs: dict[str, torch.Tensor] = {}
        cpu: dict[str, list[float]] = {m: [] for m in METHODS}

        def keep(name, fn):
            def call():  # also records this thread's CPU time: less sensitive to a crowded machine
                start = time.thread_time()
                outputs[name] = fn()
                cpu[name].append(time.thread_time() - start)
            return call

        fns = {
            "ours, no cache": keep("ours, no cache", lambda: generate(ours, prompt, n, use_cache=False)),
            "ours, cache": keep("ours, cache", lambda: generate(ours, prompt, n, use_cache=True)),
            "transformers, no cache": keep("transformers, no cache", lambda: hf_generate(hf, prompt, n, False)),
            "transformers, cache": keep("transformers, cache", lambda: hf_generate(hf, prompt, n, True)),
        }
        timings = coursekit.compare_timings(fns, repeats=repeats, warmup=0, device=device)
        with torch.no_grad():
            _, cache = ours(outputs["ours, cache"][:, :-1], use_cache=True)
        measured_cache = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in cache)
        row = {
            "new_tokens": n,
            "seconds": {m: {"median": t.median, "low": t.low, "high": t.high, "runs": t.seconds}
                        for m, t in timings.items()},
            "cpu_seconds_median": {m: statistics.median(v) for m, v in cpu.items()},
            "speedup_ours_cpu_time": statistics.median(cpu["ours, no cache"]) / statistics.median(cpu["ours, cache"]),
            "ours_vs_transformers_cached_cpu_time": (statistics.median(cpu["transformers, cache"])
                                                     / statistics.median(cpu["ours, cache"])),
            "tokens_per_s": {m: n / t.median for m, t in timings.items()},
            "speedup_ours": timings["ours, no cache"].median / timings["ours, cache"].median,
            "speedup_transformers": timings["transformers, no cache"].median / timings["transformers, cache"].median,
            "ours_vs_transformers_cached": timings["transformers, cache"].median / timings["ours, cache"].median,
            "identical_tokens_ours": bool(torch.equal(outputs["ours, cache"], outputs["ours, no cache"])),
            "identical_tokens_transformers": bool(torch.equal(outputs["transformers, cache"],
                                                              outputs["transformers, no cache"])),
            "cache_bytes_measured": measured_cache,
            "cache_bytes_formula": kv_cache_bytes(ours.config, 1, prompt_len + n - 1),
        }
        rows.append(row)
        print(f"{n:4d} new tokens: cache speed-up ours {row['speedup_ours']:.1f}x, transformers "
              f"{row['speedup_transformers']:.1f}x; ours cached / transformers cached "
              f"{row['ours_vs_transformers_cached']:.2f}x; identical tokens: {row['identical_tokens_ours']}, "
              f"{row['identical_tokens_transformers']}", flush=True)

    return {
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__, "threads": info.threads,
                    "device": str(device), "device_name": info.device_name,
                    "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "model": {"d_model": d_model, "n_layer": n_layer, "n_head": n_head, "vocab_size": vocab,
                  "max_len": max_len, "parameters_ours": ours.num_parameters(),
                  "parameters_transformers": sum(p.numel() for p in hf.parameters()),
                  "batch": 1, "prompt_tokens": prompt_len, "dtype": "float32", "decoding": "greedy"},
        "repeats": repeats,
        "rows": rows,
        "targets": targets(rows),
    }


def targets(rows: list[dict]) -> dict:
    result = {}
    at_512 = [r for r in rows if r["new_tokens"] == 512]
    if at_512:
        s = at_512[0]["speedup_ours"]
        result["speedup_at_512"] = {"target": TARGET_SPEEDUP_AT_512, "measured": s, "met": s >= TARGET_SPEEDUP_AT_512}
    worst = min(r["ours_vs_transformers_cached"] for r in rows)
    result["vs_transformers_cached"] = {"target": TARGET_VS_TRANSFORMERS, "measured_min_over_sizes": worst,
                                        "met": worst >= TARGET_VS_TRANSFORMERS}
    return result


def markdown(res: dict) -> str:
    m, mod = res["machine"], res["model"]
    load = "" if not m["load_average"] else f"; load average at the end {m['load_average'][0]:.1f}"
    lines = [
        "# KV cache: greedy generation with and without a cache",
        "",
        f"Machine: {m['cpu_count']} cores ({m['processor']}), device {m['device']} ({m['device_name']}), "
        f"{m['threads']} torch thread(s), torch {m['torch']}, transformers {m['transformers']}; {m['date']}{load}.",
        f"Models (random init): ours `coursekit.gpt.GPT` and transformers `GPT2LMHeadModel`, d_model={mod['d_model']}, "
        f"{mod['n_layer']} layers, {mod['n_head']} heads, vocab {mod['vocab_size']} "
        f"({mod['parameters_ours']:,} and {mod['parameters_transformers']:,} parameters); batch {mod['batch']}, "
        f"prompt {mod['prompt_tokens']} tokens, float32, greedy. Medians of {res['repeats']} interleaved runs "
        f"[min, max], seconds for the whole generation.",
        "",
        "| new tokens | ours, no cache | ours, cache | transformers, no cache | transformers, cache | "
        "speed-up ours | speed-up transformers | ours / transformers (cached tok/s) | identical tokens | cache MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in res["rows"]:
        cells = []
        for method in METHODS:
            s = r["seconds"][method]
            cells.append(f"{s['median']:.3f} [{s['low']:.3f}, {s['high']:.3f}]")
        same = "yes" if r["identical_tokens_ours"] and r["identical_tokens_transformers"] else (
            f"ours {r['identical_tokens_ours']}, transformers {r['identical_tokens_transformers']}")
        lines.append(f"| {r['new_tokens']} | " + " | ".join(cells)
                     + f" | {r['speedup_ours']:.1f}x | {r['speedup_transformers']:.1f}x"
                     f" | {r['ours_vs_transformers_cached']:.2f}x | {same} | {r['cache_bytes_measured'] / 2**20:.2f} |")
    lines += ["", "Tokens per second:", "",
              "| new tokens | " + " | ".join(METHODS) + " |", "|---:|" + "---:|" * len(METHODS)]
    for r in res["rows"]:
        lines.append(f"| {r['new_tokens']} | " + " | ".join(f"{r['tokens_per_s'][mth]:.0f}" for mth in METHODS) + " |")
    lines += ["", "CPU time of the generating thread (medians; a check on wall-clock numbers taken on a busy machine):", "",
              "| new tokens | " + " | ".join(METHODS) + " | speed-up ours | ours / transformers (cached) |",
              "|---:|" + "---:|" * (len(METHODS) + 2)]
    for r in res["rows"]:
        lines.append(f"| {r['new_tokens']} | " + " | ".join(f"{r['cpu_seconds_median'][mth]:.3f}" for mth in METHODS)
                     + f" | {r['speedup_ours_cpu_time']:.1f}x | {r['ours_vs_transformers_cached_cpu_time']:.2f}x |")
    lines += ["", "Targets (wall-clock medians):", ""]
    t = res["targets"]
    if "speedup_at_512" in t:
        s = t["speedup_at_512"]
        lines.append(f"- cache speed-up at 512 new tokens >= {s['target']:.0f}x: measured {s['measured']:.1f}x "
                     f"-- {'met' if s['met'] else 'NOT met'}")
    else:
        lines.append("- cache speed-up at 512 new tokens: not measured in this run (--quick)")
    v = t["vs_transformers_cached"]
    lines.append(f"- ours cached >= {v['target']:.1f}x the tokens/s of transformers cached (every size): "
                 f"worst {v['measured_min_over_sizes']:.2f}x -- {'met' if v['met'] else 'NOT met'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 and 128 new tokens only")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: COURSE_THREADS or 1; see coursekit.runtime)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = (64, 128) if args.quick else (128, 256, 512)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    res = run(sizes, args.repeats, args.threads)
    res["quick"] = args.quick
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "kv_cache_quick" if args.quick else "kv_cache"
    (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    text = markdown(res)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)
    ok = all(r["identical_tokens_ours"] and r["identical_tokens_transformers"] for r in res["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
