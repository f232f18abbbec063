"""Chapter 03: the solution passes every check; plausible wrong answers and the stubs are rejected."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autograders import transformer_encoder as ag
from autograders.engine.core import evaluate, judge, make_inputs, produce
from checks_support import assert_accepts, assert_rejects
from notebook_code import load_solutions, not_implemented

sol = load_solutions(ag.CHAPTER)  # includes the notebook's given LayerNorm module


def test_every_exercise_has_a_check():
    assert set(ag.CHECKS.checks) == {"layer_norm", "FeedForward", "EncoderBlock", "TransformerEncoder"}


@pytest.mark.parametrize("name", list(ag.CHECKS.checks))
def test_solution_passes(name):
    assert_accepts(ag.CHECKS, name, getattr(sol, name))


@pytest.mark.parametrize("name", list(ag.CHECKS.checks))
def test_checks_emit_no_warnings(name):
    """Test cells must write nothing to stderr: the references must not warn (nested tensors etc.)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = evaluate(ag.CHECKS[name], getattr(sol, name), seed=0)
    assert report.passed


def test_stub_layer_norm_fails():
    text = assert_rejects(ag.CHECKS, "layer_norm", not_implemented)
    assert "not implemented yet" in text


def test_stub_modules_fail():
    class StubFFN(sol.FeedForward):
        def forward(self, x):
            raise NotImplementedError()

    class StubBlock(sol.EncoderBlock):
        def forward(self, x, key_mask=None):
            raise NotImplementedError()

    class StubStack(sol.TransformerEncoder):
        def forward(self, x, key_mask=None):
            raise NotImplementedError()

    for name, stub in [("FeedForward", StubFFN), ("EncoderBlock", StubBlock), ("TransformerEncoder", StubStack)]:
        assert "not implemented yet" in assert_rejects(ag.CHECKS, name, stub)


# --- the references: PyTorch's fast path computes the same function as its slow path ------------------

@pytest.mark.parametrize("check_name, case_name", [
    ("EncoderBlock", "batch 3, T=6, d_model=16, 4 heads, d_ff=32, padding"),
    ("EncoderBlock", "batch 2, T=5, d_model=8, 2 heads, d_ff=16"),
    ("TransformerEncoder", "3 layers, batch 3, T=6, d_model=16, 4 heads, padding"),
])
def test_reference_fast_path_equals_slow_path(check_name, case_name):
    check = ag.CHECKS[check_name]
    case = next(c for c in check.cases if c.name == case_name)
    inputs = make_inputs(case, seed=0)
    with torch.no_grad():
        fast = check.reference(inputs)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = check.reference(inputs)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    if inputs["key_mask"] is not None:  # padding positions are computed, not zeroed
        assert fast[~inputs["key_mask"]].abs().max() > 0.1


# --- layer_norm ---------------------------------------------------------------------------------

def ln_batch_axis(x, weight, bias, eps=1e-5):
    mean, var = x.mean(0, keepdim=True), x.var(0, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ln_torch_var(x, weight, bias, eps=1e-5):
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)  # unbiased by default
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ln_std_plus_eps(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / (x.std(-1, keepdim=True, unbiased=False) + eps) * weight + bias


def ln_one_pass(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = (x ** 2).mean(-1, keepdim=True) - mean ** 2
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ln_no_affine(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)


def ln_no_centering(x, weight, bias, eps=1e-5):  # RMSNorm, a different normalisation
    return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps) * weight + bias


def ln_weight_bias_swapped(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps) * bias + weight


@pytest.mark.parametrize("wrong, hint", [
    (ln_batch_axis, "axis 0"),
    (ln_torch_var, "d - 1"),
    (ln_std_plus_eps, "inside the square root"),
    (ln_one_pass, None),  # caught by a hidden case (see below)
    (ln_no_affine, "not scaled and shifted"),
    (ln_no_centering, None),
    (ln_weight_bias_swapped, None),
])
def test_layer_norm_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "layer_norm", wrong, hint)


def _centred(x):
    return x - x.mean(-1, keepdim=True)


@pytest.mark.parametrize("forbidden", [
    lambda x, weight, bias, eps=1e-5: F.layer_norm(x, x.shape[-1:], weight, bias, eps),
    lambda x, weight, bias, eps=1e-5: torch.layer_norm(x, x.shape[-1:], weight, bias, eps),
    lambda x, weight, bias, eps=1e-5: nn.functional.layer_norm(x, (weight.shape[0],), eps=eps) * weight + bias,
    lambda x, weight, bias, eps=1e-5: F.group_norm(x.reshape(-1, x.shape[-1]), 1, weight, bias, eps).reshape(x.shape),
    lambda x, weight, bias, eps=1e-5: F.instance_norm(x.reshape(-1, 1, x.shape[-1]), eps=eps).reshape(x.shape)
    * weight + bias,
    lambda x, weight, bias, eps=1e-5: F.batch_norm(x.reshape(-1, x.shape[-1]).T, None, None, training=True,
                                                   eps=eps).T.reshape(x.shape) * weight + bias,
    lambda x, weight, bias, eps=1e-5: F.rms_norm(_centred(x), x.shape[-1:], weight, eps) + bias,
], ids=["F.layer_norm", "torch.layer_norm", "layer_norm then affine", "group_norm", "instance_norm",
        "batch_norm", "rms_norm"])
def test_layer_norm_with_a_library_norm_is_rejected_by_its_rule(forbidden):
    text = assert_rejects(ag.CHECKS, "layer_norm", forbidden)
    assert "broke a rule of the exercise: compute the mean and the variance yourself" in text


def test_layer_norm_with_nn_layernorm_is_rejected_by_its_rule():
    def with_module(x, weight, bias, eps=1e-5):
        norm = nn.LayerNorm(x.shape[-1], eps=eps)
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
        return norm(x)
    text = assert_rejects(ag.CHECKS, "layer_norm", with_module)
    assert "F.layer_norm, nn.LayerNorm" in text and "it called layer_norm" in text


def test_layer_norm_one_pass_variance_gets_its_hint_when_graded():
    report = evaluate(ag.CHECKS["layer_norm"], ln_one_pass, seed=0, hidden=True)
    assert not report.passed and "mean(x^2) - mean(x)^2" in report.summary()


def test_layer_norm_without_eps_gives_nan_hint_when_graded():
    def no_eps(x, weight, bias, eps=1e-5):
        mean = x.mean(-1, keepdim=True)
        return (x - mean) / ((x - mean) ** 2).mean(-1, keepdim=True).sqrt() * weight + bias
    report = evaluate(ag.CHECKS["layer_norm"], no_eps, seed=0, hidden=True)
    assert not report.passed and "NaN" in report.summary() and "without eps" in report.summary()


# --- FeedForward --------------------------------------------------------------------------------

class FFNNoActivation(sol.FeedForward):
    def forward(self, x):
        return self.linear2(self.linear1(x))


class FFNReluTwice(sol.FeedForward):
    def forward(self, x):
        return F.relu(self.linear2(F.relu(self.linear1(x))))


class FFNGelu(sol.FeedForward):
    def forward(self, x):
        return self.linear2(F.gelu(self.linear1(x)))


class FFNResidual(sol.FeedForward):
    def forward(self, x):
        return x + super().forward(x)


class FFNReluFirst(sol.FeedForward):
    def forward(self, x):
        return self.linear2(self.linear1(F.relu(x)))


class FFNOwnLayers(nn.Module):  # renamed layers: the weights cannot be copied in
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.parametrize("wrong, hint", [
    (FFNNoActivation, "apply ReLU"),
    (FFNReluTwice, "only the hidden layer"),
    (FFNGelu, "GELU"),
    (FFNResidual, "residual connection belongs to the encoder block"),
    (FFNReluFirst, None),
    (FFNOwnLayers, "keep linear1 as an nn.Linear"),
])
def test_feed_forward_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "FeedForward", wrong, hint)


# --- EncoderBlock -------------------------------------------------------------------------------

def _attend(block, x, key_mask):
    padding = sol.attend_to_key_padding_mask(key_mask)
    return block.self_attn(x, x, x, key_padding_mask=padding, need_weights=False)[0]


class PreNorm(sol.EncoderBlock):
    def forward(self, x, key_mask=None):
        x = x + _attend(self, self.norm1(x), key_mask)
        return x + self.ffn(self.norm2(x))


class NoAttentionResidual(sol.EncoderBlock):
    def forward(self, x, key_mask=None):
        x = self.norm1(_attend(self, x, key_mask))
        return self.norm2(x + self.ffn(x))


class InvertedPadding(sol.EncoderBlock):  # True = padding, PyTorch's convention, passed as the key mask
    def forward(self, x, key_mask=None):
        return super().forward(x, None if key_mask is None else ~key_mask)


class KeyMaskUnconverted(sol.EncoderBlock):  # key mask handed to PyTorch without attend_to_key_padding_mask
    def forward(self, x, key_mask=None):
        attended = self.self_attn(x, x, x, key_padding_mask=key_mask, need_weights=False)[0]
        x = self.norm1(x + attended)
        return self.norm2(x + self.ffn(x))


class PaddingIgnored(sol.EncoderBlock):
    def forward(self, x, key_mask=None):
        return super().forward(x, None)


class NormBeforeAdding(sol.EncoderBlock):
    def forward(self, x, key_mask=None):
        x = x + self.norm1(_attend(self, x, key_mask))
        return x + self.norm2(self.ffn(x))


class OneNormTwice(sol.EncoderBlock):
    def forward(self, x, key_mask=None):
        x = self.norm1(x + _attend(self, x, key_mask))
        return self.norm1(x + self.ffn(x))


class ZeroedPadding(sol.EncoderBlock):  # what the nested-tensor fast path returns; the exercise says otherwise
    def forward(self, x, key_mask=None):
        out = super().forward(x, key_mask)
        return out if key_mask is None else out.masked_fill(~key_mask.unsqueeze(-1), 0.0)


class AttentionFromOriginalInput(sol.EncoderBlock):  # FFN residual adds the block input, not h
    def forward(self, x, key_mask=None):
        h = self.norm1(x + _attend(self, x, key_mask))
        return self.norm2(x + self.ffn(h))


@pytest.mark.parametrize("wrong, hint", [
    (PreNorm, "pre-norm"),
    (NoAttentionResidual, "without the residual"),
    (InvertedPadding, "wrong way round"),
    (KeyMaskUnconverted, "attend_to_key_padding_mask(key_mask)"),
    (PaddingIgnored, "ignores key_mask"),
    (NormBeforeAdding, "normalise the SUM"),
    (OneNormTwice, None),
    (ZeroedPadding, None),
    (AttentionFromOriginalInput, None),
])
def test_encoder_block_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "EncoderBlock", wrong, hint)


def test_block_with_renamed_attributes_gets_a_clear_error():
    class Renamed(nn.Module):
        def __init__(self, d_model, nhead, d_ff):
            super().__init__()
            self.attention = nn.MultiheadAttention(d_model, nhead, batch_first=True)

        def forward(self, x, key_mask=None):
            return x
    assert_rejects(ag.CHECKS, "EncoderBlock", Renamed, "self.self_attn")


# --- TransformerEncoder -------------------------------------------------------------------------

class NotChained(sol.TransformerEncoder):
    def forward(self, x, key_mask=None):
        out = x
        for block in self.layers:
            out = block(x, key_mask)
        return out


class FirstBlockRepeated(sol.TransformerEncoder):
    def forward(self, x, key_mask=None):
        for _ in self.layers:
            x = self.layers[0](x, key_mask)
        return x


class MaskOnlyFirst(sol.TransformerEncoder):
    def forward(self, x, key_mask=None):
        for i, block in enumerate(self.layers):
            x = block(x, key_mask if i == 0 else None)
        return x


class OuterResidual(sol.TransformerEncoder):
    def forward(self, x, key_mask=None):
        return x + super().forward(x, key_mask)


class ReversedOrder(sol.TransformerEncoder):
    def forward(self, x, key_mask=None):
        for block in reversed(self.layers):
            x = block(x, key_mask)
        return x


class ExtraFinalNorm(sol.TransformerEncoder):
    def forward(self, x, key_mask=None):
        return F.layer_norm(super().forward(x, key_mask), x.shape[-1:])


@pytest.mark.parametrize("wrong, hint", [
    (NotChained, "ORIGINAL input"),
    (FirstBlockRepeated, "self.layers[0]"),
    (MaskOnlyFirst, "first block only"),
    (OuterResidual, "residuals live inside the blocks"),
    (ReversedOrder, None),
    (ExtraFinalNorm, None),
])
def test_stack_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "TransformerEncoder", wrong, hint)


def test_stack_fails_when_the_block_is_wrong():
    class Stack(nn.Module):
        def __init__(self, d_model, nhead, d_ff, num_layers):
            super().__init__()
            self.layers = nn.ModuleList([PreNorm(d_model, nhead, d_ff) for _ in range(num_layers)])

        def forward(self, x, key_mask=None):
            for block in self.layers:
                x = block(x, key_mask)
            return x
    assert_rejects(ag.CHECKS, "TransformerEncoder", Stack)


# --- the block and the stack get a correct layer_norm ------------------------------------------

def ln_unbiased(x, weight, bias, eps=1e-5):  # what a wrong Exercise 1 would feed the notebook's LayerNorm
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(x.var(-1, keepdim=True) + eps) * weight + bias


@pytest.mark.parametrize("name", ["EncoderBlock", "TransformerEncoder"])
def test_a_wrong_layer_norm_does_not_fail_the_block_or_the_stack(name, monkeypatch):
    namespace = sol.layer_norm.__globals__  # the notebook's LayerNorm looks layer_norm up here
    monkeypatch.setitem(namespace, "layer_norm", ln_unbiased)
    check = ag.CHECKS[name]
    assert check.task.uses == ("layer_norm",)
    report = evaluate(check, namespace[name], seed=0, namespace=namespace)
    assert report.passed, report.summary()
    alone = judge(check, produce(check.task, namespace[name], 0, None, given={}, namespace=namespace), 0, None)
    assert not alone.passed  # without the given layer_norm the block would fail too


def test_key_mask_converter():
    key_mask = torch.tensor([[True, True, False]])
    assert torch.equal(sol.attend_to_key_padding_mask(key_mask), torch.tensor([[False, False, True]]))
    assert sol.attend_to_key_padding_mask(None) is None
    with pytest.raises(ValueError, match="True at real tokens"):
        sol.attend_to_key_padding_mask(torch.ones(1, 3))
