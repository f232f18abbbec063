"""Checks for chapter 02, multi-head attention, positions, and attention vs CNN / RNN / GNN.

Conventions (stated in the notebook too): sequences are batches ``(B, T, d_model)``; heads live on a
new axis 1, ``(B, h, T, d_head)``, and head ``k`` owns the consecutive features
``k * d_head ... (k + 1) * d_head - 1`` (the layout of ``nn.MultiheadAttention``); a boolean mask is
True where a query MAY attend to a key, and a key mask ``(B, T)`` is True where the key is a real
token (the opposite of PyTorch's ``key_padding_mask``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from autograders.engine.core import EXACT, Check, CheckSet, Mistake, Tolerance
from autograders.harness import multihead_attention as H

CHAPTER = H.CHAPTER

RESHAPE = Tolerance(0.0, 0.0, "splitting and merging heads only moves numbers: they must be equal")
FP32_MODULE = Tolerance(1e-4, 1e-4, "float32, compared with nn.MultiheadAttention whose fused kernels "
                                    "order the sums differently; large-input cases make the softmax sharp")
SINUSOID = Tolerance(1e-4, 0.0, "the reference is computed in float64; a float32 angle pos * frequency "
                                "carries a relative error of ~6e-8, so up to ~2e-5 absolute for positions "
                                "up to 256")


# ---------------------------------------------------------------------------------------------
# 1-2. splitting a (B, T, d_model) tensor into heads and merging them back

def _split_ref(inputs):
    x, h = inputs["x"], inputs["num_heads"]
    B, T, d = x.shape
    return x.reshape(B, T, h, d // h).permute(0, 2, 1, 3)


def _split_no_transpose(x, num_heads):
    B, T, d = x.shape
    return x.reshape(B, num_heads, T, d // num_heads)


def _split_interleaved(x, num_heads):
    B, T, d = x.shape
    return x.reshape(B, T, d // num_heads, num_heads).permute(0, 3, 1, 2)


def _split_heads_last(x, num_heads):
    B, T, d = x.shape
    return x.reshape(B, T, num_heads, d // num_heads)


SPLIT = Check(
    H.SPLIT,
    reference=_split_ref,
    tolerance=RESHAPE,
    mistakes=(
        Mistake("reshape to (B, h, T, d_head) directly", _split_no_transpose,
                "reshaping (B, T, d_model) straight to (B, h, T, d_head) mixes features of different "
                "positions into one row: reshape to (B, T, h, d_head) first, then swap axes 1 and 2."),
        Mistake("interleaved features", _split_interleaved,
                "your heads take every h-th feature; head k must own the consecutive features "
                "k*d_head ... (k+1)*d_head - 1 (the layout nn.MultiheadAttention uses)."),
        Mistake("heads not moved to axis 1", _split_heads_last,
                "the result has shape (B, T, h, d_head): move the head axis in front of the positions, "
                "(B, h, T, d_head), so that attention runs over T for each head."),
    ),
)


def _merge_ref(inputs):
    x = inputs["x"]
    B, h, T, dh = x.shape
    return torch.cat([x[:, k] for k in range(h)], dim=-1)  # head k -> features k*dh ... (k+1)*dh-1


def _merge_no_transpose(x):
    B, h, T, dh = x.shape
    return x.reshape(B, T, h * dh)


def _merge_interleaved(x):
    B, h, T, dh = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, T, h * dh)


def _merge_mean(x):
    return x.mean(dim=1)


MERGE = Check(
    H.MERGE,
    reference=_merge_ref,
    tolerance=RESHAPE,
    mistakes=(
        Mistake("reshape without moving the heads back", _merge_no_transpose,
                "reshaping (B, h, T, d_head) straight to (B, T, h*d_head) mixes positions: swap axes 1 "
                "and 2 first (then .reshape, since the result of transpose is not contiguous)."),
        Mistake("interleaved features", _merge_interleaved,
                "your merged features interleave the heads; head k's outputs must land on the "
                "consecutive features k*d_head ... (k+1)*d_head - 1 (concatenate the heads)."),
        Mistake("averaged heads", _merge_mean,
                "you averaged the heads; they are concatenated, giving h*d_head features."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 3. MultiHeadAttention, against nn.MultiheadAttention with copied weights

PROJECTIONS = H.PROJECTIONS


def _describe_mha(inputs):
    x = inputs["x"]
    text = f"x: {tuple(x.shape)}, d_model={inputs['d_model']}, num_heads={inputs['num_heads']}"
    if inputs["mask"] is not None:
        text += f", mask: {tuple(inputs['mask'].shape)}"
    if inputs["key_mask"] is not None:
        text += f", key_mask with lengths {inputs['key_mask'].sum(1).tolist()}"
    return text


def _mha_ref(inputs):
    d, h = inputs["d_model"], inputs["num_heads"]
    mha = nn.MultiheadAttention(d, h, batch_first=True)
    mha.in_proj_weight.copy_(torch.cat([inputs["W_q"], inputs["W_k"], inputs["W_v"]]))
    mha.in_proj_bias.copy_(torch.cat([inputs["W_q_bias"], inputs["W_k_bias"], inputs["W_v_bias"]]))
    mha.out_proj.weight.copy_(inputs["W_o"])
    mha.out_proj.bias.copy_(inputs["W_o_bias"])
    mha.eval()
    mask, key_mask = inputs["mask"], inputs["key_mask"]
    attn_mask = None
    if mask is not None:  # PyTorch: True means "may NOT attend"; a per-sequence mask is (B * h, T, T)
        attn_mask = ~mask if mask.dim() == 2 else (~mask).repeat_interleave(h, dim=0)
    padding = None if key_mask is None else ~key_mask
    x = inputs["x"]
    return mha(x, x, x, attn_mask=attn_mask, key_padding_mask=padding, need_weights=True,
               average_attn_weights=False)


class _MHABase(nn.Module):
    """A correct multi-head attention with switches for the classic mistakes."""

    scale_by = "d_head"
    out_proj = True
    layout = "blocks"
    key_mask_sense = "valid"
    mask_sense = "allowed"
    weights_average = False

    def __init__(self, d_model, num_heads):
        super().__init__()
        self.d_model, self.num_heads, self.d_head = d_model, num_heads, d_model // num_heads
        for name in PROJECTIONS:
            setattr(self, name, nn.Linear(d_model, d_model))

    def split(self, x):
        B, T, d = x.shape
        if self.layout == "interleaved":
            return _split_interleaved(x, self.num_heads)
        if self.layout == "no transpose":
            return _split_no_transpose(x, self.num_heads)
        return x.reshape(B, T, self.num_heads, self.d_head).transpose(1, 2)

    def merge(self, x):
        if self.layout == "interleaved":
            return _merge_interleaved(x)
        if self.layout == "no transpose":
            B, h, T, dh = x.shape
            return x.reshape(B, T, h * dh)
        return _merge_ref({"x": x})

    def forward(self, x, mask=None, key_mask=None):
        q, k, v = self.split(self.W_q(x)), self.split(self.W_k(x)), self.split(self.W_v(x))
        size = self.d_head if self.scale_by == "d_head" else self.d_model
        scores = q @ k.transpose(-2, -1) / math.sqrt(size)
        allowed = torch.ones(scores.shape, dtype=torch.bool)
        if mask is not None:
            m = mask if self.mask_sense == "allowed" else ~mask
            allowed = allowed & (m if m.dim() == 2 else m[:, None])
        if key_mask is not None and self.key_mask_sense != "ignored":
            km = key_mask if self.key_mask_sense == "valid" else ~key_mask
            allowed = allowed & km[:, None, None, :]
        weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out = self.merge(weights @ v)
        return (self.W_o(out) if self.out_proj else out), weights


def _mha_variant(**switches):
    return type("WrongMHA", (_MHABase,), switches)


def _given_split(x, num_heads):
    """split_heads as MultiHeadAttention gets it while it is checked."""
    return _split_ref({"x": x, "num_heads": num_heads})


def _given_merge(x):
    """merge_heads as MultiHeadAttention gets it while it is checked."""
    return _merge_ref({"x": x})


MHA = Check(
    H.MHA,
    reference=_mha_ref,
    tolerance=FP32_MODULE,
    describe_inputs=_describe_mha,
    mistakes=(
        Mistake("scaled by sqrt(d_model)", _mha_variant(scale_by="d_model"),
                "the scores are divided by sqrt(d_model); each head's queries and keys have d_head "
                "features, so divide by sqrt(d_head)."),
        Mistake("no output projection", _mha_variant(out_proj=False),
                "the output matches the merged heads without the output projection W_o."),
        Mistake("interleaved heads", _mha_variant(layout="interleaved"),
                "your heads take every h-th feature; head k owns the consecutive features "
                "k*d_head ... (k+1)*d_head - 1 (use your split_heads and merge_heads)."),
        Mistake("reshape without transpose", _mha_variant(layout="no transpose"),
                "the heads were split by a plain reshape to (B, h, T, d_head), which mixes positions: "
                "reshape to (B, T, h, d_head) and swap axes 1 and 2 (your split_heads)."),
        Mistake("key mask in PyTorch's sense", _mha_variant(key_mask_sense="padding"),
                "key_mask is True for REAL tokens (keys that may be attended to) -- the opposite of "
                "PyTorch's key_padding_mask: mask out the keys where it is False."),
        Mistake("key mask ignored", _mha_variant(key_mask_sense="ignored"),
                "the result matches attention that ignores key_mask: padded keys (key_mask False) must "
                "get weight 0."),
        Mistake("mask inverted", _mha_variant(mask_sense="blocked"),
                "mask is True where a query MAY attend: fill the scores where it is False with -inf."),
    ),
    given={"split_heads": _given_split, "merge_heads": _given_merge},
)


# ---------------------------------------------------------------------------------------------
# 4. sinusoidal positional encoding ("Attention Is All You Need", section 3.5)

def _sinusoid_ref(inputs):
    T, d = inputs["T"], inputs["d_model"]
    pos = np.arange(T, dtype=np.float64)[:, None]
    i = np.arange(d // 2, dtype=np.float64)[None, :]
    angle = pos / np.power(10000.0, 2.0 * i / d)
    table = np.empty((T, d))
    table[:, 0::2] = np.sin(angle)  # PE(pos, 2i)   = sin(pos / 10000^(2i/d))
    table[:, 1::2] = np.cos(angle)  # PE(pos, 2i+1) = cos(pos / 10000^(2i/d))
    return torch.from_numpy(table.astype(np.float32))


def _sinusoid_generic(T, d_model, *, layout="pairs", swap=False, exponent="2i", start=0, invert=False):
    pos = torch.arange(start, start + T, dtype=torch.float64)[:, None]
    i = torch.arange(d_model // 2, dtype=torch.float64)[None, :]
    power = 2 * i if exponent == "2i" else i
    freq = torch.pow(10000.0, power / d_model)
    angle = pos * freq if invert else pos / freq
    first, second = (torch.cos(angle), torch.sin(angle)) if swap else (torch.sin(angle), torch.cos(angle))
    if layout == "halves":
        return torch.cat([first, second], dim=-1).float()
    table = torch.empty(T, d_model, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = first, second
    return table.float()


SINUSOID_CHECK = Check(
    H.SINUSOID_CHECK,
    reference=_sinusoid_ref,
    tolerance=SINUSOID,
    mistakes=(
        Mistake("sin and cos in two halves", lambda T, d_model: _sinusoid_generic(T, d_model, layout="halves"),
                "you put all sines in the first half and all cosines in the second; the paper's formula "
                "interleaves them: sine in even feature 2i, cosine in odd feature 2i+1."),
        Mistake("sin and cos swapped", lambda T, d_model: _sinusoid_generic(T, d_model, swap=True),
                "sine and cosine are swapped: even features 2i hold sin, odd features 2i+1 hold cos."),
        Mistake("exponent uses the pair index, not 2i",
                lambda T, d_model: _sinusoid_generic(T, d_model, exponent="i"),
                "the frequency of pair i is 1 / 10000^(2i / d_model): the exponent is 2i/d_model "
                "(the even feature's index over d_model), not i/d_model."),
        Mistake("positions counted from 1", lambda T, d_model: _sinusoid_generic(T, d_model, start=1),
                "positions start at 0: row 0 is sin(0)=0, cos(0)=1."),
        Mistake("multiplied by 10000^(2i/d)", lambda T, d_model: _sinusoid_generic(T, d_model, invert=True),
                "the angle is pos / 10000^(2i/d_model) (slower and slower waves), not pos * 10000^(2i/d_model)."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 5-7. masks: window (CNN), causal (unidirectional RNN), graph adjacency (GNN)


def _grid(T):
    i = torch.arange(T)
    return i[:, None], i[None, :]  # query index (rows), key index (columns)


def _window_ref(inputs):
    q, k = _grid(inputs["T"])
    return (q - k).abs() <= inputs["w"]


WINDOW = Check(
    H.WINDOW,
    reference=_window_ref,
    tolerance=EXACT,
    mistakes=(
        Mistake("strict inequality", lambda T, w: (_grid(T)[0] - _grid(T)[1]).abs() < w,
                "your window is one too narrow: keys with |i - j| <= w are inside (w=1 means the "
                "neighbours on each side and the query itself)."),
        Mistake("one-sided window", lambda T, w: ((_grid(T)[0] - _grid(T)[1]) >= 0)
                & ((_grid(T)[0] - _grid(T)[1]) <= w),
                "your window only looks back; it is centred on the query: w keys on each side."),
        Mistake("w used as the kernel size", lambda T, w: (_grid(T)[0] - _grid(T)[1]).abs() <= w // 2,
                "w is the half-width (|i - j| <= w, i.e. 2w + 1 keys), not the kernel size."),
        Mistake("query itself excluded", lambda T, w: ((_grid(T)[0] - _grid(T)[1]).abs() <= w)
                & (_grid(T)[0] != _grid(T)[1]),
                "the query's own position (i == j) belongs to its window."),
    ),
)


def _causal_ref(inputs):
    T = inputs["T"]
    return torch.ones(T, T, dtype=torch.bool).tril()


CAUSAL = Check(
    H.CAUSAL,
    reference=_causal_ref,
    tolerance=EXACT,
    mistakes=(
        Mistake("upper triangle", lambda T: torch.ones(T, T, dtype=torch.bool).triu(),
                "your mask lets each query see the FUTURE: row i (the query) may attend to columns "
                "j <= i, the lower triangle."),
        Mistake("diagonal excluded", lambda T: torch.ones(T, T, dtype=torch.bool).tril(-1),
                "a query may attend to its own position (j == i); without it the first query sees nothing."),
        Mistake("everything allowed", lambda T: torch.ones(T, T, dtype=torch.bool),
                "your mask allows every key; query i may only attend to keys j <= i."),
    ),
)


def _graph_ref(inputs):
    edges, n = inputs["edges"], inputs["num_nodes"]
    adjacency = torch.eye(n, dtype=torch.bool)  # self loops: every node attends to itself
    for a, b in edges.tolist():
        adjacency[a, b] = True
        adjacency[b, a] = True  # undirected: an edge is used in both directions
    return adjacency


def _graph_no_self_loops(edges, num_nodes):
    adjacency = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    adjacency[edges[:, 0], edges[:, 1]] = True
    adjacency[edges[:, 1], edges[:, 0]] = True
    return adjacency


def _graph_directed(edges, num_nodes):
    adjacency = torch.eye(num_nodes, dtype=torch.bool)
    adjacency[edges[:, 0], edges[:, 1]] = True
    return adjacency


def _graph_reversed_only(edges, num_nodes):
    adjacency = torch.eye(num_nodes, dtype=torch.bool)
    adjacency[edges[:, 1], edges[:, 0]] = True
    return adjacency


GRAPH = Check(
    H.GRAPH,
    reference=_graph_ref,
    tolerance=EXACT,
    mistakes=(
        Mistake("no self loops", _graph_no_self_loops,
                "every node must also attend to itself (add self loops, the diagonal); a node without "
                "edges would otherwise have no key at all and its softmax would be 0/0."),
        Mistake("one direction only", _graph_directed,
                "the graph is undirected: an edge (a, b) lets a attend to b AND b attend to a."),
        Mistake("reversed direction only", _graph_reversed_only,
                "the graph is undirected: an edge (a, b) lets a attend to b AND b attend to a."),
    ),
    describe_inputs=lambda inputs: f"num_nodes={inputs['num_nodes']}, edges={inputs['edges'].tolist()}",
)


# ---------------------------------------------------------------------------------------------
# 8. the footprint of a stack of masked layers: reachability in exactly `layers` steps


def _footprint_ref(inputs):
    mask, layers = inputs["mask"], inputs["layers"]
    reach = mask.clone()
    for _ in range(layers - 1):  # output i of layer l+1 reads output k of layer l where mask[i, k]
        reach = torch.stack([(mask[i][:, None] & reach).any(dim=0) for i in range(mask.shape[0])])
    return reach


def _footprint_power(mask, layers, *, extra=0, transpose=False, union=False, dtype=torch.float32):
    m = (mask.T if transpose else mask).to(dtype)
    total = torch.zeros_like(m)
    reach = m.clone()
    for step in range(1, layers + extra):
        if union:
            total = total + reach
        reach = reach @ m
    return ((total + reach) if union else reach) > 0 if layers + extra >= 1 else torch.eye(len(m)) > 0


STACKED = Check(
    H.FOOTPRINT,
    reference=_footprint_ref,
    tolerance=EXACT,
    mistakes=(
        Mistake("one layer too few", lambda mask, layers: _footprint_power(mask, layers, extra=-1,
                                                                          dtype=torch.float64),
                "your footprint is that of one layer fewer: `layers` masks are composed (layers - 1 products "
                "of the mask with itself)."),
        Mistake("union of powers", lambda mask, layers: _footprint_power(mask, layers, union=True,
                                                                        dtype=torch.float64),
                "your footprint allows chains of 1 to `layers` steps: that is a stack WITH residual "
                "connections. Without them every path takes exactly `layers` steps -- which differs when "
                "a position may not attend to itself."),
        Mistake("transposed", lambda mask, layers: _footprint_power(mask, layers, transpose=True,
                                                                   dtype=torch.float64),
                "your footprint is transposed: row i is output i, column j input j; output i reads the "
                "positions k with mask[i, k], and each of those reads the j with mask[k, j]."),
        Mistake("element-wise power", lambda mask, layers: mask.clone(),
                "your footprint is the mask itself (an element-wise power or AND of the mask with itself): "
                "stacking composes the masks, a boolean MATRIX product."),
        Mistake("float32 path counts", lambda mask, layers: _footprint_power(mask, layers),
                "counting paths in float32 overflows to inf after a few dozen layers, and inf * 0 = NaN in "
                "the next product: turn the result back into booleans (> 0) after every product."),
    ),
    describe_inputs=lambda inputs: f"mask: {tuple(inputs['mask'].shape)} with {int(inputs['mask'].sum())} True, "
                                   f"layers={inputs['layers']}",
)


CHECKS = CheckSet(CHAPTER, [SPLIT, MERGE, MHA, SINUSOID_CHECK, WINDOW, CAUSAL, GRAPH, STACKED])
check = CHECKS.check
