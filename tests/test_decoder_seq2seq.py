"""Chapter 04: the solution passes every check; plausible wrong answers and the stub are rejected."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autograders import decoder_seq2seq as ag
from autograders.engine.core import evaluate
from checks_support import assert_accepts, assert_rejects
from coursekit.seq2seq_data import BOS, EOS, PAD, TinyScorer, brute_force_best
from notebook_code import load_solutions, not_implemented

sol = load_solutions(ag.CHAPTER)


def test_every_exercise_has_a_check():
    assert set(ag.CHECKS.checks) == {"greedy_decode", "causal_mask", "CrossAttention", "seq2seq_loss",
                                     "beam_search"}


@pytest.mark.parametrize("name", list(ag.CHECKS.checks))
def test_solution_passes(name):
    assert_accepts(ag.CHECKS, name, getattr(sol, name))


@pytest.mark.parametrize("name", ["greedy_decode", "causal_mask", "seq2seq_loss", "beam_search"])
def test_stub_fails(name):
    text = assert_rejects(ag.CHECKS, name, not_implemented)
    assert "not implemented yet" in text


def test_stub_module_fails():
    class Stub(sol.CrossAttention):
        def forward(self, x, memory, memory_mask=None):
            raise NotImplementedError()
    assert "not implemented yet" in assert_rejects(ag.CHECKS, "CrossAttention", Stub)


# --- the references themselves ------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_reference_beam_agrees_with_brute_force_and_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    scorer = TinyScorer(6, 4, generator=g)
    tokens, score = ag._beam_ref(scorer, 4 ** 4, 4)
    best, best_score = brute_force_best(scorer, 6, 4)
    assert tokens.tolist() == best and math.isclose(score.item(), best_score, abs_tol=1e-5)
    g_tokens, g_score = ag._greedy_ref(scorer, 1, 4)
    b_tokens, b_score = ag._beam_ref(scorer, 1, 4)
    assert b_tokens.tolist() == g_tokens[0].tolist() and math.isclose(b_score.item(), g_score.item(), abs_tol=1e-5)


def test_beam_can_beat_greedy():
    """The notebook's example: beam 2 finds an output greedy misses (the brute-force best)."""
    scorer = TinyScorer(6, 5, generator=torch.Generator().manual_seed(181))
    _, g_score = sol.greedy_decode(scorer, 1, 5)
    tokens, score = sol.beam_search(scorer, 2, 5)
    best, best_score = brute_force_best(scorer, 6, 5)
    assert score.item() > g_score.item() + 0.5
    assert tokens.tolist() == best


def test_scorer_rejects_bad_prefixes():
    scorer = TinyScorer(6, 3, batch_size=2)
    with pytest.raises(ValueError, match="2-D"):
        scorer(torch.tensor([BOS]))
    with pytest.raises(ValueError, match="length"):
        scorer(torch.full((2, 4), BOS))
    with pytest.raises(ValueError, match="batch of 2"):
        scorer(torch.full((3, 1), BOS))
    with pytest.raises(ValueError, match="torch.long"):
        scorer(torch.full((2, 1), float(BOS)))


# --- greedy_decode --------------------------------------------------------------------------------

def greedy_sampling(next_log_probs, batch_size, max_len, bos_id=BOS, eos_id=EOS, pad_id=PAD):
    g = torch.Generator().manual_seed(0)
    prefix = torch.full((batch_size, 1), bos_id, dtype=torch.long)
    scores = torch.zeros(batch_size)
    done = torch.zeros(batch_size, dtype=torch.bool)
    for _ in range(max_len):
        lp = next_log_probs(prefix)
        tok = torch.multinomial(lp.exp(), 1, generator=g)[:, 0]
        scores += torch.where(done, 0.0, lp.gather(1, tok[:, None])[:, 0])
        tok = torch.where(done, pad_id, tok)
        done |= tok == eos_id
        prefix = torch.cat([prefix, tok[:, None]], 1)
        if done.all():
            break
    return prefix[:, 1:], scores


def greedy_eos_dropped(next_log_probs, batch_size, max_len, bos_id=BOS, eos_id=EOS, pad_id=PAD):
    tokens, scores = sol.greedy_decode(next_log_probs, batch_size, max_len, bos_id, eos_id, pad_id)
    return torch.where(tokens == eos_id, pad_id, tokens), scores


def greedy_hardcoded_ids(next_log_probs, batch_size, max_len, bos_id=BOS, eos_id=EOS, pad_id=PAD):
    return sol.greedy_decode(next_log_probs, batch_size, max_len)


@pytest.mark.parametrize("wrong, hint", [
    (ag._greedy_no_stop, "pad_id"),
    (ag._greedy_all_steps, "as soon as every row"),
    (ag._greedy_scores_after_eos, "do not add anything"),
    (ag._greedy_last_token_only, "whole prefix"),
    (ag._greedy_with_bos, "leading BOS"),
    (greedy_sampling, None),
    (greedy_eos_dropped, None),
])
def test_greedy_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "greedy_decode", wrong, hint)


def test_greedy_hardcoded_ids_fail_hidden():
    report = evaluate(ag.CHECKS["greedy_decode"], greedy_hardcoded_ids, seed=0, hidden=True)
    assert not report.passed


# --- causal_mask -----------------------------------------------------------------------------------

@pytest.mark.parametrize("wrong, hint", [
    (lambda T: torch.ones(T, T, dtype=torch.bool).triu(), "lower triangle"),
    (lambda T: torch.ones(T, T, dtype=torch.bool).tril(-1), "attend to itself"),
    (lambda T: torch.ones(T, T, dtype=torch.bool).triu(1), "forbidden"),
    (lambda T: nn.Transformer.generate_square_subsequent_mask(T), "bool tensor"),
    (lambda T: torch.ones(T, T).tril(), "bool tensor"),
    (lambda T: torch.ones(T, T, dtype=torch.bool), None),
])
def test_causal_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "causal_mask", wrong, hint)


# --- CrossAttention ------------------------------------------------------------------------------

class CrossSelf(sol.CrossAttention):
    def forward(self, x, memory, memory_mask=None):
        return super().forward(x, x, None)


class CrossInverted(sol.CrossAttention):
    def forward(self, x, memory, memory_mask=None):
        return super().forward(x, memory, None if memory_mask is None else ~memory_mask)


class CrossMaskIgnored(sol.CrossAttention):
    def forward(self, x, memory, memory_mask=None):
        return super().forward(x, memory, None)


class CrossAveragedWeights(sol.CrossAttention):
    def forward(self, x, memory, memory_mask=None):
        out, w = super().forward(x, memory, memory_mask)
        return out, w.mean(1)


class CrossNoProjection(sol.CrossAttention):
    def forward(self, x, memory, memory_mask=None):
        saved = self.W_o.weight.detach().clone()
        self.W_o.weight.copy_(torch.eye(self.d_model))
        try:
            return super().forward(x, memory, memory_mask)
        finally:
            self.W_o.weight.copy_(saved)


class CrossQueriesFromMemory(sol.CrossAttention):
    def forward(self, x, memory, memory_mask=None):
        return super().forward(memory, x, None)


@pytest.mark.parametrize("wrong, hint", [
    (CrossSelf, "keys and values must come"),
    (CrossInverted, "wrong way round"),
    (CrossMaskIgnored, "padded memory positions"),
    (CrossNoProjection, "output projection"),
    (ag._CrossScaleDModel, "sqrt(d_head)"),
    (ag._CrossBadSplit, "transpose(1, 2)"),
    (CrossAveragedWeights, "shape"),
    (CrossQueriesFromMemory, None),
])
def test_cross_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "CrossAttention", wrong, hint)


def test_cross_renamed_projection_is_explained():
    class Renamed(nn.Module):
        def __init__(self, d_model, n_heads):
            super().__init__()
            self.q = nn.Linear(d_model, d_model, bias=False)

        def forward(self, x, memory, memory_mask=None):
            return x, x
    assert_rejects(ag.CHECKS, "CrossAttention", Renamed, "self.W_q")


# --- seq2seq_loss ---------------------------------------------------------------------------------

def loss_softmax_over_time(logits, targets, pad_id, reduction="mean"):
    lp = torch.log_softmax(logits, dim=1)
    nll = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    keep = targets != pad_id
    return nll[keep].sum() if reduction == "sum" else nll[keep].mean()


def loss_no_log(logits, targets, pad_id, reduction="mean"):
    nll = -torch.softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    keep = targets != pad_id
    return nll[keep].sum() if reduction == "sum" else nll[keep].mean()


def loss_pad_as_target_zero(logits, targets, pad_id, reduction="mean"):  # padding counted as a target
    nll = -torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return nll.sum() if reduction == "sum" else nll.mean()


@pytest.mark.parametrize("wrong, hint", [
    (ag._loss_pad_counted, "padding positions"),
    (ag._loss_mean_all_positions, "number of real"),
    (ag._loss_mean_per_sequence, "each sequence"),
    (ag._loss_pad_zero, None),
    (ag._loss_always_mean, "reduction='sum'"),
    (loss_softmax_over_time, None),
    (loss_no_log, None),
    (loss_pad_as_target_zero, None),
])
def test_loss_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "seq2seq_loss", wrong, hint)


@pytest.mark.parametrize("forbidden", [
    lambda logits, targets, pad_id, reduction="mean": F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=pad_id, reduction=reduction),
    lambda logits, targets, pad_id, reduction="mean": torch.nn.CrossEntropyLoss(
        ignore_index=pad_id, reduction=reduction)(logits.transpose(1, 2), targets),
    lambda logits, targets, pad_id, reduction="mean": F.nll_loss(
        torch.log_softmax(logits, -1).flatten(0, 1), targets.flatten(), ignore_index=pad_id, reduction=reduction),
], ids=["F.cross_entropy", "nn.CrossEntropyLoss", "F.nll_loss"])
def test_loss_with_a_loss_function_is_rejected_by_its_rule(forbidden):
    text = assert_rejects(ag.CHECKS, "seq2seq_loss", forbidden)
    assert "broke a rule of the exercise: compute the loss from torch.log_softmax and gather yourself" in text


def test_loss_may_use_log_softmax():
    assert "log_softmax" not in str(ag.CHECKS["seq2seq_loss"].rules[0].functions)
    assert_accepts(ag.CHECKS, "seq2seq_loss", sol.seq2seq_loss)  # the solution calls torch.log_softmax


@pytest.mark.parametrize("wrong, hint", [
    (ag._loss_pad_zero, "pad_id argument"),
    (ag._loss_log_of_softmax, "log_softmax"),
])
def test_loss_hidden_cases_catch(wrong, hint):
    report = evaluate(ag.CHECKS["seq2seq_loss"], wrong, seed=0, hidden=True)
    assert not report.passed and hint in report.summary()


# --- beam_search -----------------------------------------------------------------------------------

def beam_with_bos(next_log_probs, beam_size, max_len, bos_id=BOS, eos_id=EOS):
    tokens, score = sol.beam_search(next_log_probs, beam_size, max_len, bos_id, eos_id)
    return torch.cat([torch.tensor([bos_id]), tokens]), score


def beam_returns_greedy(next_log_probs, beam_size, max_len, bos_id=BOS, eos_id=EOS):
    tokens, scores = sol.greedy_decode(next_log_probs, 1, max_len, bos_id, eos_id)
    return tokens[0], scores[0]


def beam_probability_not_log(next_log_probs, beam_size, max_len, bos_id=BOS, eos_id=EOS):
    tokens, score = sol.beam_search(next_log_probs, beam_size, max_len, bos_id, eos_id)
    return tokens, score.exp()


@pytest.mark.parametrize("wrong, hint", [
    (ag._beam_length_normalised, "per token"),
    (ag._beam_never_finishes, "finished"),
    (ag._beam_per_hypothesis, "rank all"),
    (ag._beam_last_score_only, "hypothesis's score plus"),
    (beam_with_bos, None),
    (beam_returns_greedy, None),
    (beam_probability_not_log, None),
])
def test_beam_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "beam_search", wrong, hint)
