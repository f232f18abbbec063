"""Tasks of chapter 11, ViLT: inputs, calls and rules (what the grading sandbox sees).

Conventions (stated in the notebook, as in ViLT):

* one sequence per image-caption pair: the caption's tokens first (``[CLS]`` at position 0, where the
  pooler reads), then the image's tokens; each part gets its own learned positions and its modality-type
  embedding, row 0 of the ``(2, d)`` type table for text and row 1 for the image;
* key masks are True at real tokens (the course's convention); image tokens are always real;
* the ITM head has two outputs and class 1 means "the caption matches the image";
* word ids: the index of the word a piece belongs to, -1 at ``[CLS]`` and at padding.
"""

from __future__ import annotations

import torch

from autograders.engine.core import Case, Forbid, Task, TaskSet, randn

CHAPTER = "11_vilt"

NO_RANDOMNESS = Forbid(
    "the choice comes from the random numbers you are given: draw none of your own (torch.rand, randint, "
    "randperm, bernoulli, multinomial, ...) -- so a library masking collator, which draws its own, is out too",
    functions=("rand", "rand_like", "randint", "randint_like", "randn", "randn_like", "randperm", "bernoulli",
               "multinomial", "normal", "uniform_", "random_", "bernoulli_", "exponential_", "geometric_"),
    ops=("aten.bernoulli", "aten.rand", "aten.rand_like", "aten.randint", "aten.randperm", "aten.multinomial",
         "aten.uniform", "aten.random", "aten.normal", "aten.exponential", "aten.geometric"),
)
# transformers' collator is what the whole-word check compares with (autograders/vilt.py); its static
# _whole_word_mask draws nothing, so NO_RANDOMNESS alone would not keep it out
NO_COLLATOR = Forbid("write it yourself: transformers' DataCollatorForLanguageModeling (what the checks compare "
                     "with) may not be called here",
                     callables=("transformers.data.data_collator:DataCollatorForLanguageModeling.*",))


# ---------------------------------------------------------------------------------------------
# 1. the fused input

def _fuse_inputs(g, B, L, M, d, P=None, short_texts=True):
    P = P or L
    lengths = torch.randint(1 if short_texts else L, L + 1, (B,), generator=g)
    text_mask = torch.arange(L)[None, :] < lengths[:, None]                    # (B, L), True at real tokens
    return {"text_embeds": randn(g, B, L, d), "text_mask": text_mask, "image_embeds": randn(g, B, M, d),
            "text_pos": randn(g, P, d), "image_pos": randn(g, M, d), "type_embeds": randn(g, 2, d)}


def _call_fuse(impl, inputs):
    out = impl(**inputs)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("fuse_inputs must return (tokens, key_mask)")
    tokens, key_mask = out
    if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
        raise TypeError(f"key_mask must be a bool tensor (True at real tokens), got "
                        f"{getattr(key_mask, 'dtype', type(key_mask).__name__)}")
    return tokens, key_mask


FUSE_INPUTS = Task(
    "fuse_inputs",
    cases=(
        Case("2 pairs, 5 text tokens, 4 image tokens, d=8", lambda g: _fuse_inputs(g, 2, 5, 4, 8)),
        Case("3 pairs, 7 text tokens, 10 image tokens, d=16", lambda g: _fuse_inputs(g, 3, 7, 10, 16)),
        Case("a position table longer than the captions", lambda g: _fuse_inputs(g, 4, 6, 5, 8, P=12), hidden=True),
        Case("no padding", lambda g: _fuse_inputs(g, 2, 4, 4, 8, short_texts=False), hidden=True),
        Case("one pair, one text token", lambda g: _fuse_inputs(g, 1, 1, 3, 4), hidden=True),
        Case("8 pairs, 12 text tokens, 17 image tokens, d=32", lambda g: _fuse_inputs(g, 8, 12, 17, 32), hidden=True),
    ),
    call=_call_fuse,
    output_names=("tokens", "key_mask"),
)


# ---------------------------------------------------------------------------------------------
# 2. negatives for image-text matching

def _negatives_inputs(g, B, n_classes):
    labels = torch.randint(0, n_classes, (B,), generator=g)
    labels[:2] = torch.tensor([0, 1])[: min(B, 2)]  # at least two classes
    return {"labels": labels, "scores": torch.rand(B, B, generator=g)}


def _one_other(g):
    # every image is a three except one seven: every three's negative must be the seven
    labels = torch.full((6,), 3, dtype=torch.long)
    labels[4] = 7
    return {"labels": labels, "scores": torch.rand(6, 6, generator=g)}


SAMPLE_NEGATIVES = Task(
    "sample_negatives",
    cases=(
        Case("8 images of 3 classes", lambda g: _negatives_inputs(g, 8, 3)),
        Case("16 images of 10 classes", lambda g: _negatives_inputs(g, 16, 10)),
        Case("two images of two classes", lambda g: _negatives_inputs(g, 2, 2), hidden=True),
        Case("one image of another class", _one_other, hidden=True),
        Case("64 images of 10 classes", lambda g: _negatives_inputs(g, 64, 10), hidden=True),
        Case("12 images of 2 classes", lambda g: _negatives_inputs(g, 12, 2), hidden=True),
    ),
    rules=(NO_RANDOMNESS,),
)


# ---------------------------------------------------------------------------------------------
# 3. the ITM loss

def _itm_inputs(g, P, Q, scale=2.0):
    return {"match_logits": randn(g, P, 2, scale=scale), "mismatch_logits": randn(g, Q, 2, scale=scale)}


ITM_LOSS = Task(
    "itm_loss",
    cases=(
        Case("4 matching and 4 mismatched pairs", lambda g: _itm_inputs(g, 4, 4)),
        Case("16 + 16 pairs, large logits", lambda g: _itm_inputs(g, 16, 16, scale=6.0)),
        Case("one pair of each", lambda g: _itm_inputs(g, 1, 1), hidden=True),
        Case("3 matching, 9 mismatched pairs", lambda g: _itm_inputs(g, 3, 9), hidden=True),
        Case("logits of size 50", lambda g: _itm_inputs(g, 8, 8, scale=50.0), hidden=True),
        Case("64 + 64 pairs", lambda g: _itm_inputs(g, 64, 64), hidden=True),
    ),
)


# ---------------------------------------------------------------------------------------------
# 4. whole-word masking

def _word_ids(g, B, L, max_words, max_pieces):
    """Rows of -1 ([CLS]), then words of 1..max_pieces pieces numbered 0, 1, ..., then -1 padding."""
    word_ids = torch.full((B, L), -1, dtype=torch.long)
    for b in range(B):
        pos, k = 1, 0
        n_words = int(torch.randint(1, max_words + 1, (1,), generator=g))
        while k < n_words:
            n = int(torch.randint(1, max_pieces + 1, (1,), generator=g))
            if pos + n > L:
                break
            word_ids[b, pos:pos + n] = k
            pos, k = pos + n, k + 1
    return word_ids


def _mask_inputs(g, B, L, probability, max_words=6, max_pieces=3):
    return {"word_ids": _word_ids(g, B, L, max_words, max_pieces), "uniforms": torch.rand(B, L, generator=g),
            "probability": probability}


def _call_mask(impl, inputs):
    out = impl(**inputs)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
        raise TypeError(f"whole_word_mask must return a bool tensor, got {getattr(out, 'dtype', type(out).__name__)}")
    return out


WHOLE_WORD_MASK = Task(
    "whole_word_mask",
    cases=(
        Case("4 captions of 10 tokens, probability 0.15", lambda g: _mask_inputs(g, 4, 10, 0.15)),
        Case("6 captions of 12 tokens, probability 0.5", lambda g: _mask_inputs(g, 6, 12, 0.5)),
        Case("probability 0 (nothing masked)", lambda g: _mask_inputs(g, 3, 10, 0.0), hidden=True),
        Case("probability 1 (every word masked)", lambda g: _mask_inputs(g, 3, 10, 1.0), hidden=True),
        Case("words of up to 4 pieces, probability 0.3", lambda g: _mask_inputs(g, 8, 16, 0.3, max_pieces=4),
             hidden=True),
        Case("one-piece words only", lambda g: _mask_inputs(g, 5, 8, 0.4, max_pieces=1), hidden=True),
        Case("64 captions, probability 0.15", lambda g: _mask_inputs(g, 64, 12, 0.15), hidden=True),
    ),
    call=_call_mask,
    rules=(NO_RANDOMNESS, NO_COLLATOR),
)


TASKS = TaskSet(CHAPTER, [FUSE_INPUTS, SAMPLE_NEGATIVES, ITM_LOSS, WHOLE_WORD_MASK])
