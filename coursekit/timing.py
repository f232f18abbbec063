"""Side-by-side timing for noisy shared machines.

Methods are run interleaved (A, B, C, A, B, C, ...) so that a burst of load on the machine hits
all of them alike; we report the median and the range, never a single run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    name: str
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def low(self) -> float:
        return min(self.seconds)

    @property
    def high(self) -> float:
        return max(self.seconds)


def compare_timings(fns: Mapping[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                    device: torch.device | str | None = None) -> dict[str, Timing]:
    """Time each zero-argument callable ``repeats`` times, interleaved, after ``warmup`` calls each."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if not fns:
        raise ValueError("compare_timings needs at least one function to time")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    results = {name: Timing(name) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            results[name].seconds.append(time.perf_counter() - start)
    return results


def format_timings(results: Mapping[str, Timing], baseline: str | None = None) -> str:
    """A small text table: median, range, and the ratio to ``baseline`` (default: the first)."""
    if not results:
        return "(no timings)"
    baseline = baseline or next(iter(results))
    base = results[baseline].median
    width = max(len(n) for n in results)
    lines = [f"{'method':<{width}}  {'median':>10}  {'range':>21}  {'speedup vs ' + baseline:>14}"]
    for name, t in results.items():
        ratio = base / t.median if t.median > 0 else float("inf")
        lines.append(
            f"{name:<{width}}  {t.median * 1e3:8.3f}ms  [{t.low * 1e3:8.3f}, {t.high * 1e3:8.3f}]ms"
            f"  {ratio:13.2f}x"
        )
    return "\n".join(lines)
