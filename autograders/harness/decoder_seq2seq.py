"""Tasks of chapter 04, the decoder and seq2seq: inputs, calls and rules (what the grading sandbox sees).

Conventions (stated in the notebook too): batches come first, (B, T, d); a boolean mask is True where
a query MAY attend to a key (chapter 2's convention; PyTorch's modules read boolean masks the other way
round, and the notebook converts with ``to_torch_mask``); token ids PAD, BOS, EOS are 0, 1, 2 unless a
case says otherwise. Decoders run on :class:`coursekit.seq2seq_data.TinyScorer`, a fixed next-token
model small enough that every output sequence can be enumerated. The decoder block's weights are
copied into the student's module by parameter name (those of its given ``__init__``).
"""

from __future__ import annotations

import torch

from autograders.engine.core import Case, Forbid, Require, Task, TaskSet, no_course_version, randn
from coursekit.seq2seq_data import BOS, EOS, PAD, TinyScorer

CHAPTER = "04_decoder_seq2seq"


# ---------------------------------------------------------------------------------------------
# 1. greedy decoding

def _greedy_inputs(g, batch_size, vocab_size, max_len, sharpness=1.5, ids=(BOS, EOS, PAD)):
    scorer = TinyScorer(vocab_size, max_len, batch_size, sharpness=sharpness, generator=g)
    inputs = {"next_log_probs": scorer, "batch_size": batch_size, "max_len": max_len}
    if ids != (BOS, EOS, PAD):
        inputs.update(zip(("bos_id", "eos_id", "pad_id"), ids))
    return inputs


GREEDY = Task(
    "greedy_decode",
    cases=(
        Case("one sequence, vocabulary 6, max_len 5", lambda g: _greedy_inputs(g, 1, 6, 5)),
        Case("batch of 4, vocabulary 8, max_len 6", lambda g: _greedy_inputs(g, 4, 8, 6)),
        Case("batch of 16, vocabulary 5, max_len 7", lambda g: _greedy_inputs(g, 16, 5, 7), hidden=True),
        Case("max_len 1", lambda g: _greedy_inputs(g, 3, 6, 1), hidden=True),
        Case("a sharp model, batch of 8, vocabulary 12", lambda g: _greedy_inputs(g, 8, 12, 6, sharpness=4.0),
             hidden=True),
        Case("batch of 6 with other ids: BOS=1, EOS=3, PAD=0 (EOS is not 2)",
             lambda g: _greedy_inputs(g, 6, 7, 6, ids=(BOS, 3, PAD)), hidden=True),
    ),
    output_names=("tokens", "scores"),
)


# ---------------------------------------------------------------------------------------------
# 2. cross attention, against nn.MultiheadAttention with copied weights

def _cross_inputs(g, B, T, S, d, heads, padded=True, scale=1.0):
    inputs = {"x": randn(g, B, T, d, scale=scale), "memory": randn(g, B, S, d, scale=scale),
              "d_model": d, "n_heads": heads, "memory_mask": None}
    for name in ("W_q", "W_k", "W_v", "W_o"):
        inputs[name] = randn(g, d, d, scale=d ** -0.5)  # nn.Linear layout: (out_features, in_features)
    if padded:
        lengths = torch.randint(1, S + 1, (B,), generator=g)
        lengths[0] = max(1, S - 2)  # at least one row is really padded
        inputs["memory_mask"] = torch.arange(S)[None, :] < lengths[:, None]
    return inputs


def _call_cross(impl, inputs):
    module = impl(inputs["d_model"], inputs["n_heads"])
    for name in ("W_q", "W_k", "W_v", "W_o"):
        layer = getattr(module, name, None)
        if layer is None or not hasattr(layer, "weight"):
            raise AttributeError(f"CrossAttention must keep its projection {name} as an nn.Linear "
                                 f"attribute (self.{name}), as in the given __init__")
        layer.weight.copy_(inputs[name])
    return module(inputs["x"], inputs["memory"], memory_mask=inputs["memory_mask"])


CROSS = Task(
    "CrossAttention",
    cases=(
        Case("batch 2, T=3 decoder positions, S=5 memory positions, d_model=8, 2 heads, padded memory",
             lambda g: _cross_inputs(g, 2, 3, 5, 8, 2)),
        Case("batch 2, T=S=4, d_model=8, 4 heads, no mask",
             lambda g: _cross_inputs(g, 2, 4, 4, 8, 4, padded=False)),
        Case("batch 2, T=S=6, d_model=12, 3 heads, padded memory",
             lambda g: _cross_inputs(g, 2, 6, 6, 12, 3)),
        Case("batch 3, one decoder step (T=1), S=7, d_model=16, 4 heads",
             lambda g: _cross_inputs(g, 3, 1, 7, 16, 4), hidden=True),
        Case("batch 1, T=5, S=1, d_model=8, 1 head", lambda g: _cross_inputs(g, 1, 5, 1, 8, 1, padded=False),
             hidden=True),
        Case("batch 4, T=6, S=9, d_model=32, 8 heads, padded, large inputs",
             lambda g: _cross_inputs(g, 4, 6, 9, 32, 8, scale=3.0), hidden=True),
    ),
    call=_call_cross,
    output_names=("output", "weights"),
    rules=(no_course_version("coursekit.unet:CrossAttention"),),
)


# ---------------------------------------------------------------------------------------------
# 3. a decoder block: masked self-attention, cross attention, feed-forward, residuals and norms

def _block_parameters(g, d, d_ff):
    """Random values for every parameter of the given __init__, by name (nn.Linear layout)."""
    params = {}
    for attn in ("self_attn", "cross_attn"):
        params[f"{attn}.in_proj_weight"] = randn(g, 3 * d, d, scale=d ** -0.5)
        params[f"{attn}.out_proj.weight"] = randn(g, d, d, scale=d ** -0.5)
    params["linear1.weight"] = randn(g, d_ff, d, scale=d ** -0.5)
    params["linear1.bias"] = randn(g, d_ff, scale=0.1)
    params["linear2.weight"] = randn(g, d, d_ff, scale=d_ff ** -0.5)
    params["linear2.bias"] = randn(g, d, scale=0.1)
    for norm in ("norm1", "norm2", "norm3"):  # not 1 and 0: a norm used in the wrong place shows
        params[f"{norm}.weight"] = 1.0 + randn(g, d, scale=0.3)
        params[f"{norm}.bias"] = randn(g, d, scale=0.3)
    return params


def _block_inputs(B, T, S, d, heads, d_ff, norm_first, causal=True, padded=True, scale=1.0):
    def make(g):
        inputs = {"x": randn(g, B, T, d, scale=scale), "memory": randn(g, B, S, d, scale=scale),
                  "d_model": d, "n_heads": heads, "d_ff": d_ff, "norm_first": norm_first, "causal": causal,
                  "memory_mask": None, "params": _block_parameters(g, d, d_ff)}
        if padded:
            lengths = torch.randint(1, S + 1, (B,), generator=g)
            lengths[0] = max(1, S - 2)  # at least one row is really padded
            inputs["memory_mask"] = torch.arange(S)[None, :] < lengths[:, None]
        return inputs
    return make


# nn.TransformerDecoderLayer computes the whole exercise (it is what the check compares with).
_LIBRARY_LAYERS = (torch.nn.TransformerDecoderLayer, torch.nn.TransformerDecoder, torch.nn.Transformer)
_LIBRARY_FORWARD = {cls: cls.forward for cls in _LIBRARY_LAYERS}


def _call_block(impl, inputs):
    module = impl(inputs["d_model"], inputs["n_heads"], inputs["d_ff"], norm_first=inputs["norm_first"])
    inputs["_library_layers"] = used = [type(m).__name__ for m in module.modules() if isinstance(m, _LIBRARY_LAYERS)]
    own = dict(module.named_parameters())
    for name, value in inputs["params"].items():
        if name not in own:
            raise AttributeError(f"DecoderBlock has no parameter {name}: keep the given __init__ (self_attn, "
                                 f"cross_attn, linear1, linear2, norm1, norm2, norm3)")
        if tuple(own[name].shape) != tuple(value.shape):
            raise ValueError(f"DecoderBlock's {name} has shape {tuple(own[name].shape)}, expected {tuple(value.shape)}")
        own[name].copy_(value)
    module.eval()

    def recording(cls):
        def forward(self, *args, **kwargs):
            used.append(cls.__name__)
            return _LIBRARY_FORWARD[cls](self, *args, **kwargs)
        return forward

    for cls in _LIBRARY_LAYERS:  # a layer built inside forward is seen too
        cls.forward = recording(cls)
    try:
        return module(inputs["x"], inputs["memory"], memory_mask=inputs["memory_mask"], causal=inputs["causal"])
    finally:
        for cls, forward in _LIBRARY_FORWARD.items():  # the forwards of import time: safe when calls overlap
            cls.forward = forward


NO_LIBRARY_LAYER = Require(
    "build the block from the given sub-modules: nn.TransformerDecoderLayer (what the check compares with), "
    "nn.TransformerDecoder and nn.Transformer are not allowed inside DecoderBlock",
    test=lambda trace, inputs: not inputs.get("_library_layers"),
    found=lambda trace, inputs: "it used " + ", ".join(dict.fromkeys(inputs.get("_library_layers", ()))),
)

BLOCK = Task(
    "DecoderBlock",
    cases=(
        Case("post-norm, batch 2, T=4, S=5, d_model=8, 2 heads, d_ff=16, causal, padded memory",
             _block_inputs(2, 4, 5, 8, 2, 16, norm_first=False)),
        Case("pre-norm (norm_first=True), batch 2, T=5, S=3, d_model=8, 2 heads, d_ff=12, causal, padded memory",
             _block_inputs(2, 5, 3, 8, 2, 12, norm_first=True)),
        Case("post-norm, causal=False (non-autoregressive), no memory mask",
             _block_inputs(2, 4, 4, 8, 4, 16, norm_first=False, causal=False, padded=False)),
        Case("pre-norm, one decoder position (T=1), S=6, d_model=16, 4 heads",
             _block_inputs(3, 1, 6, 16, 4, 32, norm_first=True), hidden=True),
        Case("post-norm, batch 3, T=7, S=9, d_model=32, 8 heads, d_ff=64, padded",
             _block_inputs(3, 7, 9, 32, 8, 64, norm_first=False), hidden=True),
        Case("pre-norm, causal=False, padded memory", _block_inputs(2, 5, 6, 12, 3, 24, norm_first=True, causal=False),
             hidden=True),
        Case("post-norm, large inputs (x3), T=6, S=4", _block_inputs(2, 6, 4, 16, 2, 32, norm_first=False, scale=3.0),
             hidden=True),
    ),
    call=_call_block,
    rules=(NO_LIBRARY_LAYER,),
)


# ---------------------------------------------------------------------------------------------
# 4. the seq2seq loss

def _loss_inputs(g, B, T, V, pad_id=PAD, reduction="mean", scale=2.0, no_pad=False):
    logits = randn(g, B, T, V, scale=scale)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[targets == pad_id] = (pad_id + 1) % V  # real tokens are never the pad id
    if not no_pad:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = max(1, T - 2)
        targets[torch.arange(T)[None, :] >= lengths[:, None]] = pad_id
    return {"logits": logits, "targets": targets, "pad_id": pad_id, "reduction": reduction}


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


def _call_loss(impl, inputs):
    return one_number(impl(**inputs), "seq2seq_loss's result")


# torch.log_softmax is allowed (the exercise is about which positions count and how they are
# averaged); the loss functions that do all of it are not.
NO_LOSS_FUNCTION = Forbid(
    "compute the loss from torch.log_softmax and gather yourself: F.cross_entropy, nn.CrossEntropyLoss, "
    "F.nll_loss and nn.NLLLoss are not allowed in seq2seq_loss",
    functions=("cross_entropy", "nll_loss", "nll_loss2d", "nll_loss_nd"),
    ops=("aten.cross_entropy_loss", "aten.nll_loss", "aten.nll_loss_nd", "aten.nll_loss2d",
         "aten.nll_loss_forward", "aten.nll_loss2d_forward"),
)

LOSS = Task(
    "seq2seq_loss",
    cases=(
        Case("batch 2, T=5, vocabulary 7, padded, mean", lambda g: _loss_inputs(g, 2, 5, 7)),
        Case("batch 3, T=6, vocabulary 10, padded, sum", lambda g: _loss_inputs(g, 3, 6, 10, reduction="sum")),
        Case("batch 4, T=8, vocabulary 30, padded, mean", lambda g: _loss_inputs(g, 4, 8, 30)),
        Case("no padding at all, mean", lambda g: _loss_inputs(g, 2, 4, 6, no_pad=True), hidden=True),
        Case("pad id 3 (not 0), mean", lambda g: _loss_inputs(g, 4, 6, 9, pad_id=3), hidden=True),
        Case("pad id 5 (not 0), sum", lambda g: _loss_inputs(g, 3, 7, 8, pad_id=5, reduction="sum"), hidden=True),
        Case("large logits (+-300), mean", lambda g: _loss_inputs(g, 3, 5, 12, scale=300.0), hidden=True),
        Case("batch 16, T=12, vocabulary 40, sum", lambda g: _loss_inputs(g, 16, 12, 40, reduction="sum"),
             hidden=True),
    ),
    call=_call_loss,
    output_names=("loss",),
    rules=(NO_LOSS_FUNCTION,),
)


# ---------------------------------------------------------------------------------------------
# 5. beam search

def _beam_inputs(g, vocab_size, max_len, beam_size, sharpness=1.5):
    scorer = TinyScorer(vocab_size, max_len, 1, sharpness=sharpness, generator=g)
    return {"next_log_probs": scorer, "beam_size": beam_size, "max_len": max_len}


def _call_beam(impl, inputs):
    result = impl(**{k: v for k, v in inputs.items() if not k.startswith("_")})
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise TypeError(f"beam_search must return a pair (tokens, score), got a {type(result).__name__}")
    return result[0], one_number(result[1], "the score")



def _with_ref(kind, make):
    def inner(g):
        inputs = make(g)
        inputs["_compare_with"] = kind
        return inputs
    return inner


def _exhaustive(g, vocab_size, max_len):
    # No pruning is possible when the beam can hold every hypothesis with finite score.
    inputs = _beam_inputs(g, vocab_size, max_len, beam_size=(vocab_size - 2) ** max_len)
    inputs["_compare_with"] = "brute force"
    return inputs


BEAM = Task(
    "beam_search",
    cases=(
        Case("beam_size 1 equals greedy (vocabulary 6, max_len 5)",
             _with_ref("greedy", lambda g: _beam_inputs(g, 6, 5, 1))),
        Case("a beam as wide as every hypothesis finds the brute-force best (vocabulary 6, max_len 4)",
             lambda g: _exhaustive(g, 6, 4)),
        Case("beam_size 2, vocabulary 6, max_len 5", lambda g: _beam_inputs(g, 6, 5, 2)),
        Case("beam_size 3, vocabulary 7, max_len 5", lambda g: _beam_inputs(g, 7, 5, 3)),
        Case("exhaustive beam, vocabulary 5, max_len 5, brute force", lambda g: _exhaustive(g, 5, 5), hidden=True),
        Case("exhaustive beam, vocabulary 7, max_len 3, brute force", lambda g: _exhaustive(g, 7, 3), hidden=True),
        Case("beam_size 4, vocabulary 9, max_len 6", lambda g: _beam_inputs(g, 9, 6, 4), hidden=True),
        Case("beam_size 3, sharp model, max_len 6", lambda g: _beam_inputs(g, 6, 6, 3, sharpness=4.0),
             hidden=True),
        Case("beam_size 5, max_len 1", lambda g: _beam_inputs(g, 6, 1, 5), hidden=True),
        Case("beam_size 1 equals greedy, vocabulary 10, max_len 6",
             _with_ref("greedy", lambda g: _beam_inputs(g, 10, 6, 1)), hidden=True),
    ),
    call=_call_beam,
    output_names=("tokens", "score"),
)


# ---------------------------------------------------------------------------------------------
# 6. the sampling distribution: temperature, then top-k, then top-p, renormalised

def _filter_inputs(B, V, temperature=1.0, top_k=None, top_p=None, scale=2.0):
    def make(g):
        return {"logits": randn(g, B, V, scale=scale), "temperature": temperature, "top_k": top_k, "top_p": top_p}
    return make


FILTER = Task(
    "filter_logits",
    cases=(
        Case("temperature 0.7 only, 3 rows, vocabulary 10", _filter_inputs(3, 10, temperature=0.7)),
        Case("top-k 3, 4 rows, vocabulary 12", _filter_inputs(4, 12, top_k=3)),
        Case("top-p 0.8, 4 rows, vocabulary 12", _filter_inputs(4, 12, top_p=0.8)),
        Case("temperature 1.5, top-k 5 and top-p 0.7 together, vocabulary 20",
             _filter_inputs(5, 20, temperature=1.5, top_k=5, top_p=0.7)),
        Case("top-k 1 is greedy", _filter_inputs(4, 9, top_k=1), hidden=True),
        Case("a tiny top-p keeps only the most probable token", _filter_inputs(4, 15, top_p=0.01), hidden=True),
        Case("top-p 1.0 keeps every token", _filter_inputs(3, 8, temperature=0.5, top_p=1.0), hidden=True),
        Case("top-k larger than the vocabulary", _filter_inputs(3, 6, top_k=50), hidden=True),
        Case("temperature 0.3, top-p 0.9, vocabulary 100, sharp logits",
             _filter_inputs(6, 100, temperature=0.3, top_p=0.9, scale=5.0), hidden=True),
        Case("temperature 3, top-k 10, top-p 0.95, vocabulary 64", _filter_inputs(8, 64, 3.0, 10, 0.95),
             hidden=True),
    ),
)


TASKS = TaskSet(CHAPTER, [GREEDY, CROSS, BLOCK, LOSS, BEAM, FILTER])
