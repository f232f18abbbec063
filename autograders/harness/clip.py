"""Tasks of chapter 10, CLIP: inputs, calls and rules (what the grading sandbox sees).

Conventions (stated in the notebook, as in open_clip): features are rows, ``(N, D)``; the learned
temperature is stored as its logarithm, ``logit_scale`` (initially ln(1/0.07)), and the logits are
``exp(logit_scale) * cos``; ``logits[i, j]`` compares image ``i`` with text ``j`` and matching pairs
sit on the diagonal.
"""

from __future__ import annotations

import math

import torch

from autograders.engine.core import Case, Forbid, Task, TaskSet, randn

CHAPTER = "10_clip"

INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)

NO_CROSS_ENTROPY = Forbid("write the loss from log_softmax: F.cross_entropy, nn.CrossEntropyLoss and F.nll_loss "
                          "are not allowed", functions=("cross_entropy", "nll_loss"),
                          ops=("aten.nll_loss_forward", "aten.nll_loss2d_forward"))


# ---------------------------------------------------------------------------------------------
# 1. the similarity logits

def _logit_inputs(g, N, M, D, logit_scale, image_scale=1.0, text_scale=1.0):
    # every row gets its own length, so that a missing normalisation changes the result
    lengths_i = torch.rand(N, 1, generator=g) * 2 + 0.2
    lengths_t = torch.rand(M, 1, generator=g) * 2 + 0.2
    return {"image_features": randn(g, N, D) * lengths_i * image_scale,
            "text_features": randn(g, M, D) * lengths_t * text_scale,
            "logit_scale": torch.tensor(float(logit_scale))}


CLIP_LOGITS = Task(
    "clip_logits",
    cases=(
        Case("4 images, 4 texts, D=8, initial scale", lambda g: _logit_inputs(g, 4, 4, 8, INIT_LOGIT_SCALE)),
        Case("3 images, 5 texts, D=6, logit_scale=1.2", lambda g: _logit_inputs(g, 3, 5, 6, 1.2)),
        Case("logit_scale=0 (scale 1)", lambda g: _logit_inputs(g, 5, 3, 4, 0.0), hidden=True),
        Case("the clamp's maximum, ln 100", lambda g: _logit_inputs(g, 6, 6, 16, MAX_LOGIT_SCALE), hidden=True),
        Case("features of very different sizes (x1000, x0.001)",
             lambda g: _logit_inputs(g, 4, 7, 8, INIT_LOGIT_SCALE, image_scale=1000.0, text_scale=1e-3), hidden=True),
        Case("1 image, 10 texts, D=64", lambda g: _logit_inputs(g, 1, 10, 64, 2.0), hidden=True),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. the symmetric loss

def _loss_inputs(g, N, scale=3.0, diagonal=0.0):
    logits = randn(g, N, N, scale=scale) + diagonal * torch.eye(N)
    return {"logits": logits}


CLIP_LOSS = Task(
    "clip_loss",
    cases=(
        Case("4 x 4 random logits", lambda g: _loss_inputs(g, 4)),
        Case("8 x 8, matching pairs ahead", lambda g: _loss_inputs(g, 8, diagonal=4.0)),
        Case("1 x 1 (the loss is 0)", lambda g: _loss_inputs(g, 1), hidden=True),
        Case("2 x 2", lambda g: _loss_inputs(g, 2), hidden=True),
        Case("32 x 32 at scale 100 (exp overflows and underflows)", lambda g: _loss_inputs(g, 32, scale=100.0),
             hidden=True),
        Case("64 x 64", lambda g: _loss_inputs(g, 64, diagonal=2.0), hidden=True),
    ),
    rules=(NO_CROSS_ENTROPY,),
)


# ---------------------------------------------------------------------------------------------
# 3. the zero-shot classifier

def _zero_shot_inputs(g, K, M, D, spread=3.0):
    # each template's features have their own length (spread: up to e^spread times longer or shorter)
    lengths = torch.exp((torch.rand(K, M, 1, generator=g) * 2 - 1) * spread)
    return {"class_text_features": randn(g, K, M, D) * lengths}


ZERO_SHOT_CLASSIFIER = Task(
    "zero_shot_classifier",
    cases=(
        Case("3 classes, 4 templates, D=8", lambda g: _zero_shot_inputs(g, 3, 4, 8)),
        Case("10 classes, 5 templates, D=16", lambda g: _zero_shot_inputs(g, 10, 5, 16)),
        Case("one template", lambda g: _zero_shot_inputs(g, 4, 1, 8), hidden=True),
        Case("one class", lambda g: _zero_shot_inputs(g, 1, 6, 8), hidden=True),
        Case("lengths within a factor 1.1", lambda g: _zero_shot_inputs(g, 5, 3, 32, spread=0.05), hidden=True),
        Case("10 classes, 18 templates, D=64", lambda g: _zero_shot_inputs(g, 10, 18, 64), hidden=True),
    ),
)


# ---------------------------------------------------------------------------------------------
# 4. recall@k

def _recall_inputs(g, N, k, signal=1.5):
    # matching pairs score higher on average, but not always: recall is neither 0 nor 1
    return {"similarity": randn(g, N, N) + signal * torch.eye(N), "k": k}


RECALL_AT_K = Task(
    "recall_at_k",
    cases=(
        Case("6 pairs, k=1", lambda g: _recall_inputs(g, 6, 1)),
        Case("20 pairs, k=5", lambda g: _recall_inputs(g, 20, 5)),
        Case("k = N (everything is found)", lambda g: _recall_inputs(g, 5, 5), hidden=True),
        Case("3 pairs, k=2", lambda g: _recall_inputs(g, 3, 2), hidden=True),
        Case("100 pairs, k=10, weak signal", lambda g: _recall_inputs(g, 100, 10, signal=0.5), hidden=True),
        Case("50 pairs, k=1, strong signal", lambda g: _recall_inputs(g, 50, 1, signal=3.0), hidden=True),
    ),
    output_names=("image_to_text", "text_to_image"),
)


TASKS = TaskSet(CHAPTER, [CLIP_LOGITS, CLIP_LOSS, ZERO_SHOT_CLASSIFIER, RECALL_AT_K])
