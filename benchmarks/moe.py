"""Conditional computation, measured: a top-k Mixture-of-Experts layer against dense FFNs.

    python benchmarks/moe.py [--quick]

Compares, interleaved in one process, (a) an MoE layer with E experts of hidden size H and top-k
routing, (b) a dense FFN with the same number of parameters (hidden size E*H) and (c) a dense FFN
doing the same work per token (hidden size k*H). Writes benchmarks/results/moe.json and moe.md.
FLOPs per token are computed from the weight shapes (multiply-adds x 2) and shown next to the
measured times; the speed-ups are measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import coursekit

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


class FFN(nn.Module):
    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_hidden)
        self.down = nn.Linear(d_hidden, d_model)

    def forward(self, x):
        return self.down(F.relu(self.up(x)))


class TopKMoE(nn.Module):
    """Top-k routing: each expert runs only on the tokens routed to it."""

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, k: int):
        super().__init__()
        if not 1 <= k <= n_experts:
            raise ValueError(f"need 1 <= k <= n_experts, got k={k}, n_experts={n_experts}")
        self.k = k
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(FFN(d_model, d_hidden) for _ in range(n_experts))

    def forward(self, x):
        logits = self.gate(x)
        top_val, top_idx = logits.topk(self.k, dim=-1)
        weights = torch.softmax(top_val, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (top_idx == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out


def ffn_flops(d_model: int, d_hidden: int) -> int:
    return 2 * 2 * d_model * d_hidden


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    args = parser.parse_args(argv)
    info = coursekit.setup(seed=0)
    d_model, d_hidden, n_experts, k = 256, 256, 16, 2
    token_counts = [1024] if args.quick else [512, 2048, 8192]
    repeats = 3 if args.quick else 7
    layers = {
        f"MoE {n_experts}x{d_hidden}, top-{k}": TopKMoE(d_model, d_hidden, n_experts, k),
        f"dense FFN {n_experts * d_hidden} (same parameters)": FFN(d_model, n_experts * d_hidden),
        f"dense FFN {k * d_hidden} (same work per token)": FFN(d_model, k * d_hidden),
    }
    flops = [2 * d_model * n_experts + k * ffn_flops(d_model, d_hidden),
             ffn_flops(d_model, n_experts * d_hidden), ffn_flops(d_model, k * d_hidden)]
    rows = []
    with torch.no_grad():
        for n in token_counts:
            x = torch.randn(n, d_model, device=info.device)
            fns = {name: (lambda m=m.to(info.device): m(x)) for name, m in layers.items()}
            timings = coursekit.compare_timings(fns, repeats=repeats, device=info.device)
            print(f"\n{n} tokens\n" + coursekit.format_timings(timings, baseline=next(iter(layers))))
            for (name, m), f in zip(layers.items(), flops):
                t = timings[name]
                rows.append({"tokens": n, "layer": name, "parameters": params(m), "flops_per_token": f,
                             "median_s": t.median, "min_s": t.low, "max_s": t.high})
    moe, same_params = list(layers)[:2]
    for n in token_counts:
        r = {row["layer"]: row for row in rows if row["tokens"] == n}
        print(f"{n} tokens: MoE is {r[same_params]['median_s'] / r[moe]['median_s']:.1f}x faster than the "
              f"dense FFN with the same parameters")
    meta = {"device": str(info.device), "threads": info.threads, "torch": info.torch_version,
            "d_model": d_model, "d_hidden": d_hidden, "n_experts": n_experts, "k": k, "repeats": repeats}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "moe.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Mixture-of-Experts vs dense FFN (measured)", "",
             f"d_model={d_model}, expert hidden={d_hidden}, {n_experts} experts, top-{k}; device {info.device}, "
             f"{info.threads} thread(s), torch {info.torch_version}; median of {repeats} interleaved runs "
             "[min, max]. FLOPs/token are from the weight shapes.", "",
             "| tokens | layer | parameters | FLOPs/token | median ms | range ms | speed-up vs same-parameter dense |",
             "|---:|---|---:|---:|---:|---|---:|"]
    for row in rows:
        base = next(r for r in rows if r["tokens"] == row["tokens"] and r["layer"] == same_params)
        lines.append(f"| {row['tokens']} | {row['layer']} | {row['parameters']:,} | {row['flops_per_token']:,} | "
                     f"{row['median_s'] * 1e3:.2f} | [{row['min_s'] * 1e3:.2f}, {row['max_s'] * 1e3:.2f}] | "
                     f"{base['median_s'] / row['median_s']:.2f}x |")
    (RESULTS / "moe.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
