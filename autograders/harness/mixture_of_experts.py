"""Tasks of chapter 05, the sparsely-gated mixture of experts: inputs, calls and rules (what the
grading sandbox sees).

Conventions (stated in the notebook too): tokens are the rows of a matrix ``x`` of shape
``(N, d_model)``; gate matrices are used as ``x @ W_g`` with ``W_g`` of shape ``(d_model, n_experts)``;
gate logits and gates have shape ``(N, n_experts)``. Noisy gating is random, so the cases pass the
standard-normal noise in as a tensor: ``H(x) = x @ W_g + noise * softplus(x @ W_noise)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autograders.engine.core import Case, Task, TaskSet, randn

CHAPTER = "05_mixture_of_experts"


# ---------------------------------------------------------------------------------------------
# 1. KeepTopK

def _ktk_case(shape, k, scale=1.0, with_inf=False):
    def make(g):
        logits = randn(g, *shape, scale=scale)
        if with_inf:
            logits[0, 0] = float("-inf")
            logits[-1, 2] = float("-inf")
        return {"logits": logits, "k": k}
    return make


KEEP_TOP_K = Task(
    "keep_top_k",
    cases=(
        Case("5 tokens, 8 experts, k=2", _ktk_case((5, 8), 2)),
        Case("4 tokens, 6 experts, k=1", _ktk_case((4, 6), 1)),
        Case("k = n_experts keeps everything", _ktk_case((3, 5), 5), hidden=True),
        Case("batch (2, 3, 7), k=3", _ktk_case((2, 3, 7), 3), hidden=True),
        Case("large logits (about +-1e4), k=2", _ktk_case((6, 4), 2, scale=1e4), hidden=True),
        Case("a single expert", _ktk_case((4, 1), 1), hidden=True),
        Case("some logits already -inf, k=3", _ktk_case((3, 6), 3, with_inf=True), hidden=True),
        Case("one token given as a vector of 6, k=2", lambda g: {"logits": randn(g, 6), "k": 2}, hidden=True),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. noisy top-k gating

def _gating_inputs(g, n, d, n_experts, k, noise=True, scale=1.0):
    return {
        "x": randn(g, n, d, scale=scale),
        "W_g": randn(g, d, n_experts, scale=d ** -0.5),
        "W_noise": randn(g, d, n_experts, scale=d ** -0.5),
        "noise": randn(g, n, n_experts) if noise else None,
        "k": k,
    }


GATING = Task(
    "noisy_top_k_gating",
    cases=(
        Case("6 tokens, d=4, 5 experts, k=2, with noise", lambda g: _gating_inputs(g, 6, 4, 5, 2)),
        Case("8 tokens, d=6, 4 experts, k=1, noise=None", lambda g: _gating_inputs(g, 8, 6, 4, 1, noise=False)),
        Case("k = n_experts: a dense softmax", lambda g: _gating_inputs(g, 5, 4, 3, 3), hidden=True),
        Case("one token, 8 experts, k=2", lambda g: _gating_inputs(g, 1, 5, 8, 2), hidden=True),
        Case("32 tokens, d=16, 16 experts, k=4", lambda g: _gating_inputs(g, 32, 16, 16, 4), hidden=True),
        Case("large inputs (x20): sharp gates", lambda g: _gating_inputs(g, 7, 4, 6, 2, scale=20.0), hidden=True),
        Case("12 tokens, k=3, noise=None", lambda g: _gating_inputs(g, 12, 8, 6, 3, noise=False), hidden=True),
    ),
    output_names=("gates",),
    uses=("keep_top_k",),
)


# ---------------------------------------------------------------------------------------------
# 3. the balancing loss: CV^2 and the importance loss

def _positive(g, n, scale=1.0):
    return torch.rand(n, generator=g) * scale + 0.1 * scale


def one_number(value, what):
    """A single number as a 1-element tensor: how scalar results cross to the judge (a 0-d array does
    not keep its shape there)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{what} must be a single number (a 0-d tensor), got shape {tuple(value.shape)}")
        return value.detach().reshape(1)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    return torch.tensor([float(value)])


def _call_cv_squared(impl, inputs):
    return one_number(impl(**inputs), "cv_squared's result")


def _call_importance(impl, inputs):
    return one_number(impl(**inputs), "importance_loss's result")


CV_SQUARED = Task(
    "cv_squared",
    cases=(
        Case("8 positive values", lambda g: {"values": _positive(g, 8)}),
        Case("4 values around 100", lambda g: {"values": _positive(g, 4, 100.0)}),
        Case("all equal: CV is 0", lambda g: {"values": torch.full((6,), 2.5)}, hidden=True),
        Case("two values", lambda g: {"values": _positive(g, 2)}, hidden=True),
        Case("one value much larger", lambda g: {"values": torch.cat([_positive(g, 5), torch.tensor([50.0])])},
             hidden=True),
        Case("16 values, some exactly 0", lambda g: {"values": _positive(g, 16) * (torch.rand(16, generator=g) > 0.3)},
             hidden=True),
    ),
    call=_call_cv_squared,
    output_names=("cv_squared",),
)


def _routed_gates(g, n, n_experts, k, skew=0.0, scale=1.0):
    logits = randn(g, n, n_experts, scale=scale)
    logits[:, 0] += skew  # a gate that prefers expert 0
    top = torch.topk(logits, k, dim=-1)  # k experts per token share its weight; the others get 0
    return torch.zeros_like(logits).scatter(-1, top.indices, torch.softmax(top.values, dim=-1))


IMPORTANCE = Task(
    "importance_loss",
    cases=(
        Case("16 tokens, 4 experts, k=2, w=0.1",
             lambda g: {"gates": _routed_gates(g, 16, 4, 2), "w_importance": 0.1}),
        Case("a gate that prefers expert 0, 20 tokens, 5 experts, k=1, w=1",
             lambda g: {"gates": _routed_gates(g, 20, 5, 1, skew=2.0), "w_importance": 1.0}),
        Case("perfectly balanced gates: loss 0",
             lambda g: {"gates": torch.full((6, 3), 1 / 3), "w_importance": 0.5}, hidden=True),
        Case("one token, 8 experts, k=2",
             lambda g: {"gates": _routed_gates(g, 1, 8, 2), "w_importance": 0.2}, hidden=True),
        Case("64 tokens, 16 experts, k=4, sharp gates",
             lambda g: {"gates": _routed_gates(g, 64, 16, 4, scale=5.0), "w_importance": 0.01}, hidden=True),
        Case("everything on expert 0 (k=1)",
             lambda g: {"gates": _routed_gates(g, 10, 4, 1, skew=100.0), "w_importance": 1.0}, hidden=True),
    ),
    call=_call_importance,
    output_names=("loss",),
    # No given cv_squared: it is graded in the same cell as this exercise, so a grader can answer it only
    # after this one is handed in; the student's own cv_squared is used (a mistake there costs this
    # cell's points either way).
)


# ---------------------------------------------------------------------------------------------
# 4. the smooth load estimator

def _load_inputs(g, n, d, n_experts, k):
    i = _gating_inputs(g, n, d, n_experts, k)
    clean = i["x"] @ i["W_g"]
    std = F.softplus(i["x"] @ i["W_noise"])
    return {"clean_logits": clean, "noisy_logits": clean + i["noise"] * std, "noise_std": std, "k": k}


LOAD = Task(
    "smooth_load",
    cases=(
        Case("8 tokens, 4 experts, k=1", lambda g: _load_inputs(g, 8, 4, 4, 1)),
        Case("10 tokens, 6 experts, k=2", lambda g: _load_inputs(g, 10, 5, 6, 2)),
        Case("k = n_experts - 1", lambda g: _load_inputs(g, 9, 4, 5, 4), hidden=True),
        Case("k = n_experts: every expert always chosen", lambda g: _load_inputs(g, 7, 4, 3, 3), hidden=True),
        Case("one token, 8 experts, k=2", lambda g: _load_inputs(g, 1, 4, 8, 2), hidden=True),
        Case("32 tokens, 16 experts, k=4", lambda g: _load_inputs(g, 32, 16, 16, 4), hidden=True),
    ),
    output_names=("load",),
)


# ---------------------------------------------------------------------------------------------
# 5. the MoE layer

def _moe_inputs(g, n, d, h, n_experts, k, noise=True, w_importance=0.1, w_load=0.1, scale=1.0):
    return {
        "d_model": d, "d_hidden": h, "n_experts": n_experts, "k": k,
        "w_importance": w_importance, "w_load": w_load,
        "x": randn(g, n, d, scale=scale),
        "noise": randn(g, n, n_experts) if noise else None,
        "w_gate": randn(g, d, n_experts, scale=d ** -0.5),
        "w_noise": randn(g, d, n_experts, scale=d ** -0.5),
        "fc1_weight": randn(g, n_experts, h, d, scale=d ** -0.5),
        "fc1_bias": randn(g, n_experts, h, scale=0.1),
        "fc2_weight": randn(g, n_experts, d, h, scale=h ** -0.5),
        "fc2_bias": randn(g, n_experts, d, scale=0.1),
    }


class _Counting(nn.Module):
    """Wraps an expert and counts the token rows it is called on."""

    def __init__(self, expert: nn.Module):
        super().__init__()
        self.inner = expert
        self.rows = 0

    @property
    def fc1(self):
        return self.inner.fc1

    @property
    def fc2(self):
        return self.inner.fc2

    def forward(self, x):
        self.rows += x.reshape(-1, x.shape[-1]).shape[0]
        return self.inner(x)


def _call_moe(impl, inputs):
    i = inputs
    module = impl(i["d_model"], i["d_hidden"], i["n_experts"], i["k"],
                  w_importance=i["w_importance"], w_load=i["w_load"])
    for name in ("w_gate", "w_noise"):
        p = getattr(module, name, None)
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != tuple(i[name].shape):
            raise AttributeError(f"MoE must keep its gate matrix self.{name} of shape "
                                 f"(d_model, n_experts) = {tuple(i[name].shape)}, as in the given __init__")
        p.copy_(i[name])
    experts = getattr(module, "experts", None)
    if not isinstance(experts, nn.ModuleList) or len(experts) != i["n_experts"]:
        raise AttributeError("MoE must keep its experts in self.experts, an nn.ModuleList of "
                             f"{i['n_experts']} Expert modules, as in the given __init__")
    for e, expert in enumerate(experts):
        for layer in ("fc1", "fc2"):
            lin = getattr(expert, layer, None)
            if lin is None:
                raise AttributeError(f"each expert needs the linear layers .fc1 and .fc2 of the given Expert class")
            lin.weight.copy_(i[f"{layer}_weight"][e])
            lin.bias.copy_(i[f"{layer}_bias"][e])
    counters = [_Counting(e) for e in experts]
    module.experts = nn.ModuleList(counters)
    result = module(i["x"], noise=i["noise"])
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise TypeError("MoE.forward must return the pair (output, balancing_loss)")
    y, aux = result
    return y, one_number(aux, "the balancing loss"), torch.tensor([c.rows for c in counters], dtype=torch.float32)


MOE = Task(
    "MoE",
    cases=(
        Case("12 tokens, d_model=8, d_hidden=16, 4 experts, k=2, with noise",
             lambda g: _moe_inputs(g, 12, 8, 16, 4, 2)),
        Case("k = n_experts = 3: the dense softmax mixture",
             lambda g: _moe_inputs(g, 6, 8, 8, 3, 3)),
        Case("k=1, noise=None", lambda g: _moe_inputs(g, 10, 6, 12, 5, 1, noise=False), hidden=True),
        Case("one token, 4 experts, k=2", lambda g: _moe_inputs(g, 1, 8, 8, 4, 2), hidden=True),
        Case("2 tokens, 8 experts, k=1: most experts get no token",
             lambda g: _moe_inputs(g, 2, 8, 8, 8, 1), hidden=True),
        Case("64 tokens, d_model=16, 8 experts, k=2, w_importance=1, w_load=0.5",
             lambda g: _moe_inputs(g, 64, 16, 32, 8, 2, w_importance=1.0, w_load=0.5), hidden=True),
        Case("k = n_experts = 4, noise=None", lambda g: _moe_inputs(g, 9, 8, 8, 4, 4, noise=False), hidden=True),
    ),
    call=_call_moe,
    output_names=("output", "balancing_loss", "tokens_per_expert"),
    uses=("keep_top_k", "cv_squared", "importance_loss", "smooth_load"),
)


TASKS = TaskSet(CHAPTER, [KEEP_TOP_K, GATING, CV_SQUARED, IMPORTANCE, LOAD, MOE])
