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
    assert set(ag.CHECKS.checks) == {"greedy_decode", "CrossAttention", "DecoderBlock", "seq2seq_loss",
                                     "beam_search", "filter_logits"}


@pytest.mark.parametrize("name", list(ag.CHECKS.checks))
def test_solution_passes(name):
    assert_accepts(ag.CHECKS, name, getattr(sol, name))


@pytest.mark.parametrize("name", ["greedy_decode", "seq2seq_loss", "beam_search", "filter_logits"])
def test_stub_fails(name):
    text = assert_rejects(ag.CHECKS, name, not_implemented)
    assert "not implemented yet" in text


def test_stub_module_fails():
    class Stub(sol.CrossAttention):
        def forward(self, x, memory, memory_mask=None):
            raise NotImplementedError()
    assert "not implemented yet" in assert_rejects(ag.CHECKS, "CrossAttention", Stub)


def test_stub_block_fails():
    class Stub(sol.DecoderBlock):
        def forward(self, x, memory, memory_mask=None, causal=True):
            raise NotImplementedError()
    assert "not implemented yet" in assert_rejects(ag.CHECKS, "DecoderBlock", Stub)


def test_masks_follow_the_course_convention():
    """causal_mask is chapter 2's (True = may attend); to_torch_mask flips it for PyTorch's modules."""
    assert torch.equal(sol.causal_mask(4), torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.equal(sol.to_torch_mask(sol.causal_mask(4)), torch.ones(4, 4, dtype=torch.bool).triu(1))
    assert torch.equal(sol.from_torch_mask(sol.to_torch_mask(sol.causal_mask(3))), sol.causal_mask(3))
    float_mask = nn.Transformer.generate_square_subsequent_mask(4)
    assert torch.equal(sol.to_torch_mask(sol.causal_mask(4)), torch.isinf(float_mask))
    with pytest.raises(TypeError, match="boolean"):
        sol.to_torch_mask(torch.ones(2, 2))


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


# --- DecoderBlock ----------------------------------------------------------------------------------

def _block_forward(self, x, memory, memory_mask=None, causal=True, *, self_mask="course", pad="course",
                   post=None, residual_cross=True, queries_from_memory=False, no_ffn_residual=False):
    T = x.shape[1]
    allowed = sol.causal_mask(T)
    attn_mask = {"course": sol.to_torch_mask(allowed), "raw": allowed, None: None}[self_mask] if causal else None
    padding = None
    if memory_mask is not None:
        padding = {"course": sol.to_torch_mask(memory_mask), "raw": memory_mask, None: None}[pad]
    sa = lambda h: self.self_attn(h, h, h, attn_mask=attn_mask, need_weights=False)[0]  # noqa: E731
    if queries_from_memory:
        ca = lambda h: h + 0 * self.cross_attn(memory, h, h, need_weights=False)[0].mean()  # noqa: E731
    else:
        ca = lambda h: self.cross_attn(h, memory, memory, key_padding_mask=padding, need_weights=False)[0]  # noqa: E731
    ff = lambda h: self.linear2(torch.relu(self.linear1(h)))  # noqa: E731
    pre = self.norm_first if post is None else not post
    if pre:
        x = x + sa(self.norm1(x))
        x = (x + ca(self.norm2(x))) if residual_cross else ca(self.norm2(x))
        return (x + ff(self.norm3(x))) if not no_ffn_residual else ff(self.norm3(x))
    x = self.norm1(x + sa(x))
    x = self.norm2(x + ca(x)) if residual_cross else self.norm2(ca(x))
    return self.norm3(x + ff(x)) if not no_ffn_residual else self.norm3(ff(x))


def block_variant(**how):
    class Variant(sol.DecoderBlock):
        def forward(self, x, memory, memory_mask=None, causal=True):
            return _block_forward(self, x, memory, memory_mask, causal, **how)
    return Variant


class BlockAlwaysCausal(sol.DecoderBlock):
    def forward(self, x, memory, memory_mask=None, causal=True):
        return super().forward(x, memory, memory_mask, causal=True)


class BlockGelu(sol.DecoderBlock):
    def forward(self, x, memory, memory_mask=None, causal=True):
        relu = torch.relu
        torch.relu = F.gelu
        try:
            return super().forward(x, memory, memory_mask, causal)
        finally:
            torch.relu = relu


@pytest.mark.parametrize("wrong, hint", [
    (block_variant(self_mask="raw"), "to_torch_mask(causal_mask(T))"),
    (block_variant(self_mask=None), "without the causal mask"),
    (block_variant(pad="raw"), "to_torch_mask(memory_mask)"),
    (block_variant(pad=None), "padded memory positions"),
    (block_variant(post=True), "although norm_first=True"),
    (block_variant(post=False), "although norm_first=False"),
    (block_variant(residual_cross=False), "residual connection"),
    (BlockGelu, "ReLU"),
    (block_variant(no_ffn_residual=True), None),
    (block_variant(queries_from_memory=True), None),
    (BlockAlwaysCausal, None),
])
def test_block_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "DecoderBlock", wrong, hint)


class BlockByTorchLayer(sol.DecoderBlock):  # right numbers, from the library layer the check compares with
    def forward(self, x, memory, memory_mask=None, causal=True):
        layer = nn.TransformerDecoderLayer(x.shape[-1], self.self_attn.num_heads, self.linear1.out_features,
                                           dropout=0.0, batch_first=True, norm_first=self.norm_first).eval()
        own = dict(self.named_parameters())
        for name, p in layer.named_parameters():
            key = name.replace("multihead_attn.", "cross_attn.")
            p.data.copy_(own[key] if key in own else torch.zeros_like(p))
        T = x.shape[1]
        mask = sol.to_torch_mask(sol.causal_mask(T)) if causal else None
        padding = None if memory_mask is None else sol.to_torch_mask(memory_mask)
        return layer(x, memory, tgt_mask=mask, memory_key_padding_mask=padding)


class BlockHoldingTorchLayer(sol.DecoderBlock):
    def __init__(self, d_model, n_heads, d_ff, norm_first=False):
        super().__init__(d_model, n_heads, d_ff, norm_first)
        self.spare = nn.TransformerDecoderLayer(d_model, n_heads, d_ff, batch_first=True)


@pytest.mark.parametrize("wrong", [BlockByTorchLayer, BlockHoldingTorchLayer])
def test_block_with_the_library_layer_is_rejected_by_its_rule(wrong):
    text = assert_rejects(ag.CHECKS, "DecoderBlock", wrong)
    assert "broke a rule of the exercise: build the block from the given sub-modules" in text
    assert "TransformerDecoderLayer" in text
    assert nn.TransformerDecoderLayer.forward is ag.H._LIBRARY_FORWARD[nn.TransformerDecoderLayer]


def test_block_renamed_parameter_is_explained():
    class Renamed(nn.Module):
        def __init__(self, d_model, n_heads, d_ff, norm_first=False):
            super().__init__()
            self.attn = nn.MultiheadAttention(d_model, n_heads, bias=False, batch_first=True)

        def forward(self, x, memory, memory_mask=None, causal=True):
            return x
    assert_rejects(ag.CHECKS, "DecoderBlock", Renamed, "keep the given __init__")


def test_solution_block_trains_like_the_library_layer():
    """The block the model is built from computes what nn.TransformerDecoderLayer computes."""
    torch.manual_seed(0)
    block = sol.DecoderBlock(16, 4, 32).eval()
    layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            key = name.replace("multihead_attn.", "cross_attn.")
            own = dict(block.named_parameters())
            p.copy_(own[key] if key in own else torch.zeros_like(p))
        x, memory = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
        real = torch.tensor([[True, True, False], [True, True, True]])
        expected = layer(x, memory, tgt_mask=sol.to_torch_mask(sol.causal_mask(5)),
                         memory_key_padding_mask=sol.to_torch_mask(real))
        torch.testing.assert_close(block(x, memory, real), expected, atol=1e-5, rtol=1e-5)


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


# --- filter_logits -------------------------------------------------------------------------------

def filter_temperature_times(logits, temperature=1.0, top_k=None, top_p=None):
    return sol.filter_logits(logits * temperature * temperature, temperature, top_k, top_p)


def filter_p_then_k(logits, temperature=1.0, top_k=None, top_p=None):
    probs = sol.filter_logits(logits, temperature, None, top_p)
    return sol.filter_logits(probs.log(), 1.0, top_k, None) if top_k is not None else probs


def filter_not_renormalised(logits, temperature=1.0, top_k=None, top_p=None):
    kept = sol.filter_logits(logits, temperature, top_k, top_p) > 0
    return torch.softmax(logits / temperature, -1) * kept


def filter_strict_nucleus(logits, temperature=1.0, top_k=None, top_p=None):
    return ag._filter_wrong(crossing=False)(logits, temperature, top_k, top_p)


def filter_logits_returned(logits, temperature=1.0, top_k=None, top_p=None):  # log-probabilities, not probabilities
    return sol.filter_logits(logits, temperature, top_k, top_p).log()


def filter_top_k_off_by_one(logits, temperature=1.0, top_k=None, top_p=None):
    return sol.filter_logits(logits, temperature, None if top_k is None else top_k + 1, top_p)


def filter_top_p_on_raw_logits(logits, temperature=1.0, top_k=None, top_p=None):
    keep = sol.filter_logits(logits, 1.0, top_k, top_p) > 0  # the nucleus chosen before the temperature
    return torch.softmax((logits / temperature).masked_fill(~keep, float("-inf")), -1)


@pytest.mark.parametrize("wrong, hint", [
    (filter_temperature_times, "DIVIDED"),
    (filter_p_then_k, "top-k comes first"),
    (filter_not_renormalised, "do not sum to 1"),
    (filter_strict_nucleus, "crosses p"),
    (filter_top_p_on_raw_logits, "temperature comes first"),
    (filter_logits_returned, None),
    (filter_top_k_off_by_one, None),
])
def test_filter_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "filter_logits", wrong, hint)


def test_filter_bad_arguments_are_errors():
    logits = torch.zeros(1, 4)
    for kwargs in ({"temperature": 0.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            sol.filter_logits(logits, **kwargs)


def _notebook_function(name):
    """A function defined in a code cell after the last exercise (the grader does not run those cells)."""
    import nbformat

    from autograders.engine.core import defines
    from notebook_code import ROOT
    nb = nbformat.read(next((ROOT / "solutions" / ag.CHAPTER).glob("*.ipynb")), as_version=4)
    source = next(c.source for c in nb.cells if c.cell_type == "code" and defines(c.source, [name]))
    namespace = dict(vars(sol))
    exec(compile(source.split("\n\n\nlogits =")[0], f"<{name}>", "exec"), namespace)
    return namespace[name]


def test_sampling_is_reproducible_with_a_generator():
    sample_decode = _notebook_function("sample_decode")
    scorer = TinyScorer(6, 5, batch_size=4, generator=torch.Generator().manual_seed(0))
    a = sample_decode(scorer, 4, 5, torch.Generator().manual_seed(1), temperature=1.2, top_p=0.9)
    b = sample_decode(scorer, 4, 5, torch.Generator().manual_seed(1), temperature=1.2, top_p=0.9)
    assert torch.equal(a, b)
    greedy, _ = sol.greedy_decode(scorer, 4, 5)
    assert torch.equal(sample_decode(scorer, 4, 5, torch.Generator().manual_seed(2), top_k=1), greedy)
