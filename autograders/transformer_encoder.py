"""Checks for chapter 03, the Transformer encoder.

Conventions (stated in the notebook too): a batch of sequences is a ``(B, T, d_model)`` tensor
(batch first); layer norm normalises over the last axis; masks are True where a query may attend, as in
every chapter: the key mask has shape ``(B, T)`` and is True at real tokens, False at padding. PyTorch's
``src_key_padding_mask`` is the opposite (True at padding): the references get ``~key_mask``.

The encoder block and the stack are compared with ``nn.TransformerEncoderLayer`` (post-norm, ReLU,
no dropout) and ``nn.TransformerEncoder``, in eval mode, with the same weights copied into both.
Weights are copied by name, as the notebook states:

    block.self_attn           <- layer.self_attn   (in_proj_weight/bias, out_proj.weight/bias)
    block.ffn.linear1         <- layer.linear1
    block.ffn.linear2         <- layer.linear2
    block.norm1.weight/.bias  <- layer.norm1.weight/.bias
    block.norm2.weight/.bias  <- layer.norm2.weight/.bias

In eval mode under ``no_grad`` PyTorch takes a fused "fast path" (for an even number of heads).
For one layer it computes exactly the same function, padding positions included. The stack's
nested-tensor fast path instead writes zeros at padding positions (and warns), so the reference stack
is built with ``enable_nested_tensor=False``: every position is then compared, padded ones too (they
are computed like any other position; they are only hidden as keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autograders.engine.core import Check, CheckSet, Mistake, Tolerance
from autograders.harness import transformer_encoder as H

CHAPTER = H.CHAPTER

EPS = H.EPS

LN_TOL = Tolerance(2e-4, 1e-4, "float32; with inputs offset by 300 the inputs themselves are rounded to "
                               "~2e-5 before dividing by a std of ~1 and scaling by weights up to ~2.5; F.layer_norm "
                               "sums in another order")
FFN_TOL = Tolerance(1e-5, 1e-4, "float32 sums of a few dozen products; another correct order of operations "
                                "differs by ~1e-6")
BLOCK_TOL = Tolerance(1e-4, 1e-4, "float32, compared with PyTorch's fused fast path, which orders the sums "
                                  "differently; the two layer norms divide by stds near 1")
STACK_TOL = Tolerance(3e-4, 3e-4, "float32 through up to 4 blocks, compared with PyTorch's fused kernels; "
                                  "rounding differences of ~1e-5 per block grow a little with depth")


# ---------------------------------------------------------------------------------------------
# 1. layer norm


def _ln_ref(inputs):
    x = inputs["x"]
    return F.layer_norm(x, (x.shape[-1],), inputs["weight"], inputs["bias"], inputs["eps"])


def _ln_generic(x, weight, bias, eps, *, dim=-1, correction=0, eps_outside=False, affine=True,
                one_pass=False, use_eps=True):
    if one_pass:
        mean = x.mean(dim, keepdim=True)
        var = (x * x).mean(dim, keepdim=True) - mean * mean
    else:
        mean = x.mean(dim, keepdim=True)
        var = x.var(dim, keepdim=True, correction=correction)
    eps = eps if use_eps else 0.0
    y = (x - mean) / (var.sqrt() + eps) if eps_outside else (x - mean) / torch.sqrt(var + eps)
    return y * weight + bias if affine else y


def _ln_unbiased(x, weight, bias, eps=EPS):
    return _ln_generic(x, weight, bias, eps, correction=1)


def _ln_batch_axis(x, weight, bias, eps=EPS):
    return _ln_generic(x, weight, bias, eps, dim=0)


def _ln_eps_outside(x, weight, bias, eps=EPS):
    return _ln_generic(x, weight, bias, eps, eps_outside=True)


def _ln_no_affine(x, weight, bias, eps=EPS):
    return _ln_generic(x, weight, bias, eps, affine=False)


def _ln_one_pass(x, weight, bias, eps=EPS):
    return _ln_generic(x, weight, bias, eps, one_pass=True)


def _ln_no_eps(x, weight, bias, eps=EPS):
    return _ln_generic(x, weight, bias, eps, use_eps=False)


def _given_layer_norm(x, weight, bias, eps=EPS):
    """layer_norm as the encoder block and the stack get it while they are checked."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


LAYER_NORM = Check(
    H.LAYER_NORM,
    reference=_ln_ref,
    tolerance=LN_TOL,
    mistakes=(
        Mistake("normalised over the batch axis", _ln_batch_axis,
                "your result normalises over axis 0 (across the batch, as batch norm does): layer norm "
                "uses the mean and variance of each token's own d features, the last axis."),
        Mistake("unbiased variance", _ln_unbiased,
                "your result matches the unbiased variance (dividing by d - 1, torch.var's default): "
                "layer norm divides by d (correction=0 / unbiased=False)."),
        Mistake("eps outside the square root", _ln_eps_outside,
                "your result matches (x - mean) / (std + eps): eps goes inside the square root, "
                "(x - mean) / sqrt(var + eps)."),
        Mistake("no weight and bias", _ln_no_affine,
                "your result is normalised but not scaled and shifted: multiply by `weight` and add "
                "`bias` (per feature) at the end."),
        Mistake("one-pass variance", _ln_one_pass,
                "your result matches var = mean(x^2) - mean(x)^2, which loses all precision in float32 when "
                "the mean is large compared with the spread: use the mean of (x - mean)^2."),
        Mistake("no eps", _ln_no_eps,
                "your result matches dividing by sqrt(var) without eps: add eps inside the square root."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. the position-wise feed-forward network


def _ffn_ref(inputs):
    d, d_ff = inputs["d_model"], inputs["d_ff"]
    ref = nn.Sequential(nn.Linear(d, d_ff), nn.ReLU(), nn.Linear(d_ff, d))
    p = inputs["params"]
    ref.load_state_dict({"0.weight": p["linear1.weight"], "0.bias": p["linear1.bias"],
                         "2.weight": p["linear2.weight"], "2.bias": p["linear2.bias"]})
    return ref.eval()(inputs["x"])


class _FFNBase(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)


class _FFNNoActivation(_FFNBase):
    def forward(self, x):
        return self.linear2(self.linear1(x))


class _FFNReluAtEnd(_FFNBase):
    def forward(self, x):
        return torch.relu(self.linear2(torch.relu(self.linear1(x))))


class _FFNGelu(_FFNBase):
    def forward(self, x):
        return self.linear2(F.gelu(self.linear1(x)))


class _FFNWithResidual(_FFNBase):
    def forward(self, x):
        return x + self.linear2(torch.relu(self.linear1(x)))


FEED_FORWARD = Check(
    H.FEED_FORWARD,
    reference=_ffn_ref,
    tolerance=FFN_TOL,
    mistakes=(
        Mistake("no activation", _FFNNoActivation,
                "your result matches two linear layers with nothing between them, which is just one linear "
                "map: apply ReLU to the output of linear1."),
        Mistake("ReLU at the end too", _FFNReluAtEnd,
                "your result matches a ReLU after linear2 as well: only the hidden layer is activated, the "
                "output of linear2 can be negative."),
        Mistake("GELU", _FFNGelu,
                "your result matches GELU: the original Transformer (and activation='relu') uses ReLU."),
        Mistake("residual inside", _FFNWithResidual,
                "your result adds the input back: the residual connection belongs to the encoder block, "
                "not to FeedForward."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 3-4. the encoder block and the stack, against nn.TransformerEncoderLayer / nn.TransformerEncoder


def _describe_block(inputs):
    x, mask = inputs["x"], inputs["key_mask"]
    text = f"x: {tuple(x.shape)}, nhead={inputs['nhead']}, d_ff={inputs['d_ff']}"
    if "num_layers" in inputs:
        text += f", num_layers={inputs['num_layers']}"
    if mask is not None:
        text += f", key_mask: {tuple(mask.shape)} with lengths {mask.sum(1).tolist()}"
    return text


load_layer_weights = H.load_layer_weights


def _torch_layer(inputs):
    return nn.TransformerEncoderLayer(inputs["d_model"], inputs["nhead"], inputs["d_ff"], dropout=0.0,
                                      activation="relu", layer_norm_eps=EPS, batch_first=True,
                                      norm_first=False)


def _padding_of(key_mask):
    """The course's key mask (True = may attend) as PyTorch's key padding mask (True = padding)."""
    return None if key_mask is None else ~key_mask


def _block_ref(inputs):
    layer = _torch_layer(inputs)
    layer.load_state_dict(inputs["params"])
    layer.eval()
    return layer(inputs["x"], src_key_padding_mask=_padding_of(inputs["key_mask"]))


def _stack_ref(inputs):
    # enable_nested_tensor=False: the nested-tensor fast path would write zeros at padding positions.
    stack = nn.TransformerEncoder(_torch_layer(inputs), inputs["num_layers"], enable_nested_tensor=False)
    for layer, params in zip(stack.layers, inputs["layers"]):
        layer.load_state_dict(params)
    stack.eval()
    return stack(inputs["x"], src_key_padding_mask=_padding_of(inputs["key_mask"]))


# Correct pieces the mistakes below are built from (the attribute names of the notebook's interface).

class _LayerNorm(nn.Module):
    def __init__(self, d_model, eps=EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class _FeedForward(_FFNBase):
    def forward(self, x):
        return self.linear2(torch.relu(self.linear1(x)))


class _BlockBase(nn.Module):
    def __init__(self, d_model, nhead, d_ff):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0, batch_first=True)
        self.ffn = _FeedForward(d_model, d_ff)
        self.norm1 = _LayerNorm(d_model)
        self.norm2 = _LayerNorm(d_model)

    def attend(self, x, key_mask, convert=True):
        padding = _padding_of(key_mask) if convert else key_mask
        return self.self_attn(x, x, x, key_padding_mask=padding, need_weights=False)[0]


class _PreNorm(_BlockBase):
    def forward(self, x, key_mask=None):
        h = self.norm1(x)
        x = x + self.attend(h, key_mask)
        return x + self.ffn(self.norm2(x))


class _NoAttentionResidual(_BlockBase):
    def forward(self, x, key_mask=None):
        x = self.norm1(self.attend(x, key_mask))
        return self.norm2(x + self.ffn(x))


class _NoFFNResidual(_BlockBase):
    def forward(self, x, key_mask=None):
        x = self.norm1(x + self.attend(x, key_mask))
        return self.norm2(self.ffn(x))


class _NormBeforeAdding(_BlockBase):
    def forward(self, x, key_mask=None):
        x = x + self.norm1(self.attend(x, key_mask))
        return x + self.norm2(self.ffn(x))


class _InvertedPadding(_BlockBase):  # key_mask handed to PyTorch unconverted
    def forward(self, x, key_mask=None):
        x = self.norm1(x + self.attend(x, key_mask, convert=False))
        return self.norm2(x + self.ffn(x))


class _IgnoresPadding(_BlockBase):
    def forward(self, x, key_mask=None):
        x = self.norm1(x + self.attend(x, None))
        return self.norm2(x + self.ffn(x))


class _FFNBeforeAttention(_BlockBase):
    def forward(self, x, key_mask=None):
        x = self.norm1(x + self.ffn(x))
        return self.norm2(x + self.attend(x, key_mask))


_BLOCK_MISTAKES = (
    Mistake("pre-norm", _PreNorm,
            "your result matches a pre-norm block (x + attn(norm(x))): this exercise is the original "
            "post-norm block, x = norm1(x + attn(x)) and then x = norm2(x + ffn(x))."),
    Mistake("no residual around attention", _NoAttentionResidual,
            "your result matches norm1(attn(x)) without the residual: add the block's input back, "
            "norm1(x + attn(x))."),
    Mistake("no residual around the FFN", _NoFFNResidual,
            "your result matches norm2(ffn(x)) without the residual: norm2(x + ffn(x))."),
    Mistake("norm applied before adding", _NormBeforeAdding,
            "your result matches x + norm(sublayer(x)): normalise the SUM, norm(x + sublayer(x))."),
    Mistake("inverted padding mask", _InvertedPadding,
            "your result matches the key mask used the wrong way round: key_mask is True at REAL tokens (may "
            "attend), while nn.MultiheadAttention's key_padding_mask is True at padding -- pass "
            "attend_to_key_padding_mask(key_mask)."),
    Mistake("padding ignored", _IgnoresPadding,
            "your result matches attention that ignores key_mask: pass attend_to_key_padding_mask(key_mask) "
            "to self.self_attn as key_padding_mask, so that no position attends to padding."),
    Mistake("FFN before attention", _FFNBeforeAttention,
            "your result matches the feed-forward sublayer applied first: attention comes first, then the "
            "feed-forward network."),
)

ENCODER_BLOCK = Check(
    H.ENCODER_BLOCK,
    reference=_block_ref,
    tolerance=BLOCK_TOL,
    mistakes=_BLOCK_MISTAKES,
    describe_inputs=_describe_block,
    given={"layer_norm": _given_layer_norm},
)


# Wrong stacks, built from a correct block.

class _Block(_BlockBase):
    def forward(self, x, key_mask=None):
        x = self.norm1(x + self.attend(x, key_mask))
        return self.norm2(x + self.ffn(x))


class _StackBase(nn.Module):
    def __init__(self, d_model, nhead, d_ff, num_layers):
        super().__init__()
        self.layers = nn.ModuleList([_Block(d_model, nhead, d_ff) for _ in range(num_layers)])


class _NotChained(_StackBase):
    def forward(self, x, key_mask=None):
        out = x
        for layer in self.layers:
            out = layer(x, key_mask)
        return out


class _FirstLayerOnly(_StackBase):
    def forward(self, x, key_mask=None):
        for _ in self.layers:
            x = self.layers[0](x, key_mask)
        return x


class _MaskOnlyFirst(_StackBase):
    def forward(self, x, key_mask=None):
        for i, layer in enumerate(self.layers):
            x = layer(x, key_mask if i == 0 else None)
        return x


class _OuterResidual(_StackBase):
    def forward(self, x, key_mask=None):
        out = x
        for layer in self.layers:
            out = layer(out, key_mask)
        return x + out


TRANSFORMER_ENCODER = Check(
    H.TRANSFORMER_ENCODER,
    reference=_stack_ref,
    tolerance=STACK_TOL,
    mistakes=(
        Mistake("blocks not chained", _NotChained,
                "your result matches applying every block to the ORIGINAL input and keeping the last "
                "output: feed each block's output into the next block."),
        Mistake("first block repeated", _FirstLayerOnly,
                "your result matches applying self.layers[0] num_layers times: every block has its own "
                "weights, loop over self.layers."),
        Mistake("mask only in the first block", _MaskOnlyFirst,
                "your result matches passing key_mask to the first block only: every block must "
                "ignore the padding."),
        Mistake("extra residual around the stack", _OuterResidual,
                "your result adds the input to the output of the stack: the residuals live inside the "
                "blocks; the stack just applies them one after another."),
    ),
    describe_inputs=_describe_block,
    given={"layer_norm": _given_layer_norm},
)


CHECKS = CheckSet(CHAPTER, [LAYER_NORM, FEED_FORWARD, ENCODER_BLOCK, TRANSFORMER_ENCODER])
check = CHECKS.check
