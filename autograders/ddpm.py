"""Checks for chapter 12, DDPM.

References are diffusers' ``DDPMScheduler`` (code only, no weights): its ``betas`` and ``alphas_cumprod``
for the schedule, ``add_noise`` for the forward process, ``step`` (``variance_type="fixed_small"``,
``prediction_type="epsilon"``) for the reverse step, and a loop over ``step`` for sampling, with the
strided timesteps set through ``set_timesteps(timesteps=...)``. diffusers draws the step noise from a
``torch.Generator``; the tasks pass the same noise (drawn from a generator with the same seed), which
``tests/test_ddpm.py`` verifies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from autograders.engine.core import Check, CheckSet, Mistake, Tolerance
from autograders.harness import ddpm as H

CHAPTER = H.CHAPTER


def _diffusers_ddpm(**config):
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    return DDPMScheduler(**config)


def _quiet_ddpm(T: int, alphas_cumprod: torch.Tensor, clip_sample: bool):
    """A diffusers scheduler whose abar is exactly the input's (the betas it was built with do not matter)."""
    scheduler = _diffusers_ddpm(num_train_timesteps=T, clip_sample=clip_sample, variance_type="fixed_small",
                                prediction_type="epsilon")
    scheduler.alphas_cumprod = alphas_cumprod.clone()
    return scheduler


SCHEDULE_TOL = Tolerance(1e-12, 2e-6, "float32 results; the cosine betas are computed in float64 and rounded "
                                      "once (another correct float64 order of operations lands on the same float32 "
                                      "or its neighbour); products over 4000 steps keep a relative error below 1e-6")
Q_TOL = Tolerance(1e-6, 1e-5, "float32: two products and a sum per element")
LOSS_TOL = Tolerance(1e-6, 1e-4, "float32 mean of a few hundred squared errors, and its gradient")
STEP_TOL = Tolerance(2e-5, 1e-4, "float32; at t near T the predicted x0 divides by sqrt(abar_t) ~ 0.006, "
                                 "which magnifies rounding of x_t to ~1e-5")
LOOP_TOL = Tolerance(1e-4, 1e-4, "float32 through up to 20 steps of a model with a tanh; rounding of ~1e-6 "
                                 "per step grows a little along the chain")


# ---------------------------------------------------------------------------------------------
# 1. the noise schedule

def _schedule_ref(inputs):
    kind = {"linear": "linear", "cosine": "squaredcos_cap_v2"}[inputs["kind"]]
    s = _diffusers_ddpm(num_train_timesteps=inputs["num_train_timesteps"], beta_start=inputs["beta_start"],
                        beta_end=inputs["beta_end"], beta_schedule=kind)
    return s.betas, s.alphas_cumprod


def _cosine_f(s, offset=0.008):
    return torch.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2


def _schedule_generic(T, kind, beta_start, beta_end, *, cosine_offset=0.008, cap=True, dtype=torch.float64,
                      cumprod_of_betas=False, endpoint=True, sqrt_linear=False, cosine_direct=False):
    if kind == "linear":
        if sqrt_linear:
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T) ** 2
        elif endpoint:
            betas = torch.linspace(beta_start, beta_end, T)
        else:
            betas = beta_start + (beta_end - beta_start) * torch.arange(T, dtype=torch.float32) / T
    else:
        s = torch.arange(T + 1, dtype=dtype) / T
        f = _cosine_f(s, cosine_offset)
        if cosine_direct:
            ab = (f[1:] / f[0]).float()
            return (1 - ab / torch.cat([torch.ones(1), ab[:-1]])), ab
        betas = 1 - f[1:] / f[:-1]
        if cap:
            betas = betas.clamp(max=0.999)
        betas = betas.float()
    betas = betas.float()
    return betas, torch.cumprod(betas if cumprod_of_betas else 1 - betas, dim=0)


SCHEDULE = Check(
    H.SCHEDULE,
    reference=_schedule_ref,
    tolerance=SCHEDULE_TOL,
    mistakes=(
        Mistake("cumulative product of the betas", lambda T, k, b0, b1: _schedule_generic(T, k, b0, b1, cumprod_of_betas=True),
                "your alphas_cumprod is the product of the betas: abar_t is the product of alpha_s = 1 - beta_s."),
        Mistake("linear without its end point", lambda T, k, b0, b1: _schedule_generic(T, k, b0, b1, endpoint=False),
                "your linear betas stop one step short of beta_end: T evenly spaced values from beta_start to "
                "beta_end INCLUDED (torch.linspace)."),
        Mistake("scaled_linear", lambda T, k, b0, b1: _schedule_generic(T, k, b0, b1, sqrt_linear=True),
                "your linear betas are spaced evenly in their square roots (Stable Diffusion's 'scaled_linear'): "
                "DDPM's linear schedule spaces the betas themselves evenly."),
        Mistake("cosine without the offset", lambda T, k, b0, b1: _schedule_generic(T, k, b0, b1, cosine_offset=0.0),
                "your cosine betas match f(s) = cos^2(s pi/2) without the offset s = 0.008: use "
                "cos^2((s + 0.008) / 1.008 * pi / 2), which keeps the first betas from being ~0."),
        Mistake("cosine without the cap", lambda T, k, b0, b1: _schedule_generic(T, k, b0, b1, cap=False),
                "your last cosine beta is 1 (abar_T = 0 exactly): cap every beta at 0.999, as Nichol & Dhariwal "
                "and diffusers do."),
        Mistake("cosine abar directly", lambda T, k, b0, b1: _schedule_generic(T, k, b0, b1, cosine_direct=True),
                "your abar comes straight from f(t)/f(0): compute the betas from the ratios, cap them at 0.999, "
                "and take the product of 1 - beta, so the last betas are capped as in diffusers."),
        Mistake("cosine in float32", lambda T, k, b0, b1: _schedule_generic(T, k, b0, b1, dtype=torch.float32),
                "your cosine schedule matches a float32 computation: compute f and the ratios in float64 "
                "(Python floats or dtype=torch.float64) and round the betas to float32 once at the end."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. q_sample

def _q_ref(inputs):
    scheduler = _quiet_ddpm(len(inputs["alphas_cumprod"]), inputs["alphas_cumprod"], True)
    return scheduler.add_noise(inputs["x0"], inputs["noise"], inputs["t"])


def _ab(alphas_cumprod, t, x):
    return alphas_cumprod[t].reshape(-1, *([1] * (x.ndim - 1)))


def _q_no_sqrt(x0, t, noise, alphas_cumprod):
    ab = _ab(alphas_cumprod, t, x0)
    return ab * x0 + (1 - ab) * noise


def _q_swapped(x0, t, noise, alphas_cumprod):
    ab = _ab(alphas_cumprod, t, x0)
    return (1 - ab).sqrt() * x0 + ab.sqrt() * noise


def _q_signal_kept(x0, t, noise, alphas_cumprod):
    ab = _ab(alphas_cumprod, t, x0)
    return x0 + (1 - ab).sqrt() * noise


def _q_off_by_one(x0, t, noise, alphas_cumprod):
    ab = _ab(alphas_cumprod, (t - 1).clamp(min=0), x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def _q_last_axis(x0, t, noise, alphas_cumprod):
    ab = alphas_cumprod[t]
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


Q_SAMPLE = Check(
    H.Q_SAMPLE,
    reference=_q_ref,
    tolerance=Q_TOL,
    mistakes=(
        Mistake("no square roots", _q_no_sqrt,
                "your result is abar x0 + (1 - abar) noise: the coefficients are the square roots, "
                "sqrt(abar) x0 + sqrt(1 - abar) noise, so that the variance stays 1."),
        Mistake("coefficients swapped", _q_swapped,
                "your result puts sqrt(1 - abar) on x0 and sqrt(abar) on the noise: abar is the SIGNAL "
                "fraction (near 1 at t = 0)."),
        Mistake("signal not scaled", _q_signal_kept,
                "your result keeps x0 unscaled: multiply it by sqrt(abar_t), or the variance grows with t."),
        Mistake("t off by one", _q_off_by_one,
                "your result uses abar[t - 1]: timesteps are 0-based indices into alphas_cumprod, use abar[t]."),
        Mistake("broadcast along the last axis", _q_last_axis,
                "your abar[t] (shape (B,)) was broadcast along the LAST axis: reshape it to (B, 1, 1, ...) so "
                "each image gets its own noise level."),
    ),
)


def q_sample_given(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The grader's q_sample, used while ddpm_loss is checked."""
    ab = alphas_cumprod[t].reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


# ---------------------------------------------------------------------------------------------
# 3. the loss

def _loss_ref(inputs):
    model = H.build_toy(inputs)
    scheduler = _quiet_ddpm(len(inputs["alphas_cumprod"]), inputs["alphas_cumprod"], True)
    with torch.enable_grad():
        x_t = scheduler.add_noise(inputs["x0"], inputs["noise"], inputs["t"])
        loss = F.mse_loss(model(x_t, inputs["t"]), inputs["noise"])
        loss.backward()
    return loss.detach().reshape(1), model.weight.grad


def _loss_x0_target(model, x0, t, noise, alphas_cumprod):
    return F.mse_loss(model(q_sample_given(x0, t, noise, alphas_cumprod), t), x0)


def _loss_clean_input(model, x0, t, noise, alphas_cumprod):
    return F.mse_loss(model(x0, t), noise)


def _loss_sum(model, x0, t, noise, alphas_cumprod):
    return ((model(q_sample_given(x0, t, noise, alphas_cumprod), t) - noise) ** 2).sum()


def _loss_per_image_sum(model, x0, t, noise, alphas_cumprod):
    err = (model(q_sample_given(x0, t, noise, alphas_cumprod), t) - noise) ** 2
    return err.flatten(1).sum(1).mean()


def _loss_l1(model, x0, t, noise, alphas_cumprod):
    return (model(q_sample_given(x0, t, noise, alphas_cumprod), t) - noise).abs().mean()


def _loss_no_square(model, x0, t, noise, alphas_cumprod):
    return (model(q_sample_given(x0, t, noise, alphas_cumprod), t) - noise).mean()


def _loss_t_plus_one(model, x0, t, noise, alphas_cumprod):
    return F.mse_loss(model(q_sample_given(x0, t, noise, alphas_cumprod), t + 1), noise)


LOSS = Check(
    H.LOSS,
    reference=_loss_ref,
    tolerance=LOSS_TOL,
    given={"q_sample": q_sample_given},
    mistakes=(
        Mistake("x0 as the target", _loss_x0_target,
                "your loss compares the prediction with x0: the network predicts the NOISE, so the target is `noise`."),
        Mistake("the clean image as input", _loss_clean_input,
                "your loss feeds x0 to the model: it must see the noised x_t = q_sample(x0, t, noise, ...)."),
        Mistake("sum instead of mean", _loss_sum,
                "your loss is the SUM of squared errors: take the mean over every element (F.mse_loss's default), "
                "so the loss does not scale with the batch and image size."),
        Mistake("sum over pixels, mean over the batch", _loss_per_image_sum,
                "your loss sums over each image's pixels and averages over the batch: take the mean over every "
                "element, as F.mse_loss does."),
        Mistake("L1", _loss_l1,
                "your loss is the mean ABSOLUTE error: DDPM's simplified objective is the mean SQUARED error."),
        Mistake("no square", _loss_no_square,
                "your loss averages the signed errors, which cancel: square them first."),
        Mistake("t + 1", _loss_t_plus_one,
                "your model is told t + 1: give it the same t that q_sample used."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 4. one reverse step

def _step_ref(inputs):
    ab = inputs["alphas_cumprod"]
    t, prev_t = inputs["t"], inputs["prev_t"]
    scheduler = _quiet_ddpm(len(ab), ab, inputs["clip_sample"])
    if prev_t != t - 1:
        scheduler.set_timesteps(timesteps=[t] + ([prev_t] if prev_t >= 0 else []))
        scheduler.alphas_cumprod = ab.clone()
    generator = torch.Generator().manual_seed(inputs["noise_seed"])
    out = scheduler.step(inputs["model_output"], t, inputs["sample"], generator=generator)
    return out.prev_sample, out.pred_original_sample


def _step_generic(eps, t, x, noise, ab, prev_t, clip_sample=True, *, variance="small", std=True, noise_at_0=False,
                  clip=True, respaced=True, eps_form=False, x0_sqrt=True, no_noise=False):
    ab_t = ab[t]
    ab_prev = ab[prev_t] if prev_t >= 0 else torch.tensor(1.0)
    if respaced:
        alpha = ab_t / ab_prev
    else:
        alpha = ab[t] / (ab[t - 1] if t > 0 else torch.tensor(1.0))
    beta = 1 - alpha
    x0 = (x - (1 - ab_t).sqrt() * eps) / (ab_t.sqrt() if x0_sqrt else ab_t)
    if clip_sample and clip:
        x0 = x0.clamp(-1, 1)
    if eps_form:
        mean = (x - beta / (1 - ab_t).sqrt() * eps) / alpha.sqrt()
    else:
        mean = ab_prev.sqrt() * beta / (1 - ab_t) * x0 + alpha.sqrt() * (1 - ab_prev) / (1 - ab_t) * x
    var = (1 - ab_prev) / (1 - ab_t) * beta if variance == "small" else beta
    if (t > 0 or noise_at_0) and not no_noise:
        mean = mean + (var.sqrt() if std else var) * noise
    return mean, x0


def _mistake_step(**options):
    return lambda eps, t, x, noise, ab, prev_t, clip_sample=True: _step_generic(eps, t, x, noise, ab, prev_t, clip_sample,
                                                                              **options)


STEP = Check(
    H.STEP,
    reference=_step_ref,
    tolerance=STEP_TOL,
    mistakes=(
        Mistake("variance beta_t", _mistake_step(variance="large"),
                "your step adds noise of variance beta_t: this exercise uses the posterior variance "
                "beta~_t = (1 - abar_prev) / (1 - abar_t) * beta_t (diffusers' 'fixed_small')."),
        Mistake("variance used as the standard deviation", _mistake_step(std=False),
                "your step multiplies the noise by the variance: multiply by its square root, the standard deviation."),
        Mistake("no noise", _mistake_step(no_noise=True),
                "your step returns the mean without adding sigma_t * noise: DDPM sampling is stochastic "
                "(only t = 0 adds no noise)."),
        Mistake("x0 not clipped", _mistake_step(clip=False),
                "your predicted x0 is not clipped: with clip_sample=True clamp it to [-1, 1] before computing the mean."),
        Mistake("not respaced", _mistake_step(respaced=False),
                "on a strided step your beta comes from t - 1: between t and prev_t use alpha = abar_t / abar_prev "
                "and beta = 1 - alpha (the respaced chain)."),
        Mistake("epsilon form of the mean", _mistake_step(eps_form=True),
                "your mean is (x_t - beta / sqrt(1 - abar_t) * eps) / sqrt(alpha_t), which cannot use the clipped "
                "x0: compute the mean from the (clipped) predicted x0 and x_t with the posterior coefficients."),
        Mistake("x0 divided by abar", _mistake_step(x0_sqrt=False),
                "your predicted x0 divides by abar_t: divide by sqrt(abar_t), since x_t = sqrt(abar_t) x0 + ..."),
    ),
)


def ddpm_step_given(model_output: torch.Tensor, t: int, sample: torch.Tensor, noise: torch.Tensor,
                    alphas_cumprod: torch.Tensor, prev_t: int, clip_sample: bool = True):
    """The grader's ddpm_step, used while ddpm_sample is checked."""
    return _step_generic(model_output, int(t), sample, noise, alphas_cumprod, int(prev_t), bool(clip_sample))


# ---------------------------------------------------------------------------------------------
# 5. the sampling loop

def _loop_ref(inputs):
    ab, timesteps = inputs["alphas_cumprod"], inputs["timesteps"]
    scheduler = _quiet_ddpm(len(ab), ab, inputs["clip_sample"])
    scheduler.set_timesteps(timesteps=timesteps.tolist())
    scheduler.alphas_cumprod = ab.clone()
    model = H.build_toy(inputs)
    generator = torch.Generator().manual_seed(inputs["seed"])
    x = torch.randn(inputs["shape"], generator=generator)
    for t in timesteps.tolist():
        eps = model(x, torch.full((x.shape[0],), t, dtype=torch.int64))
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x


def _loop_generic(model, shape, ab, timesteps, generator, clip_sample=True, *, ascending=False, prev_minus_one=False,
                  fresh_noise=False, skip_last=False, jump_to_x0=False, uniform_start=False):
    x = (torch.rand(shape, generator=generator) * 2 - 1) if uniform_start else torch.randn(shape, generator=generator)
    ts = timesteps.tolist()
    if ascending:
        ts = ts[::-1]
    if skip_last:
        ts = ts[:-1]
    for i, t in enumerate(ts):
        prev_t = t - 1 if prev_minus_one else (ts[i + 1] if i + 1 < len(ts) else -1)
        eps = model(x, torch.full((shape[0],), t, dtype=torch.int64))
        if fresh_noise:
            noise = torch.randn(shape)
        elif t > 0:
            noise = torch.randn(shape, generator=generator)
        else:
            noise = torch.zeros(shape)
        x, x0 = ddpm_step_given(eps, t, x, noise, ab, prev_t, clip_sample)
        if jump_to_x0:
            x = x0
    return x


def _mistake_loop(**options):
    return lambda model, shape, ab, timesteps, generator, clip_sample=True: _loop_generic(
        model, shape, ab, timesteps, generator, clip_sample, **options)


LOOP = Check(
    H.LOOP,
    reference=_loop_ref,
    tolerance=LOOP_TOL,
    given={"ddpm_step": ddpm_step_given},
    mistakes=(
        Mistake("timesteps in increasing order", _mistake_loop(ascending=True),
                "your loop walks the timesteps upwards: sampling goes from the noisiest step down to t = 0, in "
                "the order given."),
        Mistake("prev_t = t - 1 on a strided list", _mistake_loop(prev_minus_one=True),
                "your loop steps from t to t - 1 even when the timesteps are strided: prev_t is the NEXT entry of "
                "`timesteps` (and -1 after the last)."),
        Mistake("predicted x0 as the next sample", _mistake_loop(jump_to_x0=True),
                "your loop continues from the predicted x0: continue from prev_sample, the sample at the next "
                "timestep (x0 is only the model's current guess)."),
        Mistake("uniform start", _mistake_loop(uniform_start=True),
                "your x_T is uniform noise (torch.rand): start from a standard Gaussian, torch.randn(shape, "
                "generator=generator)."),
        Mistake("last timestep skipped", _mistake_loop(skip_last=True),
                "your loop stops before the last timestep: call the model and take a step at every entry of `timesteps`."),
    ),
)


CHECKS = CheckSet(CHAPTER, [SCHEDULE, Q_SAMPLE, LOSS, STEP, LOOP])
check = CHECKS.check
