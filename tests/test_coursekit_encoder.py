"""coursekit.encoder: the course's one encoder computes what PyTorch's nn.TransformerEncoder computes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from coursekit.encoder import (EncoderBlock, EncoderConfig, FeedForward, TransformerEncoder, count_parameters,
                               to_pytorch_mask, torch_encoder, torch_state_dict)


def _randomised(encoder: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (layer-norm scales and biases too), so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            scale = 0.3 if p.dim() < 2 else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.dim() < 2 else 0.0))
    return encoder


def _key_mask(B: int, T: int) -> torch.Tensor:
    """True at real tokens: one full sequence, the others half padding."""
    lengths = torch.tensor([T] + [max(1, T // 2)] * (B - 1))
    return torch.arange(T)[None, :] < lengths[:, None]


@pytest.mark.parametrize("norm_first, activation", [(False, "relu"), (True, "gelu"), (True, "relu"), (False, "gelu")])
@pytest.mark.parametrize("training", [False, True])
def test_equals_pytorch_encoder(norm_first, activation, training):
    config = EncoderConfig(d_model=16, n_heads=4, d_ff=40, n_layers=3, norm_first=norm_first, activation=activation)
    ours = _randomised(TransformerEncoder(config))
    theirs = torch_encoder(config)
    theirs.load_state_dict(torch_state_dict(ours))
    ours.train(training), theirs.train(training)
    x = torch.randn(3, 7, 16)
    key_mask = _key_mask(3, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mask in (None, key_mask):
            torch.testing.assert_close(ours(x, mask), theirs(x, src_key_padding_mask=to_pytorch_mask(mask)),
                                       atol=1e-5, rtol=1e-5)


def test_pre_norm_stack_has_a_final_norm_and_post_norm_does_not():
    pre, post = EncoderConfig(norm_first=True), EncoderConfig(norm_first=False)
    assert isinstance(TransformerEncoder(pre).norm, nn.LayerNorm)
    assert isinstance(TransformerEncoder(post).norm, nn.Identity)
    assert isinstance(TransformerEncoder(EncoderConfig(norm_first=False, final_norm=True)).norm, nn.LayerNorm)


def test_block_attribute_names_are_chapter_03s():
    block = EncoderBlock(EncoderConfig())
    assert isinstance(block.self_attn, nn.MultiheadAttention) and block.self_attn.batch_first
    assert isinstance(block.ffn, FeedForward)
    assert isinstance(block.ffn.linear1, nn.Linear) and isinstance(block.ffn.linear2, nn.Linear)
    assert isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm)


def test_attention_weights_are_returned_per_head_and_respect_padding():
    config = EncoderConfig(d_model=8, n_heads=2, d_ff=16, n_layers=2, norm_first=True, activation="gelu")
    encoder = _randomised(TransformerEncoder(config)).eval()
    x, key_mask = torch.randn(2, 5, 8), _key_mask(2, 5)
    out, maps = encoder(x, key_mask, return_attention=True)
    torch.testing.assert_close(out, encoder(x, key_mask))
    assert len(maps) == 2 and maps[0].shape == (2, 2, 5, 5)
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(2, 2, 5))
    assert maps[0][1, :, :, ~key_mask[1]].abs().max() == 0  # no weight on padded keys


def test_attn_mask_is_passed_to_attention():
    config = EncoderConfig(d_model=8, n_heads=2, d_ff=16, n_layers=1)
    encoder = _randomised(TransformerEncoder(config)).eval()
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))  # True = may attend: keys up to the query
    x = torch.randn(1, 4, 8)
    y = x.clone()
    y[0, 3] += 5.0  # a change at the last position cannot reach earlier ones under a causal mask
    a, b = encoder(x, attn_mask=causal), encoder(y, attn_mask=causal)
    torch.testing.assert_close(a[0, :3], b[0, :3])
    assert (encoder(x)[0, :3] - encoder(y)[0, :3]).abs().max() > 1e-3  # without the mask it does
    theirs = torch_encoder(config)
    theirs.load_state_dict(torch_state_dict(encoder))
    torch.testing.assert_close(a, theirs.eval()(x, mask=to_pytorch_mask(causal)), atol=1e-5, rtol=1e-5)


def test_parameter_count_matches_the_formula():
    d, f, n = 16, 40, 3
    encoder = TransformerEncoder(EncoderConfig(d_model=d, n_heads=4, d_ff=f, n_layers=n, norm_first=True))
    per_block = (4 * d * d + 4 * d) + (2 * d * f + f + d) + 4 * d
    assert count_parameters(encoder) == n * per_block + 2 * d


@pytest.mark.parametrize("kwargs, message", [
    ({"d_model": 10, "n_heads": 4}, "divisible"),
    ({"activation": "swish"}, "activation"),
    ({"n_layers": 0}, "positive"),
    ({"dropout": 1.0}, "dropout"),
])
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EncoderConfig(**kwargs)


def test_bad_inputs_get_clear_errors():
    encoder = TransformerEncoder(EncoderConfig(d_model=8, n_heads=2, d_ff=16, n_layers=1))
    with pytest.raises(ValueError, match=r"\(B, T, d_model=8\)"):
        encoder(torch.randn(5, 8))
    with pytest.raises(ValueError, match="key_mask"):
        encoder(torch.randn(2, 5, 8), key_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="attn_mask"):
        encoder(torch.randn(2, 5, 8), attn_mask=torch.ones(4, 4, dtype=torch.bool))
