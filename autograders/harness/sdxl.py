"""Tasks of chapter 14, SDXL: inputs, calls and rules (what the grading sandbox sees).

Conventions (stated in the notebook): a text encoder's per-layer outputs are a tuple
``hidden_states = (embeddings, layer_1, ..., layer_L)`` of ``(B, S, d)`` tensors, as transformers'
``output_hidden_states=True`` returns them; sizes are ``(height, width)`` and crop corners ``(top, left)``
tuples of ints; timesteps are a decreasing int64 list walked by a sampler (a scheduler's ``timesteps``)
and ``alphas_cumprod[t]`` is the signal fraction of ``x_t``.

Rules: diffusers' own implementations of these steps (the pipelines' ``encode_prompt``, ``get_timesteps``
and ``_get_add_time_ids``, its ``get_timestep_embedding`` / ``Timesteps``) and the course's
``coursekit.unet.timestep_embedding`` would hand the answer over: the tasks forbid them with
``Forbid(callables=...)``, which sees a call however the function was reached (autograders/README.md).
"""

from __future__ import annotations

import math

import torch

from autograders.engine.core import Case, Forbid, Task, TaskSet, randn

CHAPTER = "14_sdxl"


# ---------------------------------------------------------------------------------------------
# Library functions that give an answer away (Forbid(callables=...): seen however they are reached)

_SDXL = "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl"
ENCODE_PROMPT = (f"{_SDXL}*:*.encode_prompt",)
ADD_TIME_IDS = (f"{_SDXL}*:*._get_add_time_ids", "diffusers.models.embeddings:get_timestep_embedding",
                "diffusers.models.embeddings:Timesteps", "coursekit.unet:timestep_embedding")
GET_TIMESTEPS = ("diffusers.pipelines.*:*.get_timesteps",)


def _seed(g: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=g))


def scaled_linear_alphas_cumprod(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Input data: abar of Stable Diffusion's (and SDXL's) ``scaled_linear`` schedule, float32."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, dim=0)


def leading_timesteps(T: int, n: int, offset: int = 0) -> torch.Tensor:
    """Input data: diffusers' ``"leading"`` spacing, ``arange(n) * (T // n) + offset`` reversed."""
    return (torch.arange(n, dtype=torch.int64) * (T // n) + offset).flip(0)


def trailing_timesteps(T: int, n: int) -> torch.Tensor:
    """Input data: diffusers' ``"trailing"`` spacing, ``round(arange(T, 0, -T/n)) - 1`` (SDXL's Euler default)."""
    import numpy as np

    return torch.from_numpy(np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1)


# ---------------------------------------------------------------------------------------------
# 1. two text encoders: the prompt embeddings SDXL's U-Net reads


def _text_inputs(g, B=2, S=7, d1=12, d2=20, layers1=4, layers2=6, pooled=16, clip_skip=None):
    return {"hidden_states_1": tuple(randn(g, B, S, d1) for _ in range(layers1 + 1)),
            "hidden_states_2": tuple(randn(g, B, S, d2) for _ in range(layers2 + 1)),
            "text_embeds_2": randn(g, B, pooled), "clip_skip": clip_skip}


def _call_text(impl, inputs):
    args = (tuple(h.clone() for h in inputs["hidden_states_1"]), tuple(h.clone() for h in inputs["hidden_states_2"]),
            inputs["text_embeds_2"].clone(), inputs["clip_skip"])
    out = impl(*args)
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        raise TypeError("sdxl_text_conditioning must return four tensors (prompt_embeds, pooled_prompt_embeds, "
                        "negative_prompt_embeds, negative_pooled_prompt_embeds)")
    return tuple(out)


TEXT = Task(
    "sdxl_text_conditioning",
    cases=(
        Case("2 prompts of 7 tokens, widths 12 + 20, pooled 16", lambda g: _text_inputs(g)),
        Case("clip_skip=1", lambda g: _text_inputs(g, clip_skip=1)),
        Case("SDXL's widths 768 + 1280 (pooled 1280), 3 tokens", lambda g: _text_inputs(
            g, B=1, S=3, d1=768, d2=1280, layers1=3, layers2=4, pooled=1280), hidden=True),
        Case("one prompt, clip_skip=2, widths 8 + 8", lambda g: _text_inputs(g, B=1, d1=8, d2=8, clip_skip=2), hidden=True),
        Case("4 prompts of 1 token, 2-layer encoders", lambda g: _text_inputs(g, B=4, S=1, layers1=2, layers2=2),
             hidden=True),
        Case("encoders of different depths, clip_skip=3", lambda g: _text_inputs(g, layers1=5, layers2=8, clip_skip=3),
             hidden=True),
    ),
    call=_call_text,
    output_names=("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"),
    rules=(Forbid("concatenate the encoders' outputs yourself: diffusers' encode_prompt is not allowed in "
                  "sdxl_text_conditioning", callables=ENCODE_PROMPT),),
)


# ---------------------------------------------------------------------------------------------
# 2. micro-conditioning: sizes, crop and (refiner) aesthetic score, embedded next to the pooled text


def _micro_inputs(g, B=2, pooled=16, embed_dim=8, original=(500, 375), crop=(12, 40), target=(1024, 1024),
                  aesthetic=None):
    return {"text_embeds": randn(g, B, pooled), "original_size": tuple(original), "crops_coords_top_left": tuple(crop),
            "target_size": tuple(target), "embed_dim": embed_dim, "aesthetic_score": aesthetic}


def _call_micro(impl, inputs):
    def run():
        return impl(inputs["text_embeds"].clone(), inputs["original_size"], inputs["crops_coords_top_left"],
                    inputs["target_size"], inputs["embed_dim"], inputs["aesthetic_score"])
    out = run()
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"micro_conditioning must return one tensor, got a {type(out).__name__}")
    return out


MICRO = Task(
    "micro_conditioning",
    cases=(
        Case("base: 2 prompts, pooled 16, 8-wide embeddings, original 500x375 cropped at (12, 40)",
             lambda g: _micro_inputs(g)),
        Case("refiner: aesthetic score 6.0 replaces target_size", lambda g: _micro_inputs(g, aesthetic=6.0)),
        Case("SDXL's base: pooled 1280, 256-wide, 1024x1024, no crop", lambda g: _micro_inputs(
            g, B=1, pooled=1280, embed_dim=256, original=(1024, 1024), crop=(0, 0)), hidden=True),
        Case("SDXL's refiner: pooled 1280, 256-wide, score 2.5", lambda g: _micro_inputs(
            g, B=1, pooled=1280, embed_dim=256, original=(768, 1344), crop=(0, 0), aesthetic=2.5), hidden=True),
        Case("3 prompts, 6-wide, small image upscaled", lambda g: _micro_inputs(
            g, B=3, pooled=5, embed_dim=6, original=(64, 48), crop=(3, 0), target=(512, 384)), hidden=True),
        Case("2-wide embeddings, a square crop", lambda g: _micro_inputs(
            g, B=2, pooled=4, embed_dim=2, original=(300, 300), crop=(7, 7), target=(256, 256)), hidden=True),
    ),
    call=_call_micro,
    output_names=("added conditioning vector",),
    rules=(Forbid("write the embedding yourself: diffusers' _get_add_time_ids, get_timestep_embedding and "
                  "Timesteps and coursekit.unet.timestep_embedding are not allowed in micro_conditioning",
                  callables=ADD_TIME_IDS),),
)


# ---------------------------------------------------------------------------------------------
# 3. img2img: noise the latents to strength s and keep the timesteps that remain


_GET_TIMESTEPS_RULE = ("find the timesteps yourself: the diffusers pipelines' get_timesteps is not allowed in "
                       "this exercise")


def _img2img_inputs(g, shape=(2, 4, 4, 4), T=1000, steps=50, strength=0.3, spacing="leading", offset=1):
    timesteps = leading_timesteps(T, steps, offset) if spacing == "leading" else trailing_timesteps(T, steps)
    return {"latents": randn(g, *shape), "noise": randn(g, *shape), "timesteps": timesteps, "strength": strength,
            "alphas_cumprod": scaled_linear_alphas_cumprod(T)}


def _call_img2img(impl, inputs):
    def run():
        return impl(inputs["latents"].clone(), inputs["noise"].clone(), inputs["timesteps"].clone(),
                    inputs["strength"], inputs["alphas_cumprod"])
    out = run()
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("img2img_start must return a pair (noisy_latents, timesteps)")
    noisy, timesteps = out
    if not isinstance(timesteps, torch.Tensor) or timesteps.dtype != torch.int64:
        raise TypeError("the remaining timesteps must be an int64 tensor (a slice of `timesteps`)")
    return noisy, timesteps


IMG2IMG = Task(
    "img2img_start",
    cases=(
        Case("50 leading steps (offset 1), strength 0.3", lambda g: _img2img_inputs(g)),
        Case("25 trailing steps, strength 0.75", lambda g: _img2img_inputs(g, steps=25, strength=0.75, spacing="trailing")),
        Case("strength 1.0 (every step; the image still leaks through)", lambda g: _img2img_inputs(g, strength=1.0)),
        Case("30 steps, strength 0.55 (a fractional count)", lambda g: _img2img_inputs(g, steps=30, strength=0.55),
             hidden=True),
        Case("7 steps, strength 0.15 (one step)", lambda g: _img2img_inputs(g, steps=7, strength=0.15), hidden=True),
        Case("1 image 1x8x8, 40 trailing steps, strength 0.99", lambda g: _img2img_inputs(
            g, shape=(1, 1, 8, 8), steps=40, strength=0.99, spacing="trailing"), hidden=True),
        Case("T=200, 20 steps, strength 0.5", lambda g: _img2img_inputs(g, T=200, steps=20, strength=0.5, offset=0),
             hidden=True),
    ),
    call=_call_img2img,
    output_names=("noisy latents", "remaining timesteps"),
    rules=(Forbid(_GET_TIMESTEPS_RULE, callables=GET_TIMESTEPS),),
)


# ---------------------------------------------------------------------------------------------
# 4. the base-to-refiner hand-off (denoising_end / denoising_start)


def _handoff_inputs(timesteps, fraction, T=1000):
    return {"timesteps": torch.as_tensor(timesteps, dtype=torch.int64), "num_train_timesteps": T, "fraction": fraction}


def _call_handoff(impl, inputs):
    out = impl(inputs["timesteps"].clone(), inputs["num_train_timesteps"], inputs["fraction"])
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("split_timesteps must return a pair (base_timesteps, refiner_timesteps)")
    for name, value in zip(("base_timesteps", "refiner_timesteps"), out):
        if not isinstance(value, torch.Tensor) or value.dtype != torch.int64:
            raise TypeError(f"{name} must be an int64 tensor (a slice of `timesteps`)")
    return tuple(out)


HANDOFF = Task(
    "split_timesteps",
    cases=(
        Case("25 leading steps of 1000, hand-off at 0.8", lambda g: _handoff_inputs(leading_timesteps(1000, 25), 0.8)),
        Case("40 trailing steps, hand-off at 0.8", lambda g: _handoff_inputs(trailing_timesteps(1000, 40), 0.8)),
        Case("uneven steps [999, 900, 700, 400, 100], 0.5", lambda g: _handoff_inputs([999, 900, 700, 400, 100], 0.5)),
        Case("a step exactly at the cut-off (200), 0.8", lambda g: _handoff_inputs([990, 600, 300, 200, 199, 50], 0.8),
             hidden=True),
        Case("50 leading steps (offset 1), 0.7", lambda g: _handoff_inputs(leading_timesteps(1000, 50, 1), 0.7), hidden=True),
        Case("T=100, 10 steps, 0.9", lambda g: _handoff_inputs(leading_timesteps(100, 10), 0.9, T=100), hidden=True),
        Case("T=100, 25 steps, 0.55 (100 - 55.0 is not 45 in floating point)",
             lambda g: _handoff_inputs(leading_timesteps(100, 25), 0.55, T=100)),
        Case("30 trailing steps, 0.65", lambda g: _handoff_inputs(trailing_timesteps(1000, 30), 0.65), hidden=True),
    ),
    call=_call_handoff,
    output_names=("base timesteps", "refiner timesteps"),
    rules=(Forbid(_GET_TIMESTEPS_RULE, callables=GET_TIMESTEPS),),
)


TASKS = TaskSet(CHAPTER, [TEXT, MICRO, IMG2IMG, HANDOFF])
