"""coursekit.dit (the video DiT) and coursekit.moving_digits (its data and judge)."""

from __future__ import annotations

import pytest
import torch

from coursekit import dit as D
from coursekit import moving_digits as M


def _small(**kw):
    torch.manual_seed(0)
    config = dict(input_size=(4, 8, 8), patch_size=(2, 4, 4), in_channels=2, hidden_size=32, depth=3, num_heads=2,
                  num_classes=(10, 4))
    config.update(kw)
    return D.DiT(**config)


# --- patches -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, patch", [((2, 1, 4, 12, 12), (2, 4, 4)), ((1, 3, 6, 4, 2), (3, 2, 1)),
                                          ((2, 4, 2, 2, 2), (2, 2, 2))])
def test_patchify_round_trip_is_exact_and_tokens_are_tubelets(shape, patch):
    x = torch.randn(shape)
    tokens = D.patchify(x, patch)
    b, c, f, h, w = shape
    pf, ph, pw = patch
    assert tokens.shape == (b, (f // pf) * (h // ph) * (w // pw), pf * ph * pw * c)
    assert torch.equal(D.unpatchify(tokens, patch, shape[1:]), x)
    # the last token is the last box, values in (pf, ph, pw, c) order
    box = x[:, :, f - pf:, h - ph:, w - pw:].permute(0, 2, 3, 4, 1).reshape(b, -1)
    assert torch.equal(tokens[:, -1], box)


def test_patch_errors_are_clear():
    with pytest.raises(ValueError, match="not divisible"):
        D.patchify(torch.zeros(1, 1, 3, 8, 8), (2, 4, 4))
    with pytest.raises(ValueError, match="expected a clip"):
        D.patchify(torch.zeros(1, 8, 8), (2, 4, 4))
    with pytest.raises(ValueError, match="do not fit"):
        D.unpatchify(torch.zeros(1, 5, 32), (2, 4, 4), (1, 4, 8, 8))


# --- adaLN-Zero ----------------------------------------------------------------------------------

def test_a_fresh_dit_outputs_exactly_zero_and_every_block_is_the_identity():
    model = _small()
    x, t = torch.randn(3, 2, 4, 8, 8), torch.tensor([0, 50, 999])
    labels = torch.tensor([[1, 2], [10, 4], [9, 0]])
    assert torch.equal(model(x, t, labels), torch.zeros_like(x))
    c = model.condition(t, labels)
    tokens = torch.randn(3, model.num_tokens, 32)
    for block in model.blocks:
        assert torch.equal(block(tokens, c), tokens)


def test_zero_init_touches_only_the_modulation_and_the_final_linear():
    model = D.initialize_weights(_small(), zero=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    D.zero_init(model)
    for k, v in model.state_dict().items():
        should_be_zero = "adaLN_modulation" in k or k.startswith("final_layer.linear")
        if should_be_zero:
            assert bool((v == 0).all()) and (k.endswith("bias") or bool((before[k] != 0).any())), k
        else:
            assert torch.equal(v, before[k]), k


def test_block_equals_diffusers_ada_layer_norm_zero():
    from diffusers.models.normalization import AdaLayerNormZero

    torch.manual_seed(1)
    block = D.DiTBlock(32, 4)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    ada = AdaLayerNormZero(32)
    ada.linear.load_state_dict(block.adaLN_modulation[1].state_dict())
    x, c = torch.randn(2, 5, 32), torch.randn(2, 32)
    normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada(x, emb=c)
    y = x + gate_msa[:, None] * block.attn(normed)
    y = y + gate_mlp[:, None] * block.mlp(block.norm2(y) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
    torch.testing.assert_close(block(x, c), y, atol=1e-6, rtol=1e-6)


def test_attention_equals_torch_multihead_attention():
    torch.manual_seed(2)
    attn = D.Attention(16, 4)
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    ref.in_proj_weight.data.copy_(attn.qkv.weight)
    ref.in_proj_bias.data.copy_(attn.qkv.bias)
    ref.out_proj.weight.data.copy_(attn.proj.weight)
    ref.out_proj.bias.data.copy_(attn.proj.bias)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(attn(x), ref(x, x, x, need_weights=False)[0], atol=1e-6, rtol=1e-5)


# --- embeddings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden, grid", [(64, (2, 3, 3)), (32, (4, 2, 5)), (48, (1, 4, 4))])
def test_positions_equal_diffusers_3d_sincos(hidden, grid):
    from diffusers.models.embeddings import get_3d_sincos_pos_embed

    f, h, w = grid
    theirs = get_3d_sincos_pos_embed(hidden, (w, h), f).reshape(f * h * w, hidden).float()
    torch.testing.assert_close(D.sincos_pos_embed_3d(hidden, grid), theirs, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="multiple of 16"):
        D.sincos_pos_embed_3d(24, grid)


def test_timestep_embedding_equals_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 3, 250, 999])
    theirs = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(D.TimestepEmbedder.timestep_embedding(t, 256), theirs, atol=1e-5, rtol=1e-5)


def test_label_dropout_uses_the_null_labels():
    emb = D.LabelEmbedder((10, 4), 8, dropout_prob=1.0)
    labels = torch.tensor([[3, 1], [7, 2]])
    null = emb.null_labels(2)
    assert null.tolist() == [[10, 4], [10, 4]]
    torch.testing.assert_close(emb(labels, train=True), emb(null))
    assert not torch.allclose(emb(labels), emb(null))
    with pytest.raises(ValueError, match="column"):
        emb(torch.tensor([[1, 2, 3]]))


def test_dit_rejects_the_wrong_clip_shape():
    with pytest.raises(ValueError, match="expected clips"):
        _small()(torch.zeros(1, 2, 4, 8, 4), torch.tensor([0]), torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="not divisible"):
        D.DiT(input_size=(3, 8, 8), patch_size=(2, 4, 4))


def test_dit_learns_one_clip():
    model = _small(depth=1)
    x, t, y = torch.randn(1, 2, 4, 8, 8), torch.tensor([10]), torch.tensor([[1, 1]])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(model(x, t, y), x)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# --- moving digits -------------------------------------------------------------------------------

def test_clips_move_one_pixel_per_frame_in_their_direction():
    clips = M.make_clips(40, frames=4, size=12, seed=0, value_range=(0.0, 1.0))
    assert clips.videos.shape == (40, 1, 4, 12, 12) and clips.labels.shape == (40, 2)
    step = {0: (0, 1), 1: (0, -1), 2: (1, 0), 3: (-1, 0)}
    for v, d in zip(clips.videos, clips.directions.tolist()):
        dy, dx = step[d]
        for f in range(3):
            assert torch.equal(torch.roll(v[0, f], shifts=(dy, dx), dims=(0, 1)), v[0, f + 1])
    assert torch.equal(M.make_clips(5, seed=3).videos, M.make_clips(5, seed=3).videos)


def test_clip_errors_are_clear():
    with pytest.raises(ValueError, match="room"):
        M.make_clips(2, frames=6, size=12)
    with pytest.raises(ValueError, match="jitter"):
        M.make_clips(2, jitter=5)


def test_judge_reads_real_clips_and_rejects_wrong_labels():
    from coursekit.judge import get_judge

    judge = get_judge(8, (-1.0, 1.0), verbose=False)
    clips = M.make_clips(120, "test", seed=1)
    score = M.judge_clips(clips.videos, clips.digits, clips.directions, judge)
    assert score.direction == 1.0 and score.identity >= 0.8, score
    wrong = M.judge_clips(clips.videos, (clips.digits + 1) % 10, (clips.directions + 1) % 4, judge)
    assert wrong.direction == 0.0 and wrong.identity <= 0.1, wrong
    blank = M.judge_clips(torch.full_like(clips.videos, -1.0), clips.digits, clips.directions, judge)
    assert blank.identity <= 0.25
    with pytest.raises(ValueError, match="one digit and one direction"):
        M.judge_clips(clips.videos, clips.digits[:3], clips.directions, judge)


def test_frame_strip_lays_out_frames_in_rows():
    clips = M.make_clips(3, frames=4, size=12)
    strip = M.frame_strip(clips.videos)
    assert strip.shape == (3 * 13 - 1, 4 * 13 - 1)
    assert 0.0 <= strip.min() and strip.max() <= 1.0
