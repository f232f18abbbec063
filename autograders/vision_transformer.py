"""Checks of chapter 09, the Vision Transformer: references, tolerances, classic mistakes.

References are PyTorch's own operators wherever one exists:

* ``patchify``: ``F.unfold(images, p, stride=p).transpose(1, 2)`` -- im2col lists patches row by row
  and flattens each as ``(C, p, p)``, the chapter's stated order;
* ``unpatchify``: ``F.fold``, its inverse;
* ``embed_patches``: ``F.conv2d(images, weight, bias, stride=p)`` flattened to ``(B, N, d)`` -- the
  patch embedding IS a strided convolution;
* ``VisionTransformer``: that convolution, the cls token and positions, then PyTorch's
  ``nn.TransformerEncoder`` (pre-norm, GELU, a final LayerNorm) with the same weights, and the head on
  the cls token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autograders.engine.core import EXACT, Check, CheckSet, Mistake, Tolerance
from autograders.harness import vision_transformer as H
from coursekit.encoder import torch_encoder, torch_state_dict
from coursekit.vision import ViT

CHAPTER = H.CHAPTER

EMBED_TOL = Tolerance(1e-5, 1e-5, "float32 sums of up to 48 products, compared with a convolution kernel that "
                                  "adds them in another order (differences ~1e-6 relative)")
CLS_TOL = Tolerance(1e-6, 1e-6, "one float32 addition per number: every correct order gives the same result")
VIT_TOL = Tolerance(1e-4, 1e-4, "float32 through up to 3 blocks, compared with PyTorch's fused encoder kernels, "
                                "which order the sums differently (~1e-5 per block)")


# ---------------------------------------------------------------------------------------------
# 1. patchify

def _patchify_ref(i):
    p = i["patch_size"]
    return F.unfold(i["images"], p, stride=p).transpose(1, 2)


def _grid(images, p):
    B, C, H, W = images.shape
    return images.reshape(B, C, H // p, p, W // p, p), (B, C, H // p, W // p)


def _patchify_column_major(images, patch_size):
    x, (B, C, R, K) = _grid(images, patch_size)
    return x.permute(0, 4, 2, 1, 3, 5).reshape(B, R * K, -1)


def _patchify_channel_last(images, patch_size):
    x, (B, C, R, K) = _grid(images, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, R * K, -1)


def _patchify_plain_reshape(images, patch_size):
    B, C, H, W = images.shape
    return images.reshape(B, (H // patch_size) * (W // patch_size), -1)


def _patchify_transposed_patches(images, patch_size):
    x, (B, C, R, K) = _grid(images, patch_size)
    return x.permute(0, 2, 4, 1, 5, 3).reshape(B, R * K, -1)


PATCHIFY = Check(
    H.PATCHIFY, reference=_patchify_ref, tolerance=EXACT,
    mistakes=(
        Mistake("column-major patch order", _patchify_column_major,
                "your patches are numbered column by column (top to bottom first): number them row by row, "
                "left to right and then top to bottom -- permute the grid axes as (rows, columns)."),
        Mistake("channel-last patches", _patchify_channel_last,
                "each of your patches is flattened as (p, p, C), channel last: flatten it channel-first as "
                "(C, p, p), the layout of a Conv2d weight (and of F.unfold)."),
        Mistake("reshape without permute", _patchify_plain_reshape,
                "your result matches reshaping the image straight to (B, N, C*p*p): that cuts the image into "
                "strips of consecutive pixels, not p x p squares -- split H and W into (rows, p) and "
                "(columns, p) and permute before flattening."),
        Mistake("transposed patches", _patchify_transposed_patches,
                "inside each patch your pixels are read column by column: flatten a patch as (C, p_row, p_col)."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. unpatchify

def _unpatchify_ref(i):
    p = i["patch_size"]
    return F.fold(i["patches"].transpose(1, 2), (i["height"], i["width"]), p, stride=p)


def _unpatchify_generic(patches, patch_size, height, width, order):
    p = patch_size
    B, N, D = patches.shape
    C = D // (p * p)
    R, K = height // p, width // p
    if order == "column":
        x = patches.reshape(B, K, R, C, p, p).permute(0, 3, 2, 4, 1, 5)
    elif order == "channel_last":
        x = patches.reshape(B, R, K, p, p, C).permute(0, 5, 1, 3, 2, 4)
    else:
        raise ValueError(order)
    return x.reshape(B, C, height, width)


def _unpatchify_column_major(patches, patch_size, height, width):
    return _unpatchify_generic(patches, patch_size, height, width, "column")


def _unpatchify_channel_last(patches, patch_size, height, width):
    return _unpatchify_generic(patches, patch_size, height, width, "channel_last")


def _unpatchify_plain_reshape(patches, patch_size, height, width):
    B, N, D = patches.shape
    return patches.reshape(B, D // patch_size ** 2, height, width)


def _unpatchify_no_inverse_permute(patches, patch_size, height, width):
    p = patch_size
    B, N, D = patches.shape
    C = D // (p * p)
    # the permutation of patchify applied again instead of its inverse
    x = patches.reshape(B, height // p, width // p, C, p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, C, height, width)


UNPATCHIFY = Check(
    H.UNPATCHIFY, reference=_unpatchify_ref, tolerance=EXACT,
    mistakes=(
        Mistake("column-major patch order", _unpatchify_column_major,
                "your result puts patch n at column n // rows: patches are numbered row by row, so patch n sits "
                "at grid row n // (W/p), column n % (W/p)."),
        Mistake("channel-last patches", _unpatchify_channel_last,
                "your result reads each patch as (p, p, C): patchify flattened it channel-first, (C, p, p)."),
        Mistake("reshape without permute", _unpatchify_plain_reshape,
                "your result matches reshaping the patches straight to (B, C, H, W): undo patchify's permute "
                "first -- (B, rows, cols, C, p, p) -> (B, C, rows, p, cols, p)."),
        Mistake("forward permutation instead of its inverse", _unpatchify_no_inverse_permute,
                "your result applies patchify's permutation (0, 2, 4, 1, 3, 5) again: unpatchify needs its "
                "inverse, (0, 3, 1, 4, 2, 5)."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 3. embed_patches

def _embed_ref(i):
    p = i["patch_size"]
    return F.conv2d(i["images"], i["weight"], i["bias"], stride=p).flatten(2).transpose(1, 2)


def _patchify_given(images, patch_size):
    return F.unfold(images, patch_size, stride=patch_size).transpose(1, 2)


def _embed_channel_last_weight(images, weight, bias, patch_size):
    return _patchify_given(images, patch_size) @ weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).T + bias


def _embed_no_bias(images, weight, bias, patch_size):
    return _patchify_given(images, patch_size) @ weight.reshape(weight.shape[0], -1).T


def _embed_reshape_not_transpose(images, weight, bias, patch_size):
    return _patchify_given(images, patch_size) @ weight.reshape(-1, weight.shape[0]) + bias


def _embed_channels_first_output(images, weight, bias, patch_size):
    return _embed_ref({"images": images, "weight": weight, "bias": bias, "patch_size": patch_size}).transpose(1, 2)


EMBED_PATCHES = Check(
    H.EMBED_PATCHES, reference=_embed_ref, tolerance=EMBED_TOL,
    given={"patchify": _patchify_given},
    mistakes=(
        Mistake("weight flattened channel-last", _embed_channel_last_weight,
                "your result matches the weight flattened as (d, p, p, C): flatten it as it is stored, "
                "(d, C, p, p) -> (d, C*p*p), the same channel-first order as the patches."),
        Mistake("no bias", _embed_no_bias, "your result has no bias: add `bias` to every embedded patch."),
        Mistake("weight not transposed", _embed_reshape_not_transpose,
                "your result multiplies the patches by the flattened weight without transposing it "
                "(weight.reshape(C*p*p, d), or weight.reshape(d, C*p*p) where the two are the same size): "
                "a reshape is not a transpose -- use patches @ weight.reshape(d, -1).T."),
        Mistake("output (B, d, N)", _embed_channels_first_output,
                "your result is (B, d_model, N), the convolution's layout: return one row per patch, (B, N, d_model)."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 4. cls token and positions

def _cls_ref(i):
    x = i["patch_tokens"]
    return torch.cat([i["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + i["pos_embed"]


def _cls_at_end(patch_tokens, cls_token, pos_embed):
    return torch.cat([patch_tokens, cls_token.expand(len(patch_tokens), -1, -1)], dim=1) + pos_embed


def _cls_without_position(patch_tokens, cls_token, pos_embed):
    return torch.cat([cls_token.expand(len(patch_tokens), -1, -1), patch_tokens + pos_embed[:, 1:]], dim=1)


def _positions_shifted(patch_tokens, cls_token, pos_embed):
    N = patch_tokens.shape[1]
    return torch.cat([cls_token.expand(len(patch_tokens), -1, -1) + pos_embed[:, N:],
                      patch_tokens + pos_embed[:, :N]], dim=1)


def _no_positions(patch_tokens, cls_token, pos_embed):
    return torch.cat([cls_token.expand(len(patch_tokens), -1, -1), patch_tokens], dim=1)


def _cls_added_not_concatenated(patch_tokens, cls_token, pos_embed):
    return patch_tokens + cls_token + pos_embed[:, 1:]


ADD_CLS_AND_POSITIONS = Check(
    H.ADD_CLS_AND_POSITIONS, reference=_cls_ref, tolerance=CLS_TOL,
    mistakes=(
        Mistake("cls token last", _cls_at_end,
                "your cls token is appended after the patches: it goes FIRST, at position 0, where the head "
                "reads it."),
        Mistake("cls token without a position", _cls_without_position,
                "your cls token gets no positional embedding (pos_embed[:, 0] is unused): concatenate first, then "
                "add all N + 1 positions."),
        Mistake("positions shifted by one", _positions_shifted,
                "your patches get positions 0..N-1 and the cls token position N: position 0 belongs to the cls "
                "token, patch n gets position n + 1."),
        Mistake("no positions", _no_positions, "your result has no positional embeddings: add pos_embed."),
        Mistake("cls token added to every patch", _cls_added_not_concatenated,
                "your result adds the cls token to every patch: it is an extra token, concatenated in front, "
                "so the sequence grows from N to N + 1."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 5. the ViT forward

def _vit_ref(i):
    config, state, images = i["config"], i["state"], i["images"]
    x = F.conv2d(images, state["patch_embed.weight"], state["patch_embed.bias"], stride=config.patch_size)
    x = x.flatten(2).transpose(1, 2)                                           # (B, N, d)
    x = torch.cat([state["cls_token"].expand(len(images), -1, -1), x], dim=1) + state["pos_embed"]
    encoder = torch_encoder(config.encoder)
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in _torch_names(state).items()
                             if k.startswith("encoder.")})
    h = encoder.eval()(x)[:, 0]                                                # the cls token's output
    return F.linear(h, state["head.weight"], state["head.bias"])


def _torch_names(state):
    return {k.replace(".ffn.", "."): v for k, v in state.items()}


def _add_cls_given(patch_tokens, cls_token, pos_embed):
    return _cls_ref({"patch_tokens": patch_tokens, "cls_token": cls_token, "pos_embed": pos_embed})


def _embed_given(images, weight, bias, patch_size):
    # a matrix product, not the convolution: the given version must not use what the task forbids
    return _patchify_given(images, patch_size) @ weight.flatten(1).T + bias


class _MeanPooled(ViT):
    def forward(self, images):
        return self.head(self.encoder(self.tokens(images)).mean(dim=1))


class _LastToken(ViT):
    def forward(self, images):
        return self.head(self.encoder(self.tokens(images))[:, -1])


class _NoFinalNorm(ViT):
    def forward(self, images):
        x = self.tokens(images)
        for block in self.encoder.layers:
            x = block(x)
        return self.head(x[:, 0])


class _NoPositions(ViT):
    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(images), -1, -1), x], dim=1)
        return self.head(self.encoder(x)[:, 0])


class _PatchesOnly(ViT):
    def forward(self, images):
        return self.head(self.encoder(self.tokens(images))[:, 1:].mean(dim=1))


VISION_TRANSFORMER = Check(
    H.VISION_TRANSFORMER, reference=_vit_ref, tolerance=VIT_TOL,
    given={"patchify": _patchify_given, "embed_patches": _embed_given, "add_cls_and_positions": _add_cls_given},
    mistakes=(
        Mistake("mean over all tokens", _MeanPooled,
                "your result averages the encoder's outputs over the tokens: the ViT classifies from the cls "
                "token's output alone, x[:, 0]."),
        Mistake("last token", _LastToken,
                "your result reads the LAST token: the cls token is at position 0."),
        Mistake("no final layer norm", _NoFinalNorm,
                "your result skips the encoder's final LayerNorm (self.encoder.norm): call self.encoder(x), "
                "which applies the blocks AND the final norm."),
        Mistake("no positions", _NoPositions,
                "your result has no positional embeddings: use add_cls_and_positions."),
        Mistake("mean over the patches", _PatchesOnly,
                "your result averages the patch tokens' outputs: classify from the cls token, x[:, 0]."),
    ),
    describe_inputs=lambda i: f"images: {tuple(i['images'].shape)}, {i['config']}",
)


CHECKS = CheckSet(CHAPTER, [PATCHIFY, UNPATCHIFY, EMBED_PATCHES, ADD_CLS_AND_POSITIONS, VISION_TRANSFORMER])
check = CHECKS.check
