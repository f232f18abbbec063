"""Chapter 10: the solution passes every check; plausible wrong answers and the stubs are rejected."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from autograders import clip as ag
from autograders.engine.core import evaluate, make_inputs
from autograders.harness import clip as harness
from checks_support import assert_accepts, assert_rejects
from notebook_code import load_solutions, not_implemented

sol = load_solutions(ag.CHAPTER)
EXERCISES = {"clip_logits", "clip_loss", "zero_shot_classifier", "recall_at_k"}


def test_every_exercise_has_a_check_and_a_task():
    assert set(ag.CHECKS.checks) == EXERCISES == set(harness.TASKS.tasks)
    for check in ag.CHECKS:
        assert check.task is harness.TASKS[check.name]


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_solution_passes(name):
    assert_accepts(ag.CHECKS, name, getattr(sol, name))


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_checks_emit_no_warnings(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = evaluate(ag.CHECKS[name], getattr(sol, name), seed=0, hidden=None)
    assert report.passed, report.summary()


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_stubs_fail(name):
    assert "not implemented yet" in assert_rejects(ag.CHECKS, name, not_implemented)


def test_conventions_are_open_clips():
    assert harness.INIT_LOGIT_SCALE == pytest.approx(2.6593, abs=1e-4)
    assert math.exp(harness.MAX_LOGIT_SCALE) == pytest.approx(100.0)
    assert sol.CLIP().logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_recall_reference_agrees_with_a_direct_count():
    """scikit-learn's top_k_accuracy_score, row i's true column being i, is the stated definition."""
    for seed in range(5):
        for case in harness.RECALL_AT_K.cases:
            inputs = make_inputs(case, seed)
            s, k = inputs["similarity"], inputs["k"]
            direct = ((s > s.diagonal()[:, None]).sum(1) < k).float().mean().item()
            assert ag._recall_ref(inputs)[0] == pytest.approx(direct)


def test_the_floor_is_reached_by_ideal_logits():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    same = (labels[:, None] == labels[None, :]).float()
    floor = sol.loss_floor(labels).item()
    assert floor == pytest.approx((2 * math.log(2) + 3 * math.log(3)) / 6)
    assert sol.clip_loss(100.0 * (2 * same - 1)).item() == pytest.approx(floor, abs=1e-6)
    assert sol.clip_loss(10.0 * (2 * same - 1)).item() > floor  # a smaller scale stays above it


# --- clip_logits ----------------------------------------------------------------------------------

def _unit(x, dim=-1):
    return x / x.norm(dim=dim, keepdim=True)


def logits_raw(image_features, text_features, logit_scale):
    return logit_scale.exp() * image_features @ text_features.T


def logits_scale_as_is(image_features, text_features, logit_scale):
    return logit_scale * _unit(image_features) @ _unit(text_features).T


def logits_temperature_division(image_features, text_features, logit_scale):
    return _unit(image_features) @ _unit(text_features).T / logit_scale.exp()


def logits_transposed(image_features, text_features, logit_scale):
    return logit_scale.exp() * _unit(text_features) @ _unit(image_features).T


def logits_batch_norm(image_features, text_features, logit_scale):
    return logit_scale.exp() * F.normalize(image_features, dim=0) @ F.normalize(text_features, dim=0).T


def logits_with_cosine_similarity(image_features, text_features, logit_scale):  # another correct route
    return logit_scale.exp() * F.cosine_similarity(image_features[:, None], text_features[None], dim=-1)


def logits_clamped_inside(image_features, text_features, logit_scale):  # the clamp belongs to the loop
    return logit_scale.clamp(max=math.log(50)).exp() * _unit(image_features) @ _unit(text_features).T


@pytest.mark.parametrize("wrong, hint", [
    (logits_raw, "raw features"),
    (logits_scale_as_is, "stored as a logarithm"),
    (logits_temperature_division, "MULTIPLY by it"),
    (logits_transposed, "(texts, images)"),
    (logits_batch_norm, "COLUMN"),
    (logits_clamped_inside, None),
])
def test_clip_logits_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "clip_logits", wrong, hint)


def test_clip_logits_with_cosine_similarity_is_accepted():
    assert_accepts(ag.CHECKS, "clip_logits", logits_with_cosine_similarity)


# --- clip_loss ------------------------------------------------------------------------------------

def loss_rows_only(logits):
    return -logits.log_softmax(1).diagonal().mean()


def loss_sum(logits):
    return -(logits.log_softmax(1).diagonal().mean() + logits.log_softmax(0).diagonal().mean())


def loss_log_of_softmax(logits):
    rows = torch.log(logits.softmax(1)).diagonal().mean()
    cols = torch.log(logits.softmax(0)).diagonal().mean()
    return -(rows + cols) / 2


def loss_with_cross_entropy(logits):  # right value, forbidden route
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def loss_with_nn_module(logits):
    labels = torch.arange(len(logits))
    ce = torch.nn.CrossEntropyLoss()
    return (ce(logits, labels) + ce(logits.T, labels)) / 2


def loss_with_nll(logits):
    labels = torch.arange(len(logits))
    return (F.nll_loss(logits.log_softmax(1), labels) + F.nll_loss(logits.T.log_softmax(1), labels)) / 2


def loss_same_axis_twice(logits):
    return -(logits.log_softmax(1).diagonal().mean() + logits.T.log_softmax(0).diagonal().mean()) / 2


def loss_whole_matrix(logits):
    return -logits.flatten().log_softmax(0).reshape(logits.shape).diagonal().mean()


def loss_batch_sum(logits):
    return -(logits.log_softmax(1).diagonal().sum() + logits.log_softmax(0).diagonal().sum()) / 2


def loss_logsumexp(logits):  # another correct route
    d = logits.diagonal()
    return ((logits.logsumexp(1) - d).mean() + (logits.logsumexp(0) - d).mean()) / 2


@pytest.mark.parametrize("wrong, hint", [
    (loss_rows_only, "only the image -> text half"),
    (loss_sum, "SUM of the two"),
    (loss_log_of_softmax, None),  # right on small logits; the hidden case at scale 100 catches it (below)
    (loss_with_cross_entropy, "F.cross_entropy, nn.CrossEntropyLoss and F.nll_loss are not allowed"),
    (loss_with_nn_module, "are not allowed"),
    (loss_with_nll, "are not allowed"),
    (loss_same_axis_twice, "only the image -> text half"),
    (loss_whole_matrix, "all N x N entries"),
    (loss_batch_sum, "sums over the N pairs"),
])
def test_clip_loss_rejects(wrong, hint):
    if wrong is loss_log_of_softmax:
        report = evaluate(ag.CHECKS["clip_loss"], wrong, seed=0, hidden=True)
        assert not report.passed and "use log_softmax, which subtracts the" in report.summary()
    else:
        assert_rejects(ag.CHECKS, "clip_loss", wrong, hint)


def test_clip_loss_with_exp_overflow_is_told_why():
    def naive(logits):
        p_rows = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
        p_cols = torch.exp(logits) / torch.exp(logits).sum(0, keepdim=True)
        return -(p_rows.diagonal().log().mean() + p_cols.diagonal().log().mean()) / 2
    report = evaluate(ag.CHECKS["clip_loss"], naive, seed=0, hidden=True)
    assert not report.passed and "NaN" in report.summary() and "subtracting the maximum" in report.summary()


def test_clip_loss_with_logsumexp_is_accepted():
    assert_accepts(ag.CHECKS, "clip_loss", loss_logsumexp)


# --- zero_shot_classifier -------------------------------------------------------------------------

def zs_no_renorm(class_text_features):
    return F.normalize(class_text_features, dim=-1).mean(1)


def zs_mean_first(class_text_features):
    return F.normalize(class_text_features.mean(1), dim=-1)


def zs_raw(class_text_features):
    return class_text_features.mean(1)


def zs_wrong_axis(class_text_features):
    return F.normalize(F.normalize(class_text_features, dim=1).mean(1), dim=-1)


def zs_over_classes(class_text_features):
    return F.normalize(F.normalize(class_text_features, dim=-1).mean(0), dim=-1)


def zs_first_template(class_text_features):
    return F.normalize(class_text_features[:, 0], dim=-1)


def zs_sum_then_normalise(class_text_features):  # another correct route: the sum points the same way
    return F.normalize(F.normalize(class_text_features, dim=-1).sum(1), dim=-1)


@pytest.mark.parametrize("wrong, hint", [
    (zs_no_renorm, "normalise the mean again"),
    (zs_mean_first, "long ones outweigh short ones"),
    (zs_raw, "plain mean of the raw features"),
    (zs_wrong_axis, "template axis"),
    (zs_over_classes, "averages over the classes"),
    (zs_first_template, None),
])
def test_zero_shot_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "zero_shot_classifier", wrong, hint)


def test_zero_shot_sum_is_accepted():
    assert_accepts(ag.CHECKS, "zero_shot_classifier", zs_sum_then_normalise)


# --- recall_at_k ----------------------------------------------------------------------------------

def _found(scores, k):
    return ((scores > scores.diagonal()[:, None]).sum(1) < k).float().mean()


def recall_swapped(similarity, k):
    return _found(similarity.T, k), _found(similarity, k)


def recall_lowest(similarity, k):
    return _found(-similarity, k), _found(-similarity.T, k)


def recall_at_most_k(similarity, k):  # found when at most k candidates beat it
    return _found(similarity, k + 1), _found(similarity.T, k + 1)


def recall_precision(similarity, k):
    return _found(similarity, k) / k, _found(similarity.T, k) / k


def recall_percent(similarity, k):
    return 100 * _found(similarity, k), 100 * _found(similarity.T, k)


def recall_same_twice(similarity, k):
    return _found(similarity, k), _found(similarity, k)


def recall_topk(similarity, k):  # another correct route
    n = len(similarity)
    i2t = (similarity.topk(min(k, n), dim=1).indices == torch.arange(n)[:, None]).any(1).float().mean()
    t2i = (similarity.T.topk(min(k, n), dim=1).indices == torch.arange(n)[:, None]).any(1).float().mean()
    return i2t, t2i


def recall_wrong_count(similarity, k):  # one tuple element only
    return _found(similarity, k)


@pytest.mark.parametrize("wrong, hint", [
    (recall_swapped, "swapped"),
    (recall_lowest, "LOWEST"),
    (recall_at_most_k, "top k + 1"),
    (recall_precision, "precision@k"),
    (recall_percent, "percent"),
    (recall_same_twice, "equals the image -> text one"),
    (recall_wrong_count, "expected a tuple of 2 results"),
])
def test_recall_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "recall_at_k", wrong, hint)


def test_recall_with_topk_is_accepted():
    assert_accepts(ag.CHECKS, "recall_at_k", recall_topk)
