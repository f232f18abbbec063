"""The benchmark scripts' own building blocks are correct (their timings are reported, not tested)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from course import ROOT


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_moe_benchmark_layer_with_all_experts_is_the_dense_mixture():
    moe = load("moe")
    torch.manual_seed(0)
    layer = moe.TopKMoE(8, 16, n_experts=4, k=4)
    x = torch.randn(10, 8)
    gates = torch.softmax(layer.gate(x), dim=-1)
    dense = sum(gates[:, e, None] * expert(x) for e, expert in enumerate(layer.experts))
    torch.testing.assert_close(layer(x), dense, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="k <= n_experts"):
        moe.TopKMoE(8, 16, n_experts=2, k=3)
