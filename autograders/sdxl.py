"""Checks for chapter 14, SDXL.

Every reference is diffusers' own code (0.42.1, code only, no weights), called with stand-ins for the
parts it reads and does not need (no weights are ever loaded):

* the text conditioning: ``StableDiffusionXLPipeline.encode_prompt`` with two stand-in text encoders that
  return the case's hidden states (and, for the second, its pooled ``text_embeds``), stand-in tokenizers,
  classifier-free guidance on and ``force_zeros_for_empty_prompt=True`` (SDXL's config);
* micro-conditioning: the base pipeline's and the refiner (img2img) pipeline's ``_get_add_time_ids``
  (``requires_aesthetics_score`` False / True), then ``UNet2DConditionModel.get_aug_embed`` for
  ``addition_embed_type="text_time"`` with ``add_time_proj = Timesteps(embed_dim, flip_sin_to_cos=True,
  downscale_freq_shift=0)`` (SDXL's U-Net config) and its final MLP left out (an identity), so the
  vector that MLP reads is compared;
* img2img: ``StableDiffusionXLImg2ImgPipeline.get_timesteps(steps, strength, ...)`` on a diffusers
  ``DDIMScheduler`` holding the case's timesteps and ``alphas_cumprod``, then ``scheduler.add_noise`` at
  ``timesteps[:1]`` (the pipeline's ``latent_timestep``);
* the hand-off: the base pipeline's ``denoising_end`` lines (inline in ``StableDiffusionXLPipeline.__call__``,
  reproduced verbatim below) and the refiner's ``get_timesteps(..., denoising_start=...)``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

from autograders.engine.core import EXACT, Check, CheckSet, Mistake, Tolerance
from autograders.harness import sdxl as H

CHAPTER = H.CHAPTER

TEXT_TOL = Tolerance(0.0, 0.0, "a concatenation and a selection: the numbers are copied, not computed")
MICRO_TOL = Tolerance(2e-4, 1e-5, "float32 sinusoids of sizes up to ~1300: t * w_i is rounded to ~1e-4 absolute, "
                                  "and another correct order of operations for w_i moves sin/cos by as much")
NOISE_TOL = Tolerance(1e-6, 1e-5, "float32: two products and a sum per element")


# ---------------------------------------------------------------------------------------------
# stand-ins for what diffusers' pipeline code reads


class _EncoderOutput(tuple):
    """What a transformers text model returns: indexable ([0]) and with ``.hidden_states``."""

    def __new__(cls, first, hidden_states):
        out = super().__new__(cls, (first,))
        out.hidden_states = hidden_states
        return out


class _CannedEncoder(nn.Module):
    """A "text encoder" that returns given hidden states; ``pooled`` (2-D) plays CLIPTextModelWithProjection's
    ``text_embeds`` at index 0, otherwise index 0 is the last hidden state (CLIPTextModel's ``last_hidden_state``)."""

    def __init__(self, hidden_states, pooled=None):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.hidden_states, self.pooled = hidden_states, pooled

    @property
    def dtype(self):
        return torch.float32

    def forward(self, ids, output_hidden_states=False):
        first = self.pooled if self.pooled is not None else self.hidden_states[-1]
        return _EncoderOutput(first, self.hidden_states)


class _Tokenizer:
    def __init__(self, length):
        self.model_max_length = length

    def __call__(self, prompt, padding=None, max_length=None, truncation=None, return_tensors=None):
        return SimpleNamespace(input_ids=torch.zeros(len(prompt), self.model_max_length, dtype=torch.long))

    def batch_decode(self, ids):
        return []


def _diffusers(*names):
    """Classes from diffusers, imported without transformers' notes about torchvision (not installed)."""
    import logging

    log = logging.getLogger("transformers")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import diffusers
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return tuple(getattr(diffusers, n) for n in names)
        finally:
            hf_logging.set_verbosity(verbosity)
    finally:
        log.setLevel(level)


def _text_ref(inputs):
    StableDiffusionXLPipeline, = _diffusers("StableDiffusionXLPipeline")

    h1, h2, pooled = inputs["hidden_states_1"], inputs["hidden_states_2"], inputs["text_embeds_2"]
    B, S = h1[0].shape[:2]
    pipe = SimpleNamespace(_execution_device=torch.device("cpu"), tokenizer=_Tokenizer(S), tokenizer_2=_Tokenizer(S),
                           text_encoder=_CannedEncoder(h1), text_encoder_2=_CannedEncoder(h2, pooled),
                           config=SimpleNamespace(force_zeros_for_empty_prompt=True))
    out = StableDiffusionXLPipeline.encode_prompt(pipe, prompt=["a prompt"] * B, device=torch.device("cpu"),
                                                  num_images_per_prompt=1, do_classifier_free_guidance=True,
                                                  clip_skip=inputs["clip_skip"])
    prompt_embeds, negative, pooled_out, negative_pooled = out
    return prompt_embeds, pooled_out, negative, negative_pooled


def _layer(hidden_states, clip_skip, *, offset=2):
    return hidden_states[-((clip_skip or 0) + offset)]


def _text_generic(h1, h2, pooled, clip_skip, *, offset=2, order=(0, 1), pooled_from=None, negative="zeros",
                  clip_skip_index=None):
    layers = []
    for h in (h1, h2):
        if clip_skip_index is not None:
            layers.append(h[clip_skip_index(clip_skip)])
        else:
            layers.append(_layer(h, clip_skip, offset=offset))
    embeds = torch.cat([layers[i] for i in order], dim=-1)
    pooled_out = pooled if pooled_from is None else pooled_from(h1, h2, pooled)
    if negative == "zeros":
        neg, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled_out)
    else:
        neg, neg_pooled = -embeds, -pooled_out
    return embeds, pooled_out, neg, neg_pooled


def _text_mistake(**options):
    return lambda h1, h2, pooled, clip_skip=None: _text_generic(h1, h2, pooled, clip_skip, **options)


TEXT = Check(
    H.TEXT,
    reference=_text_ref,
    tolerance=TEXT_TOL,
    mistakes=(
        Mistake("clip_skip ignored", _text_mistake(clip_skip_index=lambda cs: -2),
                "your embeddings ignore clip_skip: with clip_skip = k read hidden_states[-(k + 2)] (SDXL already "
                "starts from the penultimate layer, so k counts further layers skipped)."),
        Mistake("the last layer", _text_mistake(offset=1),
                "your prompt embeddings come from each encoder's LAST layer: SDXL reads the penultimate one, "
                "hidden_states[-2] (hidden_states[-(clip_skip + 2)] with clip_skip)."),
        Mistake("encoders in the other order", _text_mistake(order=(1, 0)),
                "your embeddings put the second encoder's features first: concatenate [encoder 1, encoder 2] "
                "along the feature axis, as encode_prompt does (768 + 1280 in SDXL)."),
        Mistake("pooled from encoder 1's last hidden state", _text_mistake(
            pooled_from=lambda h1, h2, p: h1[-1].mean(1)),
                "your pooled embedding is not the second encoder's text_embeds: SDXL keeps only the pooled "
                "(projected) output of its second encoder."),
        Mistake("negative embeddings not zero", _text_mistake(negative="minus"),
                "your negative (unconditional) embeddings are not zero: with no negative prompt SDXL's config "
                "(force_zeros_for_empty_prompt=True) uses zeros for both the sequence and the pooled vector."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. micro_conditioning


def _micro_ref(inputs):
    StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel = _diffusers(
        "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLPipeline", "UNet2DConditionModel")
    from diffusers.models.embeddings import Timesteps

    te, D = inputs["text_embeds"], inputs["embed_dim"]
    refiner = inputs["aesthetic_score"] is not None
    n = 5 if refiner else 6
    unet = SimpleNamespace(config=SimpleNamespace(addition_time_embed_dim=D, addition_embed_type="text_time"),
                           add_embedding=SimpleNamespace(linear_1=SimpleNamespace(in_features=te.shape[1] + n * D)))
    pipe = SimpleNamespace(unet=unet, config=SimpleNamespace(requires_aesthetics_score=refiner))
    if refiner:
        time_ids, _ = StableDiffusionXLImg2ImgPipeline._get_add_time_ids(
            pipe, inputs["original_size"], inputs["crops_coords_top_left"], inputs["target_size"],
            inputs["aesthetic_score"], 2.5, inputs["original_size"], inputs["crops_coords_top_left"],
            inputs["target_size"], dtype=torch.float32, text_encoder_projection_dim=te.shape[1])
    else:
        time_ids = StableDiffusionXLPipeline._get_add_time_ids(
            pipe, inputs["original_size"], inputs["crops_coords_top_left"], inputs["target_size"], dtype=torch.float32,
            text_encoder_projection_dim=te.shape[1])
    time_ids = time_ids.repeat(te.shape[0], 1)
    aug_unet = SimpleNamespace(config=unet.config, add_time_proj=Timesteps(D, True, 0), add_embedding=nn.Identity())
    return UNet2DConditionModel.get_aug_embed(aug_unet, torch.zeros(te.shape[0], 1), None,
                                              {"text_embeds": te, "time_ids": time_ids})


def _sinusoid(values, dim, *, flip=True, shift=0.0):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - shift))
    args = values.float()[:, None] * freqs[None]
    sin, cos = torch.sin(args), torch.cos(args)
    return torch.cat([cos, sin] if flip else [sin, cos], dim=-1)


def _micro_generic(te, original, crop, target, dim, score=None, *, order="text_first", flip=True, shift=0.0,
                   ids="sdxl", joint=False):
    if score is None:
        values = list(original) + list(crop) + list(target)
    elif ids == "all_seven":
        values = list(original) + list(crop) + list(target) + [score]
    elif ids == "score_for_crop":
        values = list(original) + [score] + list(target)
    else:
        values = list(original) + list(crop) + [score]
    if ids == "reversed_sizes":
        values = [v for pair in zip(values[1::2], values[0::2]) for v in pair] + (values[-1:] if len(values) % 2 else [])
    v = torch.tensor(values, dtype=torch.float32)
    if joint:
        emb = _sinusoid(v.sum()[None], dim * len(values), flip=flip, shift=shift)[0]
    else:
        emb = _sinusoid(v, dim, flip=flip, shift=shift).reshape(-1)
    emb = emb[None].expand(te.shape[0], -1)
    return torch.cat([te, emb] if order == "text_first" else [emb, te], dim=-1)


def _micro_mistake(**options):
    return lambda te, original, crop, target, dim, score=None: _micro_generic(te, original, crop, target, dim, score,
                                                                              **options)


MICRO = Check(
    H.MICRO,
    reference=_micro_ref,
    tolerance=MICRO_TOL,
    mistakes=(
        Mistake("embeddings before the text", _micro_mistake(order="time_first"),
                "your vector puts the size embeddings first: the U-Net concatenates [text_embeds, time_embeds], "
                "the pooled text first."),
        Mistake("sin before cos", _micro_mistake(flip=False),
                "each number's embedding starts with the sines: SDXL's Timesteps uses flip_sin_to_cos=True, "
                "[cos(v w_i), sin(v w_i)]."),
        Mistake("frequency shift 1", _micro_mistake(shift=1.0),
                "your frequencies are max_period^(-i / (half - 1)): SDXL's Timesteps uses downscale_freq_shift=0, "
                "w_i = 10000^(-i / half) with half = embed_dim / 2."),
        Mistake("refiner keeps target_size", _micro_mistake(ids="all_seven"),
                "your refiner vector embeds seven numbers: the refiner's aesthetic score REPLACES target_size "
                "(original_size + crops_coords_top_left + (aesthetic_score,), 5 numbers)."),
        Mistake("score in place of the crop", _micro_mistake(ids="score_for_crop"),
                "your refiner vector puts the aesthetic score where the crop goes: the order is original_size, "
                "crops_coords_top_left, then the score."),
        Mistake("(width, height)", _micro_mistake(ids="reversed_sizes"),
                "your sizes are (width, height): diffusers' original_size and target_size are (height, width) "
                "and crops_coords_top_left is (top, left), used in that order."),
        Mistake("one embedding of the sum", _micro_mistake(joint=True),
                "each of the numbers gets its OWN embed_dim-wide sinusoidal embedding, and the embeddings are "
                "concatenated in order (6 x 256 = 1536 numbers for SDXL's base)."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 3. img2img_start


def _scheduler_holding(timesteps, alphas_cumprod):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=len(alphas_cumprod))
    scheduler.alphas_cumprod = alphas_cumprod.clone()
    scheduler.timesteps = timesteps.clone()
    scheduler.num_inference_steps = len(timesteps)
    return scheduler


def _img2img_ref(inputs):
    StableDiffusionXLImg2ImgPipeline, = _diffusers("StableDiffusionXLImg2ImgPipeline")
    scheduler = _scheduler_holding(inputs["timesteps"], inputs["alphas_cumprod"])
    pipe = SimpleNamespace(scheduler=scheduler)
    timesteps, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(pipe, len(inputs["timesteps"]), inputs["strength"],
                                                                  "cpu")
    latent_timestep = timesteps[:1].repeat(inputs["latents"].shape[0])
    return scheduler.add_noise(inputs["latents"], inputs["noise"], latent_timestep), timesteps


def _noise(latents, noise, t, ab):
    a = ab[t]
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def _img2img_generic(latents, noise, timesteps, strength, ab, *, start=None, noise_at=None):
    n = len(timesteps)
    if start == "inverted":
        t_start = min(int(n * strength), n)
    elif start == "rounded":
        t_start = n - min(int(round(n * strength)), n)
    elif start == "plus_one":
        t_start = min(n - int(n * strength) + 1, n - 1)
    else:
        t_start = n - min(int(n * strength), n)
    remaining = timesteps[t_start:]
    if noise_at == "T_times_s":
        t = min(int(strength * len(ab)), len(ab) - 1)
    elif noise_at == "last":
        t = int(timesteps[0])
    elif noise_at == "next":
        t = int(remaining[min(1, len(remaining) - 1)])
    else:
        t = int(remaining[0])
    return _noise(latents, noise, t, ab), remaining


def _img2img_mistake(**options):
    return lambda latents, noise, timesteps, strength, ab: _img2img_generic(latents, noise, timesteps, strength, ab,
                                                                            **options)


IMG2IMG = Check(
    H.IMG2IMG,
    reference=_img2img_ref,
    tolerance=NOISE_TOL,
    mistakes=(
        Mistake("start index steps * s", _img2img_mistake(start="inverted"),
                "your run starts at index int(steps * s), which skips the NOISY steps: strength s keeps the LAST "
                "int(steps * s) steps, so the start index is steps - int(steps * s)."),
        Mistake("rounded step count", _img2img_mistake(start="rounded"),
                "your step count is round(steps * s): diffusers truncates, int(steps * s)."),
        Mistake("noised to t = s * T", _img2img_mistake(noise_at="T_times_s"),
                "your latents are noised to timestep int(s * T): noise them to the FIRST remaining timestep, "
                "timesteps[start], the one the sampler denoises first."),
        Mistake("noised to the first timestep of the full list", _img2img_mistake(noise_at="last"),
                "your latents are noised to timesteps[0], the noisiest step of the full run: noise them to the first "
                "REMAINING timestep."),
        Mistake("noised to the second remaining timestep", _img2img_mistake(noise_at="next"),
                "your latents are noised one step too low: the sampler starts at the first remaining timestep, so "
                "that is the noise level to add."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 4. split_timesteps


def _base_timesteps(timesteps, num_train_timesteps, denoising_end):
    """The lines of ``StableDiffusionXLPipeline.__call__`` ("8.1 Apply denoising_end"), verbatim but for names."""
    discrete_timestep_cutoff = int(
        round(num_train_timesteps - (denoising_end * num_train_timesteps))
    )
    num_inference_steps = len(list(filter(lambda ts: ts >= discrete_timestep_cutoff, timesteps)))
    return timesteps[:num_inference_steps]


def _handoff_ref(inputs):
    StableDiffusionXLImg2ImgPipeline, = _diffusers("StableDiffusionXLImg2ImgPipeline")
    ts, T, frac = inputs["timesteps"], inputs["num_train_timesteps"], inputs["fraction"]
    scheduler = _scheduler_holding(ts, H.scaled_linear_alphas_cumprod(T))
    refiner, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), len(ts), 0.3,
                                                                "cpu", denoising_start=frac)
    return _base_timesteps(ts, T, frac), refiner


def _handoff_generic(timesteps, T, frac, *, cut="round", by_index=False, strict=False, overlap=False):
    if by_index:
        n = int(len(timesteps) * frac)
        return timesteps[:n], timesteps[n:]
    if cut == "int":
        cutoff = int(T - frac * T)
    elif cut == "fraction":
        cutoff = int(round(frac * T))
    else:
        cutoff = int(round(T - frac * T))
    base = timesteps[timesteps > cutoff] if strict else timesteps[timesteps >= cutoff]
    refiner = timesteps[len(base) - 1:] if overlap and len(base) else timesteps[len(base):]
    return base, refiner


def _handoff_mistake(**options):
    return lambda timesteps, T, frac: _handoff_generic(timesteps, T, frac, **options)


HANDOFF = Check(
    H.HANDOFF,
    reference=_handoff_ref,
    tolerance=EXACT,
    mistakes=(
        Mistake("split by step index", _handoff_mistake(by_index=True),
                "you split the LIST at int(steps * fraction): the hand-off is at a noise level, timestep "
                "round(T - fraction * T); the base keeps the timesteps >= it, whatever their spacing."),
        Mistake("cut-off at fraction * T", _handoff_mistake(cut="fraction"),
                "your cut-off is fraction * T: denoising_end = 0.8 means 80% of the denoising is done by the base, "
                "so the cut-off timestep is T - 0.8 T = 200."),
        Mistake("int without round", _handoff_mistake(cut="int"),
                "your cut-off truncates T - fraction * T: in floating point 100 - 0.55 * 100 is 44.99999999999999; "
                "diffusers rounds it first, int(round(...))."),
        Mistake("strictly above the cut-off", _handoff_mistake(strict=True),
                "a timestep equal to the cut-off belongs to the BASE (ts >= cutoff); the refiner gets those below it."),
        Mistake("boundary step run twice", _handoff_mistake(overlap=True),
                "your refiner repeats the base's last timestep: the two lists split the schedule, each step is "
                "run by exactly one model."),
    ),
)


CHECKS = CheckSet(CHAPTER, [TEXT, MICRO, IMG2IMG, HANDOFF])
check = CHECKS.check
