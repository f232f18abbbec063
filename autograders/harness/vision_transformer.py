"""Tasks of chapter 09, the Vision Transformer: inputs, calls and rules (what the grading sandbox sees).

Conventions (stated in the notebook): images are ``(B, C, H, W)``; patches are numbered row by row
(left to right, then top to bottom) and each is flattened channel-first as ``(C, p, p)``; a patch
embedding weight has ``nn.Conv2d``'s layout ``(d_model, C, p, p)``.
"""

from __future__ import annotations

import torch

from autograders.engine.core import Case, Forbid, Task, TaskSet, no_course_version, randn
from coursekit.vision import ViT, ViTConfig

CHAPTER = "09_vision_transformer"

NO_UNFOLD = Forbid("patchify with reshape and permute (or Tensor.unfold): F.unfold and nn.Unfold are not allowed",
                   ops=("aten.im2col",))
NO_FOLD = Forbid("unpatchify with reshape and permute: F.fold and nn.Fold are not allowed", ops=("aten.col2im",))
NO_CONV = Forbid("embed the patches with your patchify and a matrix product: convolutions (F.conv2d, nn.Conv2d) "
                 "are not allowed", functions=("conv2d",), ops=("aten.convolution",))
NO_CONV_IN_FORWARD = Forbid("the forward must embed the patches with embed_patches: calling the convolution "
                            "self.patch_embed(images) (or F.conv2d) is not allowed",
                            functions=("conv2d",), ops=("aten.convolution",))


# ---------------------------------------------------------------------------------------------
# 1-2. patchify / unpatchify

def _images(g, B, C, H, W, p):
    return {"images": randn(g, B, C, H, W), "patch_size": p}


PATCHIFY = Task(
    "patchify",
    cases=(
        Case("2 images 1x8x8, p=2", lambda g: _images(g, 2, 1, 8, 8, 2)),
        Case("3 images 3x8x12 (colour, not square), p=4", lambda g: _images(g, 3, 3, 8, 12, 4)),
        Case("p=1 (every pixel a patch)", lambda g: _images(g, 2, 2, 3, 5, 1), hidden=True),
        Case("one patch per image (p = image size)", lambda g: _images(g, 2, 3, 4, 4, 4), hidden=True),
        Case("1 image 2x6x9, p=3", lambda g: _images(g, 1, 2, 6, 9, 3), hidden=True),
        Case("16 images 1x16x16, p=4", lambda g: _images(g, 16, 1, 16, 16, 4), hidden=True),
    ),
    rules=(no_course_version("coursekit.vision:patchify", "coursekit.dit:patchify"), NO_UNFOLD,),
)


def _patches(g, B, C, H, W, p):
    n = (H // p) * (W // p)
    return {"patches": randn(g, B, n, C * p * p), "patch_size": p, "height": H, "width": W}


UNPATCHIFY = Task(
    "unpatchify",
    cases=(
        Case("2 images 1x8x8, p=2", lambda g: _patches(g, 2, 1, 8, 8, 2)),
        Case("3 images 3x8x12 (colour, not square), p=4", lambda g: _patches(g, 3, 3, 8, 12, 4)),
        Case("p=1", lambda g: _patches(g, 2, 2, 3, 5, 1), hidden=True),
        Case("one patch per image", lambda g: _patches(g, 2, 3, 4, 4, 4), hidden=True),
        Case("1 image 2x12x6, p=3 (taller than wide)", lambda g: _patches(g, 1, 2, 12, 6, 3), hidden=True),
    ),
    rules=(no_course_version("coursekit.vision:unpatchify", "coursekit.dit:unpatchify"), NO_FOLD,),
)


# ---------------------------------------------------------------------------------------------
# 3. the patch embedding

def _embed_inputs(g, B, C, H, W, p, d, scale=1.0):
    return {"images": randn(g, B, C, H, W, scale=scale), "weight": randn(g, d, C, p, p, scale=(C * p * p) ** -0.5),
            "bias": randn(g, d), "patch_size": p}


EMBED_PATCHES = Task(
    "embed_patches",
    cases=(
        Case("2 images 1x8x8, p=2, d_model=6", lambda g: _embed_inputs(g, 2, 1, 8, 8, 2, 6)),
        Case("2 images 3x8x8, p=4, d_model=10", lambda g: _embed_inputs(g, 2, 3, 8, 8, 4, 10)),
        Case("1x8x8, p=4, d_model=16 = C*p*p", lambda g: _embed_inputs(g, 3, 1, 8, 8, 4, 16)),
        Case("3x4x6, p=2, d_model=12 = C*p*p", lambda g: _embed_inputs(g, 2, 3, 4, 6, 2, 12), hidden=True),
        Case("p=1", lambda g: _embed_inputs(g, 2, 2, 3, 3, 1, 5), hidden=True),
        Case("32 images 1x16x16, p=4, d_model=64", lambda g: _embed_inputs(g, 32, 1, 16, 16, 4, 64), hidden=True),
        Case("colour, not square, large pixel values",
             lambda g: _embed_inputs(g, 2, 3, 8, 12, 4, 7, scale=10.0), hidden=True),
    ),
    rules=(NO_CONV,),
    uses=("patchify",),
)


# ---------------------------------------------------------------------------------------------
# 4. cls token and positions

def _cls_inputs(g, B, N, d):
    return {"patch_tokens": randn(g, B, N, d), "cls_token": randn(g, 1, 1, d), "pos_embed": randn(g, 1, N + 1, d)}


ADD_CLS_AND_POSITIONS = Task(
    "add_cls_and_positions",
    cases=(
        Case("batch 2, 4 patches, d_model=8", lambda g: _cls_inputs(g, 2, 4, 8)),
        Case("batch 3, 16 patches, d_model=12", lambda g: _cls_inputs(g, 3, 16, 12)),
        Case("batch 1", lambda g: _cls_inputs(g, 1, 9, 6), hidden=True),
        Case("one patch", lambda g: _cls_inputs(g, 4, 1, 8), hidden=True),
        Case("batch 16, 64 patches, d_model=32", lambda g: _cls_inputs(g, 16, 64, 32), hidden=True),
    ),
)


# ---------------------------------------------------------------------------------------------
# 5. the ViT forward

def random_vit_state(g: torch.Generator, config: ViTConfig) -> dict[str, torch.Tensor]:
    """Random values for every weight of a ViT with the chapter's attribute names (large enough that
    the cls token, the positions and every layer norm change the result)."""
    state = {}
    for name, value in ViT(config).state_dict().items():
        if name in ("cls_token", "pos_embed"):
            state[name] = randn(g, *value.shape, scale=0.5)
        elif "norm" in name and name.endswith("weight"):
            state[name] = 1.0 + randn(g, *value.shape, scale=0.3)
        elif value.dim() >= 2:
            fan_in = value[0].numel()
            state[name] = randn(g, *value.shape, scale=fan_in ** -0.5)
        else:
            state[name] = randn(g, *value.shape, scale=0.3)
    return state


def _vit_inputs(g, B, **sizes):
    config = ViTConfig(**sizes)
    images = torch.rand(B, config.channels, config.image_size, config.image_size, generator=g)
    return {"images": images, "config": config, "state": random_vit_state(g, config)}


def _call_vit(impl, inputs):
    model = impl(inputs["config"])
    try:
        model.load_state_dict(inputs["state"])
    except (RuntimeError, AttributeError) as exc:
        raise AttributeError("VisionTransformer must keep the given __init__ (patch_embed, cls_token, pos_embed, "
                             f"encoder, head) so that the checks can copy weights in: {str(exc)[:300]}") from None
    model.eval()
    return model(inputs["images"])


VISION_TRANSFORMER = Task(
    "VisionTransformer",
    cases=(
        Case("2 images 1x8x8, p=2, d_model=16, 2 heads, 1 layer, 3 classes",
             lambda g: _vit_inputs(g, 2, image_size=8, patch_size=2, channels=1, n_classes=3, d_model=16,
                                   n_heads=2, d_ff=32, n_layers=1)),
        Case("3 images 3x12x12, p=4, d_model=24, 4 heads, 2 layers, 5 classes",
             lambda g: _vit_inputs(g, 3, image_size=12, patch_size=4, channels=3, n_classes=5, d_model=24,
                                   n_heads=4, d_ff=48, n_layers=2)),
        Case("1 image", lambda g: _vit_inputs(g, 1, image_size=8, patch_size=4, channels=1, n_classes=2,
                                              d_model=8, n_heads=2, d_ff=16, n_layers=2), hidden=True),
        Case("one patch (p = image size)", lambda g: _vit_inputs(g, 2, image_size=4, patch_size=4, channels=2,
                                                                 n_classes=3, d_model=8, n_heads=1, d_ff=16,
                                                                 n_layers=1), hidden=True),
        Case("the chapter's size", lambda g: _vit_inputs(g, 4, image_size=16, patch_size=4, channels=1, n_classes=10,
                                                         d_model=64, n_heads=4, d_ff=128, n_layers=2), hidden=True),
        Case("3 layers, one head", lambda g: _vit_inputs(g, 2, image_size=6, patch_size=2, channels=1, n_classes=4,
                                                         d_model=12, n_heads=1, d_ff=24, n_layers=3), hidden=True),
    ),
    call=_call_vit,
    rules=(no_course_version("coursekit.vision:ViT"), NO_CONV_IN_FORWARD,),
    uses=("patchify", "embed_patches", "add_cls_and_positions"),
)


TASKS = TaskSet(CHAPTER, [PATCHIFY, UNPATCHIFY, EMBED_PATCHES, ADD_CLS_AND_POSITIONS, VISION_TRANSFORMER])
