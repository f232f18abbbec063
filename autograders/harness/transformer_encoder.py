"""Tasks of chapter 03, the Transformer encoder: inputs, calls and rules (what the grading sandbox sees).

Conventions (stated in the notebook too): a batch of sequences is a ``(B, T, d_model)`` tensor
(batch first); layer norm normalises over the last axis; masks are True where a query may attend, as in
every chapter: the key mask has shape ``(B, T)`` and is True at real tokens, False at padding (the opposite
of PyTorch's ``src_key_padding_mask``, which the notebook's ``attend_to_key_padding_mask`` converts to).

The block and the stack are built from the student's class and receive the weights of an
``nn.TransformerEncoderLayer`` state dict, copied by name, as the notebook states:

    block.self_attn           <- layer.self_attn   (in_proj_weight/bias, out_proj.weight/bias)
    block.ffn.linear1         <- layer.linear1
    block.ffn.linear2         <- layer.linear2
    block.norm1.weight/.bias  <- layer.norm1.weight/.bias
    block.norm2.weight/.bias  <- layer.norm2.weight/.bias
"""

from __future__ import annotations

import torch
from torch import nn

from autograders.engine.core import Case, Forbid, Task, TaskSet, no_course_version, randn

CHAPTER = "03_transformer_encoder"


EPS = 1e-5  # nn.LayerNorm's and nn.TransformerEncoderLayer's default


# ---------------------------------------------------------------------------------------------
# 1. layer norm

def _ln_inputs(g, *shape, scale=1.0, offset=0.0, constant_row=False):
    d = shape[-1]
    x = randn(g, *shape, scale=scale) + offset
    if constant_row:
        x.view(-1, d)[0] = 3.0  # zero variance: only eps keeps 1/sqrt(var + eps) finite
    return {"x": x, "weight": 1.0 + 0.5 * randn(g, d), "bias": 0.5 * randn(g, d), "eps": EPS}


# Every PyTorch routine that normalises a vector by its mean and variance (group norm with one group,
# instance norm and batch norm on a reshaped input, or RMS norm after centring compute layer norm too).
NO_LIBRARY_NORM = Forbid(
    "compute the mean and the variance yourself: F.layer_norm, nn.LayerNorm and the other normalisation "
    "functions (group_norm, instance_norm, batch_norm, rms_norm) are not allowed in layer_norm",
    functions=("layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "instance_norm",
               "batch_norm", "native_batch_norm", "rms_norm", "_fused_rms_norm"),
    ops=("aten.layer_norm", "aten.native_layer_norm", "aten.group_norm", "aten.native_group_norm",
         "aten.instance_norm", "aten.batch_norm", "aten.native_batch_norm", "aten._native_batch_norm_legit",
         "aten._native_batch_norm_legit_no_training", "aten._batch_norm_with_update",
         "aten._batch_norm_no_update", "aten.rms_norm", "aten._fused_rms_norm"),
)

LAYER_NORM = Task(
    "layer_norm",
    cases=(
        Case("4 tokens, d=8", lambda g: _ln_inputs(g, 4, 8)),
        Case("batch 2, T=5, d=16", lambda g: _ln_inputs(g, 2, 5, 16)),
        Case("small values (std 0.001: eps matters)", lambda g: _ln_inputs(g, 3, 6, scale=1e-3)),
        Case("batch 3, T=4, d=32, offset by 300", lambda g: _ln_inputs(g, 3, 4, 32, offset=300.0), hidden=True),
        Case("a constant token (variance 0)", lambda g: _ln_inputs(g, 2, 3, 8, constant_row=True), hidden=True),
        Case("d=2", lambda g: _ln_inputs(g, 5, 2), hidden=True),
        Case("large values (x100)", lambda g: _ln_inputs(g, 2, 7, 12, scale=100.0), hidden=True),
        Case("one token, d=64", lambda g: _ln_inputs(g, 1, 64), hidden=True),
    ),
    rules=(NO_LIBRARY_NORM,),
)


# ---------------------------------------------------------------------------------------------
# 2. the position-wise feed-forward network

def _ffn_params(g, d, d_ff):
    return {
        "linear1.weight": randn(g, d_ff, d, scale=d ** -0.5),
        "linear1.bias": 0.3 * randn(g, d_ff),
        "linear2.weight": randn(g, d, d_ff, scale=d_ff ** -0.5),
        "linear2.bias": 0.3 * randn(g, d),
    }


def _ffn_inputs(g, shape, d_ff, scale=1.0):
    d = shape[-1]
    return {"x": randn(g, *shape, scale=scale), "d_model": d, "d_ff": d_ff, "params": _ffn_params(g, d, d_ff)}


def _copy_linear(linear, params, prefix, owner):
    if not isinstance(linear, nn.Linear):
        raise AttributeError(f"{owner} must keep {prefix} as an nn.Linear attribute, as in the given __init__")
    linear.weight.copy_(params[f"{prefix}.weight"])
    linear.bias.copy_(params[f"{prefix}.bias"])


def _call_ffn(impl, inputs):
    module = impl(inputs["d_model"], inputs["d_ff"])
    for name in ("linear1", "linear2"):
        _copy_linear(getattr(module, name, None), inputs["params"], name, "FeedForward")
    module.eval()
    return module(inputs["x"])


FEED_FORWARD = Task(
    "FeedForward",
    cases=(
        Case("batch 2, T=5, d_model=8, d_ff=32", lambda g: _ffn_inputs(g, (2, 5, 8), 32)),
        Case("batch 1, T=3, d_model=4, d_ff=16", lambda g: _ffn_inputs(g, (1, 3, 4), 16)),
        Case("one sequence (T, d) = (6, 12), d_ff=48", lambda g: _ffn_inputs(g, (6, 12), 48), hidden=True),
        Case("d_ff smaller than d_model", lambda g: _ffn_inputs(g, (2, 4, 16), 8), hidden=True),
        Case("large inputs (x10)", lambda g: _ffn_inputs(g, (3, 2, 8), 24, scale=10.0), hidden=True),
    ),
    call=_call_ffn,
    rules=(no_course_version("coursekit.encoder:FeedForward"),),
)


# ---------------------------------------------------------------------------------------------
# 3-4. the encoder block and the stack, against nn.TransformerEncoderLayer / nn.TransformerEncoder

def _layer_params(g, d, d_ff):
    params = {
        "self_attn.in_proj_weight": randn(g, 3 * d, d, scale=d ** -0.5),
        "self_attn.in_proj_bias": 0.2 * randn(g, 3 * d),
        "self_attn.out_proj.weight": randn(g, d, d, scale=d ** -0.5),
        "self_attn.out_proj.bias": 0.2 * randn(g, d),
    }
    params.update(_ffn_params(g, d, d_ff))
    for norm in ("norm1", "norm2"):
        params[f"{norm}.weight"] = 1.0 + 0.3 * randn(g, d)
        params[f"{norm}.bias"] = 0.3 * randn(g, d)
    return params


def _key_mask(g, B, T, kind):
    if kind is None:
        return None
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T  # one full sequence ...
    if B > 1:
        lengths[1] = max(1, T // 2)  # ... and one surely padded
    return torch.arange(T)[None, :] < lengths[:, None]  # True at real tokens (keys that may be attended)


def _block_inputs(g, B, T, d, nhead, d_ff, padding=None, scale=1.0, num_layers=None):
    inputs = {"x": randn(g, B, T, d, scale=scale), "key_mask": _key_mask(g, B, T, padding),
              "d_model": d, "nhead": nhead, "d_ff": d_ff}
    if num_layers is None:
        inputs["params"] = _layer_params(g, d, d_ff)
    else:
        inputs["num_layers"] = num_layers
        inputs["layers"] = [_layer_params(g, d, d_ff) for _ in range(num_layers)]
    return inputs


def load_layer_weights(block, params, owner="EncoderBlock"):
    """Copy one nn.TransformerEncoderLayer state dict into a block with the notebook's attribute names."""
    attn = getattr(block, "self_attn", None)
    if not isinstance(attn, nn.MultiheadAttention):
        raise AttributeError(f"{owner} must keep self.self_attn as an nn.MultiheadAttention, as in the given __init__")
    attn.load_state_dict({k.removeprefix("self_attn."): v for k, v in params.items() if k.startswith("self_attn.")})
    ffn = getattr(block, "ffn", None)
    if ffn is None:
        raise AttributeError(f"{owner} must keep self.ffn (a FeedForward), as in the given __init__")
    for name in ("linear1", "linear2"):
        _copy_linear(getattr(ffn, name, None), params, name, f"{owner}.ffn")
    for name in ("norm1", "norm2"):
        norm = getattr(block, name, None)
        if norm is None or not hasattr(norm, "weight") or not hasattr(norm, "bias"):
            raise AttributeError(f"{owner} must keep self.{name} (a LayerNorm with weight and bias), "
                                 f"as in the given __init__")
        norm.weight.copy_(params[f"{name}.weight"])
        norm.bias.copy_(params[f"{name}.bias"])


def _call_block(impl, inputs):
    block = impl(inputs["d_model"], inputs["nhead"], inputs["d_ff"])
    load_layer_weights(block, inputs["params"])
    block.eval()
    return block(inputs["x"], key_mask=inputs["key_mask"])


def _call_stack(impl, inputs):
    encoder = impl(inputs["d_model"], inputs["nhead"], inputs["d_ff"], inputs["num_layers"])
    layers = getattr(encoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) != inputs["num_layers"]:
        raise AttributeError("TransformerEncoder must keep its blocks in self.layers, an nn.ModuleList of "
                             "num_layers EncoderBlocks, as in the given __init__")
    for block, params in zip(layers, inputs["layers"]):
        load_layer_weights(block, params, owner="each block in TransformerEncoder.layers")
    encoder.eval()
    return encoder(inputs["x"], key_mask=inputs["key_mask"])


ENCODER_BLOCK = Task(
    "EncoderBlock",
    cases=(
        Case("batch 2, T=5, d_model=8, 2 heads, d_ff=16", lambda g: _block_inputs(g, 2, 5, 8, 2, 16)),
        Case("batch 3, T=6, d_model=16, 4 heads, d_ff=32, padding",
             lambda g: _block_inputs(g, 3, 6, 16, 4, 32, padding="random")),
        Case("one head (no fused fast path), padding", lambda g: _block_inputs(g, 3, 7, 8, 1, 24, padding="random"),
             hidden=True),
        Case("batch 1, T=1", lambda g: _block_inputs(g, 1, 1, 8, 2, 16), hidden=True),
        Case("batch 4, T=9, d_model=32, 8 heads, d_ff=64, padding",
             lambda g: _block_inputs(g, 4, 9, 32, 8, 64, padding="random"), hidden=True),
        Case("3 heads, large inputs (x5)", lambda g: _block_inputs(g, 2, 6, 12, 3, 20, scale=5.0), hidden=True),
    ),
    call=_call_block,
    uses=("layer_norm",),  # through the notebook's LayerNorm module
    rules=(no_course_version("coursekit.encoder:EncoderBlock"),),
)


TRANSFORMER_ENCODER = Task(
    "TransformerEncoder",
    cases=(
        Case("2 layers, batch 2, T=5, d_model=8, 2 heads", lambda g: _block_inputs(g, 2, 5, 8, 2, 16, num_layers=2)),
        Case("3 layers, batch 3, T=6, d_model=16, 4 heads, padding",
             lambda g: _block_inputs(g, 3, 6, 16, 4, 32, padding="random", num_layers=3)),
        Case("1 layer", lambda g: _block_inputs(g, 2, 4, 8, 2, 16, num_layers=1), hidden=True),
        Case("4 layers, one head, padding",
             lambda g: _block_inputs(g, 3, 7, 8, 1, 16, padding="random", num_layers=4), hidden=True),
        Case("2 layers, batch 4, T=10, d_model=32, 8 heads, padding",
             lambda g: _block_inputs(g, 4, 10, 32, 8, 64, padding="random", num_layers=2), hidden=True),
    ),
    call=_call_stack,
    uses=("layer_norm",),
    rules=(no_course_version("coursekit.encoder:TransformerEncoder", "coursekit.encoder:EncoderBlock"),),
)


TASKS = TaskSet(CHAPTER, [LAYER_NORM, FEED_FORWARD, ENCODER_BLOCK, TRANSFORMER_ENCODER])
