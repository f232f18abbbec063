"""Tasks of chapter 04, the decoder and seq2seq: inputs, calls and rules (what the grading sandbox sees).

Conventions (stated in the notebook too): batches come first, (B, T, d); a boolean mask is True where
a query MAY attend to a key; token ids PAD, BOS, EOS are 0, 1, 2 unless a case says otherwise.
Decoders run on :class:`coursekit.seq2seq_data.TinyScorer`, a fixed next-token model small enough
that every output sequence can be enumerated.
"""

from __future__ import annotations

import torch

from autograders.engine.core import Case, Forbid, Task, TaskSet, randn
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
# 2. causal mask

def _call_mask(impl, inputs):
    mask = impl(inputs["T"])
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"causal_mask must return a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"causal_mask must return a bool tensor (True = may attend), got {mask.dtype}; "
                        f"PyTorch's nn.Transformer.generate_square_subsequent_mask returns floats "
                        f"0 / -inf, this course uses booleans")
    return mask


CAUSAL = Task(
    "causal_mask",
    cases=(
        Case("T=4", lambda g: {"T": 4}),
        Case("T=7", lambda g: {"T": 7}),
        Case("T=1", lambda g: {"T": 1}, hidden=True),
        Case("T=33", lambda g: {"T": 33}, hidden=True),
    ),
    call=_call_mask,
    output_names=("mask",),
)


# ---------------------------------------------------------------------------------------------
# 3. cross attention, against nn.MultiheadAttention with copied weights

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
    output_names=("loss",),
    rules=(NO_LOSS_FUNCTION,),
)


# ---------------------------------------------------------------------------------------------
# 5. beam search

def _beam_inputs(g, vocab_size, max_len, beam_size, sharpness=1.5):
    scorer = TinyScorer(vocab_size, max_len, 1, sharpness=sharpness, generator=g)
    return {"next_log_probs": scorer, "beam_size": beam_size, "max_len": max_len}


def _call_beam(impl, inputs):
    return impl(**{k: v for k, v in inputs.items() if not k.startswith("_")})


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


TASKS = TaskSet(CHAPTER, [GREEDY, CAUSAL, CROSS, LOSS, BEAM])
