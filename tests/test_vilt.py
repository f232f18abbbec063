"""Chapter 11: the solution passes every check; plausible wrong answers and the stubs are rejected."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autograders import vilt as ag
from autograders.engine.core import evaluate, make_inputs
from autograders.harness import vilt as harness
from checks_support import assert_accepts, assert_rejects
from notebook_code import load_solutions, not_implemented

sol = load_solutions(ag.CHAPTER)
EXERCISES = {"fuse_inputs", "sample_negatives", "itm_loss", "whole_word_mask"}


def test_every_exercise_has_a_check_and_a_task():
    assert set(ag.CHECKS.checks) == EXERCISES == set(harness.TASKS.tasks)
    for check in ag.CHECKS:
        assert check.task is harness.TASKS[check.name]


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_solution_passes(name):
    assert_accepts(ag.CHECKS, name, getattr(sol, name))


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_solution_passes_hidden_cases(name):
    for seed in range(4):
        report = evaluate(ag.CHECKS[name], getattr(sol, name), seed=seed, hidden=True)
        assert report.passed, report.summary()


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_checks_emit_no_warnings(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = evaluate(ag.CHECKS[name], getattr(sol, name), seed=0, hidden=None)
    assert report.passed, report.summary()


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_stubs_fail(name):
    assert "not implemented yet" in assert_rejects(ag.CHECKS, name, not_implemented)


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="another class"):
        sol.sample_negatives(torch.tensor([3, 3, 3]), torch.rand(3, 3))
    with pytest.raises(ValueError, match=r"\(B, B\)"):
        sol.sample_negatives(torch.tensor([1, 2]), torch.rand(2, 3))
    with pytest.raises(ValueError, match="probability"):
        sol.whole_word_mask(torch.zeros(2, 3, dtype=torch.long), torch.rand(2, 3), 1.5)
    with pytest.raises(ValueError, match="do not fit"):
        sol.fuse_inputs(torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 3, 4),
                        torch.randn(4, 4), torch.randn(3, 4), torch.randn(2, 4))


def test_the_model_reads_text_first_and_pools_position_zero():
    model = sol.SingleStream()
    ids, mask = sol.all_ids[:2], sol.all_mask[:2]
    h = model(sol.train.images[:2], ids, mask)
    assert h.shape == (2, ids.shape[1] + 1 + (sol.IMAGE_SIZE // sol.PATCH) ** 2, sol.D_MODEL)
    assert model.type_embed.num_embeddings == 2 and model.itm_head.out_features == 2


# --- fuse_inputs -----------------------------------------------------------------------------------

def _mask(text_mask, image_embeds):
    return torch.cat([text_mask, torch.ones(image_embeds.shape[:2], dtype=torch.bool)], 1)


def fuse_types_swapped(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds):
    L = text_embeds.shape[1]
    x = torch.cat([text_embeds + text_pos[:L] + type_embeds[1], image_embeds + image_pos + type_embeds[0]], 1)
    return x, _mask(text_mask, image_embeds)


def fuse_no_types(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds):
    L = text_embeds.shape[1]
    return torch.cat([text_embeds + text_pos[:L], image_embeds + image_pos], 1), _mask(text_mask, image_embeds)


def fuse_image_first(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds):
    L = text_embeds.shape[1]
    x = torch.cat([image_embeds + image_pos + type_embeds[1], text_embeds + text_pos[:L] + type_embeds[0]], 1)
    m = torch.cat([torch.ones(image_embeds.shape[:2], dtype=torch.bool), text_mask], 1)
    return x, m


def fuse_image_not_positioned(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds):
    L = text_embeds.shape[1]
    x = torch.cat([text_embeds + text_pos[:L] + type_embeds[0], image_embeds + type_embeds[1]], 1)
    return x, _mask(text_mask, image_embeds)


def fuse_mask_all_true(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds):
    L = text_embeds.shape[1]
    x = torch.cat([text_embeds + text_pos[:L] + type_embeds[0], image_embeds + image_pos + type_embeds[1]], 1)
    return x, torch.ones(x.shape[:2], dtype=torch.bool)


def fuse_float_mask(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds):
    L = text_embeds.shape[1]
    x = torch.cat([text_embeds + text_pos[:L] + type_embeds[0], image_embeds + image_pos + type_embeds[1]], 1)
    return x, _mask(text_mask, image_embeds).float()


def fuse_positions_from_the_end(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds):
    L = text_embeds.shape[1]
    x = torch.cat([text_embeds + text_pos[-L:] + type_embeds[0], image_embeds + image_pos + type_embeds[1]], 1)
    return x, _mask(text_mask, image_embeds)


def fuse_with_embedding_lookup(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds):
    """Another correct route: type ids looked up in an nn.Embedding, as ViLT does."""
    B, L, _ = text_embeds.shape
    M = image_embeds.shape[1]
    table = torch.nn.Embedding.from_pretrained(type_embeds)
    type_ids = torch.cat([torch.zeros(B, L, dtype=torch.long), torch.ones(B, M, dtype=torch.long)], 1)
    x = torch.cat([text_embeds + text_pos[:L], image_embeds + image_pos], 1) + table(type_ids)
    return x, _mask(text_mask, image_embeds)


@pytest.mark.parametrize("wrong, hint", [
    (fuse_types_swapped, "text is type 0"),
    (fuse_no_types, "no modality-type embedding"),
    (fuse_image_first, "caption comes first"),
    (fuse_image_not_positioned, "bag without a layout"),
    (fuse_mask_all_true, "keep text_mask"),
    (fuse_float_mask, "must be a bool tensor"),
])
def test_fuse_inputs_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "fuse_inputs", wrong, hint)


def test_fuse_positions_from_the_end_fail_a_hidden_case():
    report = evaluate(ag.CHECKS["fuse_inputs"], fuse_positions_from_the_end, seed=0, hidden=True)
    assert not report.passed


def test_fuse_with_an_embedding_lookup_is_accepted():
    assert_accepts(ag.CHECKS, "fuse_inputs", fuse_with_embedding_lookup)


# --- sample_negatives ------------------------------------------------------------------------------

def neg_other_image(labels, scores):
    eye = torch.eye(len(labels), dtype=torch.bool)
    return torch.where(eye, torch.inf, scores).argmin(1)


def neg_roll(labels, scores):
    return torch.roll(torch.arange(len(labels)), -1)


def neg_argmax(labels, scores):
    other = labels[:, None] != labels[None, :]
    return torch.where(other, scores, -torch.inf).argmax(1)


def neg_transposed(labels, scores):
    other = labels[:, None] != labels[None, :]
    return torch.where(other, scores.T, torch.inf).argmin(1)


def neg_random(labels, scores):  # right idea, forbidden route: its own random numbers
    other = labels[:, None] != labels[None, :]
    return torch.where(other, torch.rand(scores.shape), torch.inf).argmin(1)


def neg_multinomial(labels, scores):
    other = (labels[:, None] != labels[None, :]).float()
    return torch.multinomial(other, 1).squeeze(1)


def neg_loop(labels, scores):  # another correct route
    out = []
    for i in range(len(labels)):
        allowed = [j for j in range(len(labels)) if labels[j] != labels[i]]
        out.append(min(allowed, key=lambda j: scores[i, j].item()))
    return torch.tensor(out)


@pytest.mark.parametrize("wrong, hint", [
    (neg_other_image, "SAME digit"),
    (neg_roll, "image i + 1"),
    (neg_argmax, "HIGHEST"),
    (neg_transposed, "row i of scores"),
    (neg_random, "draw none of your own"),
    (neg_multinomial, "draw none of your own"),
])
def test_sample_negatives_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "sample_negatives", wrong, hint)


def test_sample_negatives_loop_is_accepted():
    assert_accepts(ag.CHECKS, "sample_negatives", neg_loop)


# --- itm_loss --------------------------------------------------------------------------------------

def _labels(P, Q):
    return torch.cat([torch.ones(P, dtype=torch.long), torch.zeros(Q, dtype=torch.long)])


def itm_swapped(match_logits, mismatch_logits):
    return F.cross_entropy(torch.cat([match_logits, mismatch_logits]), 1 - _labels(len(match_logits), len(mismatch_logits)))


def itm_halves(match_logits, mismatch_logits):
    return (F.cross_entropy(match_logits, torch.ones(len(match_logits), dtype=torch.long))
            + F.cross_entropy(mismatch_logits, torch.zeros(len(mismatch_logits), dtype=torch.long))) / 2


def itm_bce(match_logits, mismatch_logits):
    logits = torch.cat([match_logits, mismatch_logits])[:, 1]
    return F.binary_cross_entropy_with_logits(logits, _labels(len(match_logits), len(mismatch_logits)).float())


def itm_probabilities(match_logits, mismatch_logits):
    logits = torch.cat([match_logits, mismatch_logits]).softmax(-1)
    return F.cross_entropy(logits, _labels(len(match_logits), len(mismatch_logits)))


def itm_sum(match_logits, mismatch_logits):
    return F.cross_entropy(torch.cat([match_logits, mismatch_logits]), _labels(len(match_logits), len(mismatch_logits)),
                           reduction="sum")


def itm_log_softmax(match_logits, mismatch_logits):  # another correct route
    logits = torch.cat([match_logits, mismatch_logits])
    labels = _labels(len(match_logits), len(mismatch_logits))
    return -logits.log_softmax(-1).gather(1, labels[:, None]).mean()


@pytest.mark.parametrize("wrong, hint", [
    (itm_swapped, "wrong way round"),
    (itm_bce, "binary cross-entropy"),
    (itm_probabilities, "applies its own"),
    (itm_sum, "take the mean"),
])
def test_itm_loss_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "itm_loss", wrong, hint)


def test_itm_loss_mean_of_halves_fails_the_unequal_hidden_case():
    report = evaluate(ag.CHECKS["itm_loss"], itm_halves, seed=0, hidden=True)
    assert not report.passed and "mean over ALL pairs" in report.summary()


def test_itm_loss_from_log_softmax_is_accepted():
    assert_accepts(ag.CHECKS, "itm_loss", itm_log_softmax)


# --- whole_word_mask -------------------------------------------------------------------------------

def _first(word_ids):
    before = torch.cat([torch.full_like(word_ids[:, :1], -1), word_ids[:, :-1]], 1)
    return (word_ids >= 0) & (word_ids != before)


def _spread(word_ids, drawn):
    same = (word_ids[:, :, None] == word_ids[:, None, :]) & (word_ids[:, :, None] >= 0)
    return (same & drawn[:, None, :]).any(-1)


def wwm_per_piece(word_ids, uniforms, probability):
    return (word_ids >= 0) & (uniforms < probability)


def wwm_any_piece(word_ids, uniforms, probability):
    return _spread(word_ids, (word_ids >= 0) & (uniforms < probability))


def wwm_first_only(word_ids, uniforms, probability):
    return _first(word_ids) & (uniforms < probability)


def wwm_greater(word_ids, uniforms, probability):
    return _spread(word_ids, _first(word_ids) & (uniforms > probability))


def wwm_specials(word_ids, uniforms, probability):
    before = torch.cat([torch.full_like(word_ids[:, :1], -2), word_ids[:, :-1]], 1)
    drawn = (word_ids != before) & (uniforms < probability)
    return ((word_ids[:, :, None] == word_ids[:, None, :]) & drawn[:, None, :]).any(-1)


def wwm_bernoulli(word_ids, uniforms, probability):  # forbidden: its own random numbers
    drawn = _first(word_ids) & torch.bernoulli(torch.full(word_ids.shape, float(probability))).bool()
    return _spread(word_ids, drawn)


def wwm_library_collator(word_ids, uniforms, probability):  # transformers' collator draws its own numbers
    from transformers.data.data_collator import DataCollatorForLanguageModeling

    drawn = torch.bernoulli(torch.full(word_ids.shape, float(probability))).bool() & _first(word_ids)
    return torch.from_numpy(np.asarray(DataCollatorForLanguageModeling._whole_word_mask(word_ids.numpy(),
                                                                                       drawn.numpy()), dtype=bool))


def wwm_float(word_ids, uniforms, probability):
    return _spread(word_ids, _first(word_ids) & (uniforms < probability)).float()


def wwm_loop(word_ids, uniforms, probability):  # another correct route
    out = torch.zeros(word_ids.shape, dtype=torch.bool)
    for b in range(word_ids.shape[0]):
        seen = {}
        for t in range(word_ids.shape[1]):
            w = int(word_ids[b, t])
            if w < 0:
                continue
            if w not in seen:
                seen[w] = bool(uniforms[b, t] < probability)
            out[b, t] = seen[w]
    return out


@pytest.mark.parametrize("wrong, hint", [
    (wwm_per_piece, "half masked"),
    (wwm_any_piece, "1 - (1 - p)^k"),
    (wwm_first_only, "mask every piece"),
    (wwm_greater, "rate of 1 - p"),
    (wwm_specials, "-1 is no word"),
    (wwm_bernoulli, "draw none of your own"),
    (wwm_library_collator, "library masking collator"),
    (wwm_float, "must return a bool tensor"),
])
def test_whole_word_mask_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "whole_word_mask", wrong, hint)


def test_whole_word_mask_loop_is_accepted():
    assert_accepts(ag.CHECKS, "whole_word_mask", wwm_loop)


def test_whole_word_mask_reference_is_the_collators_rate():
    """Over many words the reference draws a fraction p of the words, each masked whole."""
    g = torch.Generator().manual_seed(0)
    inputs = harness._mask_inputs(g, 2000, 12, 0.15)
    mask = ag._mask_ref(inputs).numpy()
    w = inputs["word_ids"].numpy()
    first = _first(inputs["word_ids"]).numpy()
    assert abs(mask[first].mean() - 0.15) < 0.01
    for b in range(50):
        for k in set(w[b][w[b] >= 0].tolist()):
            assert len(set(mask[b][w[b] == k].tolist())) == 1  # all pieces of a word together
    assert not mask[w < 0].any()


def test_word_ids_cases_have_multi_piece_words():
    case = harness.WHOLE_WORD_MASK.cases[0]
    w = make_inputs(case, 0)["word_ids"]
    assert (w[:, 0] == -1).all()
    assert any(int((row == k).sum()) > 1 for row in w for k in range(int(row.max()) + 1))


def test_the_collator_the_check_compares_with_may_not_compute_the_answer():
    """transformers' _whole_word_mask draws nothing, so only the call rule keeps it out: it scores 0."""
    from transformers.data.data_collator import DataCollatorForLanguageModeling

    def by_the_collator(word_ids, uniforms, probability):
        first = torch.ones_like(word_ids, dtype=torch.bool)
        first[:, 1:] = word_ids[:, 1:] != word_ids[:, :-1]
        drawn = (first & (word_ids >= 0) & (uniforms < probability)).numpy()
        return torch.from_numpy(np.asarray(DataCollatorForLanguageModeling._whole_word_mask(word_ids.numpy(), drawn),
                                           dtype=bool))

    assert_rejects(ag.CHECKS, "whole_word_mask", by_the_collator, hint="transformers' DataCollatorForLanguageModeling")
