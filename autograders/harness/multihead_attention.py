"""Tasks of chapter 02, multi-head attention: inputs, calls and rules (what the grading sandbox sees).

Conventions (stated in the notebook too): sequences are batches ``(B, T, d_model)``; heads live on a
new axis 1, ``(B, h, T, d_head)``, and head ``k`` owns the consecutive features
``k * d_head ... (k + 1) * d_head - 1`` (the layout of ``nn.MultiheadAttention``); a boolean mask is
True where a query MAY attend to a key, and a key mask ``(B, T)`` is True where the key is a real
token (the opposite of PyTorch's ``key_padding_mask``).
"""

from __future__ import annotations

import torch
from torch import nn

from autograders.engine.core import Case, Task, TaskSet, randn

CHAPTER = "02_multihead_attention"


# ---------------------------------------------------------------------------------------------
# 1-2. splitting a (B, T, d_model) tensor into heads and merging them back

def _split_inputs(B, T, d, h):
    return lambda g: {"x": randn(g, B, T, d), "num_heads": h}


SPLIT = Task(
    "split_heads",
    cases=(
        Case("B=2, T=3, d_model=8, 2 heads", _split_inputs(2, 3, 8, 2)),
        Case("B=1, T=5, d_model=12, 3 heads", _split_inputs(1, 5, 12, 3)),
        Case("one head (d_head = d_model)", _split_inputs(2, 4, 6, 1), hidden=True),
        Case("d_head = 1 (as many heads as features)", _split_inputs(3, 2, 4, 4), hidden=True),
        Case("T equal to the number of heads", _split_inputs(2, 4, 16, 4), hidden=True),
        Case("B=4, T=1, d_model=32, 8 heads", _split_inputs(4, 1, 32, 8), hidden=True),
    ),
)


def _merge_inputs(B, h, T, dh):
    return lambda g: {"x": randn(g, B, h, T, dh)}


MERGE = Task(
    "merge_heads",
    cases=(
        Case("B=2, 2 heads, T=3, d_head=4", _merge_inputs(2, 2, 3, 4)),
        Case("B=1, 3 heads, T=5, d_head=2", _merge_inputs(1, 3, 5, 2)),
        Case("one head", _merge_inputs(2, 1, 4, 6), hidden=True),
        Case("d_head = 1", _merge_inputs(3, 4, 2, 1), hidden=True),
        Case("T equal to the number of heads", _merge_inputs(2, 4, 4, 4), hidden=True),
        Case("B=4, 8 heads, T=1, d_head=4", _merge_inputs(4, 8, 1, 4), hidden=True),
    ),
)


# ---------------------------------------------------------------------------------------------
# 3. MultiHeadAttention, against nn.MultiheadAttention with copied weights

PROJECTIONS = ("W_q", "W_k", "W_v", "W_o")


def _mha_inputs(B, T, d, h, mask=None, lengths=None, scale=1.0, window=1):
    def make(g):
        inputs = {"x": randn(g, B, T, d, scale=scale), "d_model": d, "num_heads": h,
                  "mask": None, "key_mask": None}
        for name in PROJECTIONS:  # nn.Linear layout: weight (out_features, in_features), bias (out,)
            inputs[name] = randn(g, d, d, scale=d ** -0.5)
            inputs[name + "_bias"] = randn(g, d, scale=0.5)
        i = torch.arange(T)
        if mask == "causal":
            inputs["mask"] = i[:, None] >= i[None, :]
        elif mask == "window":
            inputs["mask"] = (i[:, None] - i[None, :]).abs() <= window
        elif mask == "random":
            m = torch.rand(B, T, T, generator=g) < 0.5
            m[:, :, 0] = True  # key 0 is never padded: no query has every key masked
            inputs["mask"] = m
        if lengths is not None:
            inputs["key_mask"] = i[None, :] < torch.tensor(lengths)[:, None]
        return inputs
    return make


def _call_mha(impl, inputs):
    module = impl(inputs["d_model"], inputs["num_heads"])
    for name in PROJECTIONS:
        layer = getattr(module, name, None)
        if not isinstance(layer, nn.Linear) or layer.bias is None:
            raise AttributeError(f"MultiHeadAttention must keep {name} as an nn.Linear(d_model, d_model) "
                                 f"with a bias (self.{name}), as in the given __init__")
        layer.weight.copy_(inputs[name])
        layer.bias.copy_(inputs[name + "_bias"])
    module.eval()
    return module(inputs["x"], mask=inputs["mask"], key_mask=inputs["key_mask"])


MHA = Task(
    "MultiHeadAttention",
    cases=(
        Case("B=2, T=5, d_model=8, 2 heads, no mask", _mha_inputs(2, 5, 8, 2)),
        Case("B=2, T=6, d_model=12, 3 heads, padded keys", _mha_inputs(2, 6, 12, 3, lengths=[6, 4])),
        Case("B=1, T=4, d_model=8, 2 heads, causal mask", _mha_inputs(1, 4, 8, 2, mask="causal")),
        Case("one head", _mha_inputs(2, 4, 6, 1), hidden=True),
        Case("d_head = 1 (4 heads, d_model=4)", _mha_inputs(2, 3, 4, 4), hidden=True),
        Case("causal mask and padded keys", _mha_inputs(3, 7, 16, 4, mask="causal", lengths=[7, 2, 5]),
             hidden=True),
        Case("a different mask per sequence (B, T, T)", _mha_inputs(2, 6, 8, 2, mask="random"), hidden=True),
        Case("window mask, large inputs", _mha_inputs(2, 9, 16, 4, mask="window", scale=4.0), hidden=True),
        Case("T=1", _mha_inputs(3, 1, 8, 2, lengths=[1, 1, 1]), hidden=True),
    ),
    call=_call_mha,
    output_names=("output", "weights"),
    uses=("split_heads", "merge_heads"),
)


# ---------------------------------------------------------------------------------------------
# 4. sinusoidal positional encoding ("Attention Is All You Need", section 3.5)

def _pe_inputs(T, d):
    return lambda g: {"T": T, "d_model": d}


SINUSOID_CHECK = Task(
    "sinusoidal_encoding",
    cases=(
        Case("T=6, d_model=8", _pe_inputs(6, 8)),
        Case("T=50, d_model=16", _pe_inputs(50, 16)),
        Case("a single position", _pe_inputs(1, 4), hidden=True),
        Case("d_model=2 (one frequency)", _pe_inputs(10, 2), hidden=True),
        Case("d_model=6, not a power of two", _pe_inputs(12, 6), hidden=True),
        Case("T=256, d_model=128", _pe_inputs(256, 128), hidden=True),
    ),
)


# ---------------------------------------------------------------------------------------------
# 5-7. masks: window (CNN), causal (unidirectional RNN), graph adjacency (GNN)

def _boolean(impl, inputs):
    mask = impl(**inputs)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"a mask must be a boolean tensor (dtype torch.bool), got {kind}: "
                        f"compare with <=, >=, == or use .bool()")
    return mask


def _window_inputs(T, w):
    return lambda g: {"T": T, "w": w}


WINDOW = Task(
    "window_mask",
    cases=(
        Case("T=6, w=1 (kernel size 3)", _window_inputs(6, 1)),
        Case("T=8, w=2", _window_inputs(8, 2)),
        Case("w=0: every query sees only itself", _window_inputs(5, 0), hidden=True),
        Case("w larger than the sequence", _window_inputs(4, 10), hidden=True),
        Case("T=1", _window_inputs(1, 3), hidden=True),
        Case("T=20, w=3", _window_inputs(20, 3), hidden=True),
    ),
    call=_boolean,
)


CAUSAL = Task(
    "causal_mask",
    cases=(
        Case("T=4", lambda g: {"T": 4}),
        Case("T=7", lambda g: {"T": 7}),
        Case("T=1", lambda g: {"T": 1}, hidden=True),
        Case("T=2", lambda g: {"T": 2}, hidden=True),
        Case("T=33", lambda g: {"T": 33}, hidden=True),
    ),
    call=_boolean,
)


def _graph_inputs(edges, n):
    return lambda g: {"edges": torch.tensor(edges, dtype=torch.long).reshape(-1, 2), "num_nodes": n}


def _random_graph(n, p):
    def make(g):
        pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
        keep = torch.rand(len(pairs), generator=g) < p
        edges = [pair if torch.rand(1, generator=g).item() < 0.5 else pair[::-1]
                 for pair, k in zip(pairs, keep.tolist()) if k]
        return {"edges": torch.tensor(edges, dtype=torch.long).reshape(-1, 2), "num_nodes": n}
    return make


GRAPH = Task(
    "graph_mask",
    cases=(
        Case("a path 0-1-2-3", _graph_inputs([[0, 1], [1, 2], [2, 3]], 4)),
        Case("a star around node 2, edges in both orders", _graph_inputs([[2, 0], [1, 2], [2, 3], [4, 2]], 5)),
        Case("a node without edges", _graph_inputs([[0, 1], [1, 2]], 4), hidden=True),
        Case("no edges at all", _graph_inputs([], 3), hidden=True),
        Case("an edge listed twice and a self loop", _graph_inputs([[0, 1], [1, 0], [2, 2], [1, 2]], 3),
             hidden=True),
        Case("a random graph on 12 nodes", _random_graph(12, 0.3), hidden=True),
    ),
    call=_boolean,
)


# ---------------------------------------------------------------------------------------------
# 8. the footprint of a stack of masked layers (no residual connections)

def _footprint_inputs(kind, T, layers, w=1, p=0.3):
    def make(g):
        i = torch.arange(T)
        if kind == "window":
            mask = (i[:, None] - i[None, :]).abs() <= w
        elif kind == "causal":
            mask = i[None, :] <= i[:, None]
        elif kind == "previous only":  # strictly earlier keys: no self loops
            mask = i[None, :] < i[:, None]
        elif kind == "shift":  # each query sees only the key just before it
            mask = i[None, :] == i[:, None] - 1
        elif kind == "random":
            mask = torch.rand(T, T, generator=g) < p
        elif kind == "two groups":  # the first half may attend to the second, not the other way round
            mask = torch.rand(T, T, generator=g) < p
            mask[T // 2:, : T // 2] = False
        elif kind == "random with self loops":
            mask = (torch.rand(T, T, generator=g) < p) | torch.eye(T, dtype=torch.bool)
        else:
            raise ValueError(kind)
        return {"mask": mask, "layers": layers}
    return make


def _call_footprint(impl, inputs):
    footprint = impl(inputs["mask"].clone(), inputs["layers"])
    if not isinstance(footprint, torch.Tensor) or footprint.dtype != torch.bool:
        kind = footprint.dtype if isinstance(footprint, torch.Tensor) else type(footprint).__name__
        raise TypeError(f"stacked_footprint must return a boolean tensor (dtype torch.bool), got {kind}")
    return footprint


FOOTPRINT = Task(
    "stacked_footprint",
    cases=(
        Case("window w=1, T=8, 2 layers", _footprint_inputs("window", 8, 2)),
        Case("causal, T=6, 3 layers", _footprint_inputs("causal", 6, 3)),
        Case("each query sees only the key before it, T=7, 3 layers", _footprint_inputs("shift", 7, 3)),
        Case("one layer", _footprint_inputs("window", 5, 1, w=2), hidden=True),
        Case("strictly earlier keys (no self loops), T=6, 3 layers", _footprint_inputs("previous only", 6, 3),
             hidden=True),
        Case("a random mask with self loops, T=7, 2 layers", _footprint_inputs("random with self loops", 7, 2),
             hidden=True),
        Case("a random mask without self loops, T=9, 3 layers", _footprint_inputs("random", 9, 3, p=0.25),
             hidden=True),
        Case("T=40, 200 layers (path counts overflow float32 and int64)",
             _footprint_inputs("two groups", 40, 200, p=0.5), hidden=True),
    ),
    call=_call_footprint,
)


TASKS = TaskSet(CHAPTER, [SPLIT, MERGE, MHA, SINUSOID_CHECK, WINDOW, CAUSAL, GRAPH, FOOTPRINT])
