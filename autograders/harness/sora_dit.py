"""Tasks of chapter 15, Sora / DiT: inputs, calls and rules (what the grading sandbox sees).

Conventions (stated in the notebook): a clip is ``(B, C, F, H, W)``; a patch is ``(pf, ph, pw)`` (frames,
rows, columns); tokens are ``(B, N, pf*ph*pw*C)`` in (frame, row, column) order with each token's values
in (pf, ph, pw, channel) order. A DiT block is built as ``DiTBlock(hidden_size, num_heads, mlp_ratio)``
with the submodules ``norm1, attn, norm2, mlp, adaLN_modulation`` (``coursekit.dit``'s names, which are
DiT's) and called as ``block(x, c)``. The guided sampler is called as
``guided_sample(model, scheduler, x, labels, null_labels, guidance_scale)``.

Booleans and scalars come back as shape ``(1,)`` tensors (the engine's array transport keeps an axis).
"""

from __future__ import annotations

import torch
from torch import nn

from autograders.engine.core import Case, Forbid, Task, TaskSet, no_course_version, randn
from coursekit import dit as D
from coursekit.diffusion import DDIMScheduler

CHAPTER = "15_sora_dit"


def _seed(g: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=g))


def _tensor(value, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got a {type(value).__name__}")
    return value


NO_LIBRARY_REARRANGE = Forbid(
    "use reshape and permute (no convolution, no unfold, and no library rearrange such as einops): the point is "
    "to see which axis goes where",
    functions=("conv3d", "conv2d", "unfold", "fold", "pixel_shuffle", "pixel_unshuffle"),
    ops=("aten.convolution", "aten.im2col", "aten.col2im", "aten.unfold", "aten.pixel_shuffle",
         "aten.pixel_unshuffle"),
)


# coursekit's own versions of the exercises (chapter 9's 2-D patches too) may not stand in for them
COURSE_PATCHES = no_course_version("coursekit.dit:patchify", "coursekit.dit:unpatchify", "coursekit.vision:patchify",
                                   "coursekit.vision:unpatchify")


# ---------------------------------------------------------------------------------------------
# 1. patchify: clip -> spacetime tokens


def _clip_inputs(g, shape, patch):
    return {"x": randn(g, *shape), "patch": tuple(patch)}


def _call_patchify(impl, inputs):
    return _tensor(impl(inputs["x"].clone(), inputs["patch"]), "patchify's result")


PATCHIFY = Task(
    "patchify",
    cases=(
        Case("2 clips 1x4x12x12, patches 2x4x4", lambda g: _clip_inputs(g, (2, 1, 4, 12, 12), (2, 4, 4))),
        Case("3 channels, 2x4x6 clip, patches 1x2x3", lambda g: _clip_inputs(g, (1, 3, 2, 4, 6), (1, 2, 3))),
        Case("one patch per frame (pf=1), 4 latent channels", lambda g: _clip_inputs(g, (2, 4, 3, 4, 4), (1, 2, 2)),
             hidden=True),
        Case("the whole clip in one patch", lambda g: _clip_inputs(g, (2, 2, 2, 3, 3), (2, 3, 3)), hidden=True),
        Case("non-square patches 3x1x2, 5 clips", lambda g: _clip_inputs(g, (5, 2, 6, 3, 4), (3, 1, 2)), hidden=True),
        Case("1x1x1 patches (a token per voxel)", lambda g: _clip_inputs(g, (2, 3, 2, 2, 2), (1, 1, 1)), hidden=True),
    ),
    call=_call_patchify,
    output_names=("tokens",),
    rules=(NO_LIBRARY_REARRANGE, COURSE_PATCHES),
)


# ---------------------------------------------------------------------------------------------
# 2. unpatchify: tokens -> clip, and the round trip


def _token_inputs(g, b, c, fhw, patch):
    f, h, w = fhw
    pf, ph, pw = patch
    n = (f // pf) * (h // ph) * (w // pw)
    clip = randn(g, b, c, f, h, w)
    # the clip's tokens are made here, outside the rules' watch, by coursekit's patchify (Exercise 1's convention)
    return {"tokens": randn(g, b, n, pf * ph * pw * c), "patch": tuple(patch), "shape": (c, f, h, w),
            "clip": clip, "clip_tokens": D.patchify(clip, patch)}


def _call_unpatchify(impl, inputs):
    out = _tensor(impl(inputs["tokens"].clone(), inputs["patch"], inputs["shape"]), "unpatchify's result")
    # the round trip: the clip's tokens (from coursekit's patchify, made with the inputs) and back
    back = _tensor(impl(inputs["clip_tokens"].clone(), inputs["patch"], inputs["shape"]),
                   "unpatchify's result")
    return out, back


UNPATCHIFY = Task(
    "unpatchify",
    cases=(
        Case("2 clips 1x4x12x12, patches 2x4x4", lambda g: _token_inputs(g, 2, 1, (4, 12, 12), (2, 4, 4))),
        Case("3 channels, 2x4x6, patches 1x2x3", lambda g: _token_inputs(g, 1, 3, (2, 4, 6), (1, 2, 3))),
        Case("4 channels, pf=1", lambda g: _token_inputs(g, 2, 4, (3, 4, 4), (1, 2, 2)), hidden=True),
        Case("non-square patches 3x1x2", lambda g: _token_inputs(g, 5, 2, (6, 3, 4), (3, 1, 2)), hidden=True),
        Case("the whole clip in one patch", lambda g: _token_inputs(g, 2, 2, (2, 3, 3), (2, 3, 3)), hidden=True),
    ),
    call=_call_unpatchify,
    output_names=("clip from the tokens", "round trip unpatchify(patchify(clip))"),
    rules=(NO_LIBRARY_REARRANGE, COURSE_PATCHES),
)


# ---------------------------------------------------------------------------------------------
# 3. modulate


def _mod_inputs(g, b, n, d):
    return {"x": randn(g, b, n, d), "shift": randn(g, b, d), "scale": randn(g, b, d, scale=0.5)}


MODULATE = Task(
    "modulate",
    cases=(
        Case("2 samples, 5 tokens of 8", lambda g: _mod_inputs(g, 2, 5, 8)),
        Case("one sample, 18 tokens of 64", lambda g: _mod_inputs(g, 1, 18, 64)),
        Case("7 samples, one token", lambda g: _mod_inputs(g, 7, 1, 16), hidden=True),
        Case("zero shift and scale (the identity)", lambda g: {"x": randn(g, 3, 4, 8), "shift": torch.zeros(3, 8),
                                                               "scale": torch.zeros(3, 8)}, hidden=True),
        Case("4 samples, 9 tokens of 32", lambda g: _mod_inputs(g, 4, 9, 32), hidden=True),
    ),
    call=lambda impl, i: _tensor(impl(i["x"].clone(), i["shift"].clone(), i["scale"].clone()), "modulate's result"),
    output_names=("modulated tokens",),
    rules=(no_course_version("coursekit.dit:modulate"),),
)


# ---------------------------------------------------------------------------------------------
# 4. the DiT block (adaLN-Zero)


def randomized_block_state(block: nn.Module, seed: int) -> dict:
    """A state dict for a DiT block with every tensor random (the modulation too, so that shift, scale and
    gate all matter)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * (0.3 if v.ndim > 1 else 0.1) for k, v in block.state_dict().items()}


def _block_inputs(g, b, n, d, heads, mlp_ratio=4.0):
    return {"hidden_size": d, "num_heads": heads, "mlp_ratio": mlp_ratio, "x": randn(g, b, n, d), "c": randn(g, b, d),
            "seed": _seed(g)}


def _build(impl, inputs):
    block = impl(inputs["hidden_size"], inputs["num_heads"], inputs["mlp_ratio"])
    if not isinstance(block, nn.Module):
        raise TypeError(f"DiTBlock(...) must build an nn.Module, got a {type(block).__name__}")
    return block


def _call_block(impl, inputs):
    torch.manual_seed(inputs["seed"])
    fresh = _build(impl, inputs)
    with torch.no_grad():
        out = _tensor(fresh(inputs["x"].clone(), inputs["c"].clone()), "the block's output")
        identity = torch.tensor([float(torch.equal(out, inputs["x"]))])
        template = D.DiTBlock(inputs["hidden_size"], inputs["num_heads"], inputs["mlp_ratio"])
        state = randomized_block_state(template, inputs["seed"])
        mine = fresh.state_dict()
        if set(mine) != set(state):
            raise ValueError("your block's parameters are named " + ", ".join(sorted(mine)) + "; expected "
                             + ", ".join(sorted(state)) + " (norm1, attn = coursekit.dit.Attention, norm2, mlp = "
                             "coursekit.dit.Mlp, adaLN_modulation = Sequential(SiLU, Linear(hidden, 6 * hidden)); "
                             "LayerNorms without affine parameters)")
        for k, v in state.items():
            if mine[k].shape != v.shape:
                raise ValueError(f"your {k} has shape {tuple(mine[k].shape)}, expected {tuple(v.shape)}")
        fresh.load_state_dict(state)
        trained = _tensor(fresh(inputs["x"].clone(), inputs["c"].clone()), "the block's output")
    return identity, trained


BLOCK = Task(
    "DiTBlock",
    cases=(
        Case("2 clips, 18 tokens of 64, 4 heads", lambda g: _block_inputs(g, 2, 18, 64, 4)),
        Case("one clip, 5 tokens of 16, 2 heads, MLP ratio 2", lambda g: _block_inputs(g, 1, 5, 16, 2, 2.0)),
        Case("3 clips, 9 tokens of 32, 1 head", lambda g: _block_inputs(g, 3, 9, 32, 1), hidden=True),
        Case("4 clips, one token of 24, 3 heads", lambda g: _block_inputs(g, 4, 1, 24, 3), hidden=True),
        Case("2 clips, 36 tokens of 48, 6 heads", lambda g: _block_inputs(g, 2, 36, 48, 6), hidden=True),
    ),
    call=_call_block,
    output_names=("a fresh block is the identity (1 = yes)", "output with random weights"),
    rules=(no_course_version("coursekit.dit:DiTBlock"),),
)


# ---------------------------------------------------------------------------------------------
# 5. zero_init: adaLN-Zero for the whole model


def _dit_inputs(g, input_size, patch, channels, hidden, depth, heads, b=2):
    f, h, w = input_size
    inputs = {"config": {"input_size": input_size, "patch_size": patch, "in_channels": channels, "hidden_size": hidden,
                         "depth": depth, "num_heads": heads, "num_classes": (10, 4)},
              "x": randn(g, b, channels, f, h, w), "t": torch.randint(0, 100, (b,), generator=g),
              "labels": torch.stack([torch.randint(0, 11, (b,), generator=g), torch.randint(0, 5, (b,), generator=g)], 1),
              "seed": _seed(g)}
    return {**inputs, "model": random_dit(inputs)}   # built here, outside the rules' watch


def random_dit(inputs) -> D.DiT:
    """A DiT of the inputs' configuration with every weight random and non-zero (no adaLN-Zero)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(inputs["seed"])
        model = D.DiT(**inputs["config"])
        D.initialize_weights(model, zero=False)
        g = torch.Generator().manual_seed(inputs["seed"] + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _call_zero_init(impl, inputs):
    model = inputs["model"]
    result = impl(model)
    if result is not None and result is not model:
        raise TypeError("zero_init must change the model in place (and may return it), not build a new one")
    with torch.no_grad():
        out = _tensor(model(inputs["x"], inputs["t"], inputs["labels"]), "the model's output")
        c = model.condition(inputs["t"], inputs["labels"])
        tokens = model.x_embedder(D.patchify(inputs["x"], model.patch_size)) + model.pos_embed
        residuals = []
        for block in model.blocks:
            nxt = block(tokens, c)
            residuals.append((nxt - tokens).abs().max())
            tokens = nxt
        after = model.state_dict()
        zero = torch.tensor([float(bool((after[k] == 0).all())) for k in sorted(after)])
    return out, torch.stack(residuals), zero


ZERO_INIT = Task(
    "zero_init",
    cases=(
        Case("clips 1x4x12x12, patches 2x4x4, width 64, depth 4", lambda g: _dit_inputs(g, (4, 12, 12), (2, 4, 4), 1, 64, 4, 4)),
        Case("4 channels 2x4x4, patches 1x2x2, width 32, depth 2", lambda g: _dit_inputs(g, (2, 4, 4), (1, 2, 2), 4, 32, 2, 2)),
        Case("depth 1, width 16", lambda g: _dit_inputs(g, (2, 4, 4), (2, 2, 2), 1, 16, 1, 2), hidden=True),
        Case("depth 6, width 48, 3 clips", lambda g: _dit_inputs(g, (4, 8, 8), (2, 4, 4), 2, 48, 6, 4, b=3), hidden=True),
    ),
    call=_call_zero_init,
    output_names=("the model's output", "largest change each block makes to its tokens",
                  "which parameters are all zero (1 = yes, sorted state_dict order)"),
    rules=(no_course_version("coursekit.dit:zero_init", "coursekit.dit:initialize_weights"),),
)


# ---------------------------------------------------------------------------------------------
# 6. the guided sampler


def _sampler_inputs(g, channels, input_size, patch, steps, scale, b=4, T=100, cosine=True, clip_sample=True):
    f, h, w = input_size
    inputs = {"config": {"input_size": input_size, "patch_size": patch, "in_channels": channels, "hidden_size": 32,
                         "depth": 2, "num_heads": 2, "num_classes": (10, 4)},
              "seed": _seed(g), "x": randn(g, b, channels, f, h, w),
              "labels": torch.stack([torch.randint(0, 10, (b,), generator=g), torch.randint(0, 4, (b,), generator=g)], 1),
              "guidance_scale": scale, "steps": steps, "T": T, "cosine": cosine, "clip_sample": clip_sample}
    return {**inputs, "model": random_dit(inputs)}   # built here, outside the rules' watch


def make_scheduler(inputs) -> DDIMScheduler:
    scheduler = DDIMScheduler(inputs["T"], "squaredcos_cap_v2" if inputs["cosine"] else "linear",
                              clip_sample=inputs["clip_sample"])
    scheduler.set_timesteps(inputs["steps"])
    return scheduler


class CountingModel(nn.Module):
    """The DiT, counting how many clips it was asked to denoise."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.clips = 0

    def forward(self, x, t, labels):
        self.clips += x.shape[0]
        return self.net(x, t, labels)


def _call_sampler(impl, inputs):
    model = CountingModel(inputs["model"])
    null = torch.tensor([[10, 4]]).expand(len(inputs["labels"]), -1).clone()
    with torch.no_grad():
        out = _tensor(impl(model, make_scheduler(inputs), inputs["x"].clone(), inputs["labels"].clone(), null,
                           inputs["guidance_scale"]), "guided_sample's result")
    return out, torch.tensor([float(model.clips)])


SAMPLER = Task(
    "guided_sample",
    cases=(
        Case("4 latent channels 2x4x4, 5 DDIM steps, scale 3", lambda g: _sampler_inputs(g, 4, (2, 4, 4), (1, 2, 2), 5, 3.0)),
        Case("1 channel 4x8x8, 4 steps, scale 2", lambda g: _sampler_inputs(g, 1, (4, 8, 8), (2, 4, 4), 4, 2.0, b=3)),
        Case("scale 1: the conditional model, one pass per step", lambda g: _sampler_inputs(g, 4, (2, 4, 4), (1, 2, 2), 3, 1.0),
             hidden=True),
        Case("scale 0: the unconditional model", lambda g: _sampler_inputs(g, 1, (2, 4, 4), (2, 2, 2), 3, 0.0), hidden=True),
        Case("4 channels, linear schedule, 8 steps, scale 5", lambda g: _sampler_inputs(
            g, 4, (2, 4, 4), (1, 2, 2), 8, 5.0, T=1000, cosine=False), hidden=True),
        Case("clip_sample=False, one step", lambda g: _sampler_inputs(g, 3, (2, 4, 4), (2, 2, 2), 1, 4.0, b=2,
                                                                      clip_sample=False), hidden=True),
    ),
    call=_call_sampler,
    output_names=("final sample", "clips the model denoised"),
    rules=(no_course_version("coursekit.diffusion:sample_loop", "coursekit.diffusion:guided",
                             "coursekit.diffusion:cfg_combine"),),
)


TASKS = TaskSet(CHAPTER, [PATCHIFY, UNPATCHIFY, MODULATE, BLOCK, ZERO_INIT, SAMPLER])
