"""Chapter 09: the solution passes every check; plausible wrong answers and the stubs are rejected."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autograders import vision_transformer as ag
from autograders.engine.core import evaluate
from autograders.harness import vision_transformer as harness
from checks_support import assert_accepts, assert_rejects
from notebook_code import load_solutions, not_implemented

sol = load_solutions(ag.CHAPTER)
EXERCISES = {"patchify", "unpatchify", "embed_patches", "add_cls_and_positions", "VisionTransformer"}


def test_every_exercise_has_a_check_and_a_task():
    assert set(ag.CHECKS.checks) == EXERCISES == set(harness.TASKS.tasks)
    for check in ag.CHECKS:
        assert check.task is harness.TASKS[check.name], "checks must use the harness's tasks"


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_solution_passes(name):
    assert_accepts(ag.CHECKS, name, getattr(sol, name))


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_checks_emit_no_warnings(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = evaluate(ag.CHECKS[name], getattr(sol, name), seed=0, hidden=None)
    assert report.passed, report.summary()


@pytest.mark.parametrize("name", ["patchify", "unpatchify", "embed_patches", "add_cls_and_positions"])
def test_stub_functions_fail(name):
    assert "not implemented yet" in assert_rejects(ag.CHECKS, name, not_implemented)


def test_stub_vit_fails():
    class Stub(sol.VisionTransformer):
        def forward(self, images):
            raise NotImplementedError()
    assert "not implemented yet" in assert_rejects(ag.CHECKS, "VisionTransformer", Stub)


def test_reference_patchify_is_the_stated_order():
    """F.unfold (the reference) numbers patches row by row and flattens them channel-first."""
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    ref = F.unfold(x, 2, stride=2).transpose(1, 2)
    assert torch.equal(ref[0, 1], x[0, :, 0:2, 2:4].flatten())
    assert torch.equal(ref[0, 3], x[0, :, 2:4, 0:2].flatten())


# --- patchify -------------------------------------------------------------------------------------

def patchify_column_major(images, patch_size):
    B, C, H, W = images.shape
    p = patch_size
    return images.reshape(B, C, H // p, p, W // p, p).permute(0, 4, 2, 1, 3, 5).reshape(B, -1, C * p * p)


def patchify_channel_last(images, patch_size):
    B, C, H, W = images.shape
    p = patch_size
    return images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, C * p * p)


def patchify_plain_reshape(images, patch_size):
    B, C, H, W = images.shape
    return images.reshape(B, (H // patch_size) * (W // patch_size), -1)


def patchify_with_unfold(images, patch_size):  # right answer, forbidden route
    return F.unfold(images, patch_size, stride=patch_size).transpose(1, 2)


def patchify_with_nn_unfold(images, patch_size):
    return nn.Unfold(patch_size, stride=patch_size)(images).transpose(1, 2)


def patchify_tensor_unfold(images, patch_size):  # allowed: views, not im2col
    B, C, H, W = images.shape
    p = patch_size
    x = images.unfold(2, p, p).unfold(3, p, p)              # (B, C, rows, cols, p, p)
    return x.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, C * p * p)


def patchify_overlapping(images, patch_size):  # stride 1: every window, not a tiling
    return F.pad(images, (0, 0)).unfold(2, patch_size, 1).unfold(3, patch_size, 1).flatten(2, 3).permute(
        0, 2, 1, 3, 4).flatten(2)


@pytest.mark.parametrize("wrong, hint", [
    (patchify_column_major, "column by column"),
    (patchify_channel_last, "channel last"),
    (patchify_plain_reshape, "strips of consecutive pixels"),
    (patchify_with_unfold, "F.unfold and nn.Unfold are not allowed"),
    (patchify_with_nn_unfold, "F.unfold and nn.Unfold are not allowed"),
    (patchify_overlapping, "wrong shape"),
])
def test_patchify_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "patchify", wrong, hint if hint != "wrong shape" else None)


def test_patchify_with_tensor_unfold_is_accepted():
    assert_accepts(ag.CHECKS, "patchify", patchify_tensor_unfold)


def test_channel_last_patches_are_caught_only_with_colour():
    """Grey images cannot tell (p, p, C) from (C, p, p); the 3-channel case must."""
    report = evaluate(ag.CHECKS["patchify"], patchify_channel_last, seed=0, hidden=False)
    assert {r.case for r in report.failures()} == {"3 images 3x8x12 (colour, not square), p=4"}


# --- unpatchify -----------------------------------------------------------------------------------

def unpatchify_column_major(patches, patch_size, height, width):
    B, N, D = patches.shape
    p = patch_size
    C = D // (p * p)
    return patches.reshape(B, width // p, height // p, C, p, p).permute(0, 3, 2, 4, 1, 5).reshape(B, C, height, width)


def unpatchify_plain_reshape(patches, patch_size, height, width):
    B, N, D = patches.shape
    return patches.reshape(B, -1, height, width)


def unpatchify_forward_permute(patches, patch_size, height, width):
    B, N, D = patches.shape
    p = patch_size
    C = D // (p * p)
    return patches.reshape(B, height // p, width // p, C, p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, C, height, width)


def unpatchify_with_fold(patches, patch_size, height, width):
    return F.fold(patches.transpose(1, 2), (height, width), patch_size, stride=patch_size)


def unpatchify_square_only(patches, patch_size, height, width):  # uses height for both sides
    return sol.unpatchify(patches, patch_size, height, height)


@pytest.mark.parametrize("wrong, hint", [
    (unpatchify_column_major, "row by row"),
    (unpatchify_plain_reshape, "undo patchify's permute"),
    (unpatchify_forward_permute, "needs its inverse"),
    (unpatchify_with_fold, "F.fold and nn.Fold are not allowed"),
    (unpatchify_square_only, None),
])
def test_unpatchify_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "unpatchify", wrong, hint)


# --- embed_patches --------------------------------------------------------------------------------

def embed_with_conv(images, weight, bias, patch_size):
    return F.conv2d(images, weight, bias, stride=patch_size).flatten(2).transpose(1, 2)


def embed_channel_last_weight(images, weight, bias, patch_size):
    return sol.patchify(images, patch_size) @ weight.permute(0, 2, 3, 1).flatten(1).T + bias


def embed_no_bias(images, weight, bias, patch_size):
    return sol.patchify(images, patch_size) @ weight.flatten(1).T


def embed_reshape_not_transpose(images, weight, bias, patch_size):
    return sol.patchify(images, patch_size) @ weight.reshape(-1, weight.shape[0]) + bias


def embed_no_transpose(images, weight, bias, patch_size):
    return sol.patchify(images, patch_size) @ weight.flatten(1) + bias


def embed_channels_first(images, weight, bias, patch_size):
    return (sol.patchify(images, patch_size) @ weight.flatten(1).T + bias).transpose(1, 2)


@pytest.mark.parametrize("wrong, hint", [
    (embed_with_conv, "convolutions (F.conv2d, nn.Conv2d) are not allowed"),
    (embed_channel_last_weight, "(d, p, p, C)"),
    (embed_no_bias, "no bias"),
    (embed_reshape_not_transpose, "a reshape is not a transpose"),
    (embed_no_transpose, "a reshape is not a transpose"),
    (embed_channels_first, "(B, d_model, N)"),
])
def test_embed_patches_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "embed_patches", wrong, hint)


def test_embed_patches_is_graded_with_a_given_patchify():
    """A wrong patchify costs points in Exercise 1 only: embed_patches is checked with a correct one."""
    namespace = {"patchify": patchify_column_major}
    exec("def embed(images, weight, bias, patch_size):\n"
         "    return patchify(images, patch_size) @ weight.flatten(1).T + bias\n", namespace)
    assert evaluate(ag.CHECKS["embed_patches"], namespace["embed"], seed=0).passed
    assert namespace["patchify"] is patchify_column_major  # restored afterwards


# --- add_cls_and_positions ------------------------------------------------------------------------

def cls_last(patch_tokens, cls_token, pos_embed):
    return torch.cat([patch_tokens, cls_token.expand(len(patch_tokens), -1, -1)], 1) + pos_embed


def cls_without_position(patch_tokens, cls_token, pos_embed):
    return torch.cat([cls_token.expand(len(patch_tokens), -1, -1), patch_tokens + pos_embed[:, 1:]], 1)


def positions_off_by_one(patch_tokens, cls_token, pos_embed):
    N = patch_tokens.shape[1]
    return torch.cat([cls_token.expand(len(patch_tokens), -1, -1) + pos_embed[:, N:],
                      patch_tokens + pos_embed[:, :N]], 1)


def no_positions(patch_tokens, cls_token, pos_embed):
    return torch.cat([cls_token.expand(len(patch_tokens), -1, -1), patch_tokens], 1)


def cls_not_expanded(patch_tokens, cls_token, pos_embed):  # works for batch 1 only
    return torch.cat([cls_token, patch_tokens], 1) + pos_embed


def cls_added(patch_tokens, cls_token, pos_embed):
    return patch_tokens + cls_token + pos_embed[:, 1:]


@pytest.mark.parametrize("wrong, hint", [
    (cls_last, "goes FIRST"),
    (cls_without_position, "gets no positional embedding"),
    (positions_off_by_one, "position 0 belongs to the cls"),
    (no_positions, "no positional embeddings"),
    (cls_not_expanded, "raised"),
    (cls_added, "sequence grows from N to N + 1"),
])
def test_add_cls_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "add_cls_and_positions", wrong, hint)


# --- VisionTransformer ----------------------------------------------------------------------------

def _with_forward(forward):
    return type("Wrong", (sol.VisionTransformer,), {"forward": forward})


def _tokens(self, images):
    tokens = sol.embed_patches(images, self.patch_embed.weight, self.patch_embed.bias, self.config.patch_size)
    return sol.add_cls_and_positions(tokens, self.cls_token, self.pos_embed)


MeanPooled = _with_forward(lambda self, images: self.head(self.encoder(_tokens(self, images)).mean(1)))
LastToken = _with_forward(lambda self, images: self.head(self.encoder(_tokens(self, images))[:, -1]))
UsesConv = _with_forward(lambda self, images: self.head(self.encoder(sol.add_cls_and_positions(
    self.patch_embed(images).flatten(2).transpose(1, 2), self.cls_token, self.pos_embed))[:, 0]))


def _no_final_norm(self, images):
    x = _tokens(self, images)
    for block in self.encoder.layers:
        x = block(x)
    return self.head(x[:, 0])


def _no_positions(self, images):
    tokens = sol.embed_patches(images, self.patch_embed.weight, self.patch_embed.bias, self.config.patch_size)
    x = torch.cat([self.cls_token.expand(len(images), -1, -1), tokens], 1)
    return self.head(self.encoder(x)[:, 0])


def _head_before_encoder(self, images):
    return self.head(_tokens(self, images)[:, 0])


NoFinalNorm = _with_forward(_no_final_norm)
NoPositions = _with_forward(_no_positions)
HeadBeforeEncoder = _with_forward(_head_before_encoder)


class RenamedAttributes(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embedding = nn.Conv2d(config.channels, config.d_model, config.patch_size, config.patch_size)

    def forward(self, images):
        return images


@pytest.mark.parametrize("wrong, hint", [
    (MeanPooled, "averages the encoder's outputs"),
    (LastToken, "LAST token"),
    (NoFinalNorm, "final LayerNorm"),
    (NoPositions, "no positional embeddings"),
    (UsesConv, "calling the convolution"),
    (HeadBeforeEncoder, None),
    (RenamedAttributes, "keep the given __init__"),
])
def test_vit_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "VisionTransformer", wrong, hint)


def test_vit_is_graded_with_given_helpers():
    """Wrong helpers cost points in their own exercises only: while the ViT is checked, the names it
    calls are bound to correct versions (in the notebook's namespace, as in grading)."""
    namespace = sol.VisionTransformer.forward.__globals__
    saved = {n: namespace[n] for n in ("embed_patches", "add_cls_and_positions")}
    namespace.update(embed_patches=embed_no_bias, add_cls_and_positions=cls_last)
    try:
        report = evaluate(ag.CHECKS["VisionTransformer"], sol.VisionTransformer, seed=0, namespace=namespace)
        assert report.passed, report.summary()
        assert namespace["embed_patches"] is embed_no_bias  # restored afterwards
    finally:
        namespace.update(saved)
