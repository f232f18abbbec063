"""Chapter 14: the solution passes every check; plausible wrong answers, forbidden library calls and the
stubs are rejected; the references are diffusers' code and agree with the formulas the notebook states."""

from __future__ import annotations

import math

import pytest
import torch

from autograders import sdxl as ag
from autograders.engine.core import evaluate, make_inputs
from autograders.harness import sdxl as H
from checks_support import chapter_tests, assert_accepts, assert_rejects
from notebook_code import load_solutions

sol = load_solutions(ag.CHAPTER)
NAMES = ["sdxl_text_conditioning", "micro_conditioning", "img2img_start", "split_timesteps"]
globals().update(chapter_tests(ag.CHECKS, H.TASKS, NAMES, sol))


def test_grading_cells_do_not_train():
    for name in ("judge", "base", "refiner", "control_model", "samples", "timings"):
        assert not hasattr(sol, name), f"{name} is defined before the last exercise"


def test_references_print_nothing(capsys):
    for check in ag.CHECKS:
        check.reference(make_inputs(check.cases[0], seed=0))
    captured = capsys.readouterr()
    assert captured.out + captured.err == ""


# --- the references agree with the formulas the notebook states -----------------------------------

def test_text_reference_is_the_penultimate_layers_concatenated():
    for case in H.TEXT.cases:
        i = make_inputs(case, seed=1)
        layer = -2 if i["clip_skip"] is None else -(i["clip_skip"] + 2)
        embeds, pooled, neg, neg_pooled = ag.TEXT.reference(i)
        torch.testing.assert_close(embeds, torch.cat([i["hidden_states_1"][layer], i["hidden_states_2"][layer]], -1))
        torch.testing.assert_close(pooled, i["text_embeds_2"])
        assert not neg.any() and not neg_pooled.any() and neg.shape == embeds.shape


def test_micro_reference_has_sdxl_widths_and_diffusers_sinusoid():
    from diffusers.models.embeddings import get_timestep_embedding

    for case in H.MICRO.cases:
        i = make_inputs(case, seed=2)
        out = ag.MICRO.reference(i)
        n = 6 if i["aesthetic_score"] is None else 5
        assert out.shape == (i["text_embeds"].shape[0], i["text_embeds"].shape[1] + n * i["embed_dim"])
        torch.testing.assert_close(out, sol.micro_conditioning(**{k: v for k, v in i.items() if not k.startswith("_")}),
                                   atol=2e-4, rtol=1e-5)
    ids = torch.tensor([1024.0, 768.0])
    torch.testing.assert_close(get_timestep_embedding(ids, 256, flip_sin_to_cos=True, downscale_freq_shift=0),
                               torch.cat([torch.cos(ids[:, None] * torch.exp(-math.log(10000) * torch.arange(128) / 128)),
                                          torch.sin(ids[:, None] * torch.exp(-math.log(10000) * torch.arange(128) / 128))],
                                         -1), atol=2e-4, rtol=0)
    assert sol.micro_conditioning(torch.zeros(1, 1280), (1024, 1024), (0, 0), (1024, 1024)).shape[1] == 2816
    assert sol.micro_conditioning(torch.zeros(1, 1280), (1024, 1024), (0, 0), (1024, 1024), 256, 6.0).shape[1] == 2560


def test_img2img_reference_starts_at_steps_minus_int_steps_times_strength():
    for case in H.IMG2IMG.cases:
        i = make_inputs(case, seed=3)
        noisy, remaining = ag.IMG2IMG.reference(i)
        n = len(i["timesteps"])
        start = n - int(n * i["strength"])
        torch.testing.assert_close(remaining, i["timesteps"][start:])
        a = i["alphas_cumprod"][i["timesteps"][start]]
        torch.testing.assert_close(noisy, a.sqrt() * i["latents"] + (1 - a).sqrt() * i["noise"])


def test_handoff_reference_partitions_the_schedule_at_round_T_minus_fraction_T():
    for case in H.HANDOFF.cases:
        i = make_inputs(case, seed=0)
        base, refiner = ag.HANDOFF.reference(i)
        torch.testing.assert_close(torch.cat([base, refiner]), i["timesteps"])
        cutoff = int(round(i["num_train_timesteps"] * (1 - i["fraction"])))
        assert (base >= cutoff).all() and (refiner < cutoff).all()
    base, refiner = ag.HANDOFF.reference(H._handoff_inputs(H.leading_timesteps(1000, 25), 0.8))
    assert len(base) == 20 and base[-1] == 200 and refiner.tolist() == [160, 120, 80, 40, 0]


def test_timestep_helpers_equal_diffusers_spacings():
    from diffusers import DDIMScheduler

    leading = DDIMScheduler(num_train_timesteps=1000, steps_offset=1)
    leading.set_timesteps(50)
    assert leading.timesteps.tolist() == H.leading_timesteps(1000, 50, 1).tolist()
    trailing = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    trailing.set_timesteps(25)
    assert trailing.timesteps.tolist() == H.trailing_timesteps(1000, 25).tolist()
    from diffusers import DDPMScheduler

    sd = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(sd.alphas_cumprod, H.scaled_linear_alphas_cumprod())


# --- forbidden library calls are seen (and undone) ------------------------------------------------------

# what a submission that imports diffusers in a notebook cell would have in its namespace
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline  # noqa: E402
from diffusers.models.embeddings import Timesteps  # noqa: E402

from coursekit.unet import timestep_embedding  # noqa: E402


def _text_by_encode_prompt(h1, h2, pooled, clip_skip=None):
    from types import SimpleNamespace

    B, S = h1[0].shape[:2]
    pipe = SimpleNamespace(_execution_device=torch.device("cpu"), tokenizer=ag._Tokenizer(S), tokenizer_2=ag._Tokenizer(S),
                           text_encoder=ag._CannedEncoder(h1), text_encoder_2=ag._CannedEncoder(h2, pooled),
                           config=SimpleNamespace(force_zeros_for_empty_prompt=True))
    e, n, p, npool = StableDiffusionXLPipeline.encode_prompt(pipe, prompt=["x"] * B, device=torch.device("cpu"),
                                                              do_classifier_free_guidance=True, clip_skip=clip_skip)
    return e, p, n, npool


def _micro_with_course_embedding(te, original, crop, target, dim=256, score=None):
    numbers = list(original) + list(crop) + (list(target) if score is None else [score])
    emb = timestep_embedding(torch.tensor(numbers, dtype=torch.float32), dim).reshape(1, -1)
    return torch.cat([te, emb.expand(te.shape[0], -1)], -1)


def _micro_with_diffusers_timesteps(te, original, crop, target, dim=256, score=None):
    numbers = list(original) + list(crop) + (list(target) if score is None else [score])
    emb = Timesteps(dim, True, 0)(torch.tensor(numbers, dtype=torch.float32)).reshape(1, -1)
    return torch.cat([te, emb.expand(te.shape[0], -1)], -1)


def _img2img_by_get_timesteps(latents, noise, timesteps, strength, alphas_cumprod):
    from types import SimpleNamespace

    scheduler = ag._scheduler_holding(timesteps, alphas_cumprod)
    remaining, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), len(timesteps),
                                                                  strength, "cpu")
    a = alphas_cumprod[remaining[0]]
    return a.sqrt() * latents + (1 - a).sqrt() * noise, remaining


def _split_by_get_timesteps(timesteps, T, fraction):
    from types import SimpleNamespace

    scheduler = ag._scheduler_holding(timesteps, H.scaled_linear_alphas_cumprod(T))
    refiner, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), len(timesteps),
                                                                1.0, "cpu", denoising_start=fraction)
    return timesteps[: len(timesteps) - len(refiner)], refiner


def test_forbidden_calls_would_be_right():
    """The forbidden routes give correct answers: only the rule rejects them."""
    from dataclasses import replace

    for name, impl in (("sdxl_text_conditioning", _text_by_encode_prompt), ("micro_conditioning", _micro_with_course_embedding),
                       ("micro_conditioning", _micro_with_diffusers_timesteps), ("img2img_start", _img2img_by_get_timesteps),
                       ("split_timesteps", _split_by_get_timesteps)):
        check = ag.CHECKS[name]
        free = ag.Check(replace(check.task, rules=()), reference=check.reference, tolerance=check.tolerance)
        assert evaluate(free, impl, seed=0).passed, name


@pytest.mark.parametrize("name, impl, called", [
    ("sdxl_text_conditioning", _text_by_encode_prompt, "encode_prompt"),
    ("micro_conditioning", _micro_with_course_embedding, "coursekit.unet.timestep_embedding"),
    ("micro_conditioning", _micro_with_diffusers_timesteps, "get_timestep_embedding"),
    ("img2img_start", _img2img_by_get_timesteps, "get_timesteps"),
    ("split_timesteps", _split_by_get_timesteps, "get_timesteps"),
])
def test_forbidden_library_calls_are_rejected(name, impl, called):
    text = assert_rejects(ag.CHECKS, name, impl, "not allowed")
    assert called in text


def test_a_library_imported_inside_the_exercise_is_seen():
    def img2img_importing_inside(latents, noise, timesteps, strength, alphas_cumprod):
        from types import SimpleNamespace

        from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as lib

        scheduler = ag._scheduler_holding(timesteps, alphas_cumprod)
        remaining, _ = lib.StableDiffusionXLImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler),
                                                                          len(timesteps), strength, "cpu")
        a = alphas_cumprod[remaining[0]]
        return a.sqrt() * latents + (1 - a).sqrt() * noise, remaining

    assert "get_timesteps" in assert_rejects(ag.CHECKS, "img2img_start", img2img_importing_inside, "not allowed")


def test_the_call_watch_is_removed_after_grading():
    import sys

    for name, impl in (("img2img_start", _img2img_by_get_timesteps), ("micro_conditioning", _micro_with_course_embedding),
                       ("micro_conditioning", _micro_with_diffusers_timesteps)):
        evaluate(ag.CHECKS[name], impl, seed=0)
        assert sys.getprofile() is None


def test_q_sample_is_allowed_in_img2img():
    assert_accepts(ag.CHECKS, "img2img_start", sol.img2img_start)  # the solution calls coursekit's q_sample


# --- sdxl_text_conditioning ----------------------------------------------------------------------------

def text_sequence_axis(h1, h2, pooled, clip_skip=None):
    e, p, n, npool = sol.sdxl_text_conditioning(h1, h2, pooled, clip_skip)
    layer = -2 if clip_skip is None else -(clip_skip + 2)
    e = torch.cat([h1[layer], h2[layer]], dim=1) if h1[0].shape[-1] == h2[0].shape[-1] else e[:, :, :-1]
    return e, p, torch.zeros_like(e), npool


def text_mean_pooled(h1, h2, pooled, clip_skip=None):
    e, p, n, npool = sol.sdxl_text_conditioning(h1, h2, pooled, clip_skip)
    return e, e.mean(1)[:, : p.shape[1]], n, npool


def text_last_layer(h1, h2, pooled, clip_skip=None):
    layer = -1 if clip_skip is None else -(clip_skip + 1)
    e = torch.cat([h1[layer], h2[layer]], -1)
    return e, pooled, torch.zeros_like(e), torch.zeros_like(pooled)


def text_summed(h1, h2, pooled, clip_skip=None):
    layer = -2 if clip_skip is None else -(clip_skip + 2)
    d = min(h1[0].shape[-1], h2[0].shape[-1])
    e = torch.cat([h1[layer], h2[layer]], -1)
    e = e.clone()
    e[..., :d] = h1[layer][..., :d] + h2[layer][..., :d]
    return e, pooled, torch.zeros_like(e), torch.zeros_like(pooled)


def text_negative_is_prompt(h1, h2, pooled, clip_skip=None):
    e, p, _, _ = sol.sdxl_text_conditioning(h1, h2, pooled, clip_skip)
    return e, p, e.clone(), p.clone()


@pytest.mark.parametrize("wrong, hint", [
    (text_sequence_axis, None),
    (text_mean_pooled, None),
    (text_last_layer, "LAST layer"),
    (text_summed, None),
    (text_negative_is_prompt, None),
])
def test_text_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "sdxl_text_conditioning", wrong, hint)


# --- micro_conditioning ----------------------------------------------------------------------------------

def _sin(values, dim, *, flip=True, period=10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(period) * torch.arange(half, dtype=torch.float32) / half)
    args = torch.tensor(values, dtype=torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)] if flip else [torch.sin(args), torch.cos(args)], -1)


def micro_with(**changes):
    def impl(te, original, crop, target, dim=256, score=None):
        numbers = list(original) + list(crop) + (list(target) if score is None else [score])
        if changes.get("sizes_only"):
            numbers = list(original) + list(target) if score is None else list(original) + [score]
        if changes.get("score_appended"):
            numbers = list(original) + list(crop) + list(target) + ([score] if score is not None else [])
        emb = _sin(numbers, dim, flip=not changes.get("sin_first"), period=changes.get("period", 10000.0))
        if changes.get("interleaved"):
            emb = torch.stack([emb[:, : dim // 2], emb[:, dim // 2:]], -1).reshape(len(numbers), dim)
        emb = emb.reshape(1, -1).expand(te.shape[0], -1)
        if changes.get("added"):
            return te + emb[:, : te.shape[1]].sum() * 0 + torch.cat([te, emb], -1)[:, : te.shape[1]]
        return torch.cat([te, emb], -1)
    return impl


def test_micro_other_correct_form_passes():
    assert_accepts(ag.CHECKS, "micro_conditioning", micro_with())


@pytest.mark.parametrize("wrong, hint", [
    (micro_with(sin_first=True), "flip_sin_to_cos"),
    (micro_with(score_appended=True), "REPLACES"),
    (micro_with(sizes_only=True), None),
    (micro_with(interleaved=True), None),
    (micro_with(period=1000.0), None),
    (micro_with(added=True), None),
])
def test_micro_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "micro_conditioning", wrong, hint)


# --- img2img_start ----------------------------------------------------------------------------------------

def img2img_with(**changes):
    def impl(latents, noise, timesteps, strength, ab):
        n = len(timesteps)
        kept = int(n * strength)
        start = kept if changes.get("inverted") else n - kept
        if changes.get("ceil"):
            start = n - min(math.ceil(n * strength), n)
        remaining = timesteps[start:]
        t = int(remaining[0]) if not changes.get("noise_at_end") else int(remaining[-1])
        a = ab[t]
        if changes.get("no_sqrt"):
            return a * latents + (1 - a) * noise, remaining
        return a.sqrt() * latents + (1 - a).sqrt() * noise, remaining
    return impl


@pytest.mark.parametrize("wrong, hint", [
    (img2img_with(inverted=True), "steps - int(steps * s)"),
    (img2img_with(ceil=True), None),
    (img2img_with(noise_at_end=True), None),
    (img2img_with(no_sqrt=True), None),
])
def test_img2img_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "img2img_start", wrong, hint)


def test_img2img_says_what_is_wrong_with_bad_strengths():
    z, ts, ab = torch.zeros(1, 1, 8, 8), H.leading_timesteps(1000, 10), H.scaled_linear_alphas_cumprod()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sol.img2img_start(z, z, ts, 1.5, ab)
    with pytest.raises(ValueError, match="no step"):
        sol.img2img_start(z, z, ts, 0.05, ab)


# --- split_timesteps --------------------------------------------------------------------------------------

def split_with(**changes):
    def impl(timesteps, T, fraction):
        if changes.get("index"):
            n = round(len(timesteps) * fraction)
            return timesteps[:n], timesteps[n:]
        cutoff = int(round(T - fraction * T))
        if changes.get("int"):
            cutoff = int(T - fraction * T)
        if changes.get("fraction_of_T"):
            cutoff = int(round(fraction * T))
        base = timesteps[timesteps > cutoff] if changes.get("strict") else timesteps[timesteps >= cutoff]
        refiner = timesteps[timesteps <= cutoff] if changes.get("both_sides") else timesteps[len(base):]
        return base, refiner
    return impl


@pytest.mark.parametrize("wrong, hint", [
    (split_with(index=True), None),
    (split_with(int=True), "int(round"),
    (split_with(fraction_of_T=True), "T - 0.8 T"),
    (split_with(strict=True), "BASE"),
    (split_with(both_sides=True), None),
])
def test_split_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "split_timesteps", wrong, hint)


def test_the_solution_says_what_is_wrong_with_bad_inputs():
    ts = H.leading_timesteps(1000, 10)
    with pytest.raises(ValueError, match="strictly between"):
        sol.split_timesteps(ts, 1000, 1.0)
    with pytest.raises(ValueError, match="decreasing"):
        sol.split_timesteps(ts.flip(0), 1000, 0.8)
    with pytest.raises(ValueError, match="even"):
        sol.micro_conditioning(torch.zeros(1, 4), (8, 8), (0, 0), (8, 8), embed_dim=5)
    with pytest.raises(ValueError, match="same"):
        sol.sdxl_text_conditioning((torch.zeros(1, 3, 4),) * 2, (torch.zeros(1, 4, 4),) * 2, torch.zeros(1, 4))
