"""Chapter 12: the solution passes every check; plausible wrong answers and the stubs are rejected."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from autograders import ddpm as ag
from autograders.engine.core import evaluate, make_inputs
from autograders.harness import ddpm as H
from checks_support import chapter_tests, assert_accepts, assert_rejects
from notebook_code import load_solutions

sol = load_solutions(ag.CHAPTER)
NAMES = ["noise_schedule", "q_sample", "ddpm_loss", "ddpm_step", "ddpm_sample"]
globals().update(chapter_tests(ag.CHECKS, H.TASKS, NAMES, sol, hidden_seeds=(123,)))


def test_grading_cells_do_not_train():
    """The grader runs the cells up to the last exercise: no judge, no U-Net, no training there."""
    for name in ("net", "ema", "judge", "losses", "trained"):
        assert not hasattr(sol, name), f"{name} is defined before the last exercise"


def test_the_given_versions_pass_their_own_checks():
    assert_accepts(ag.CHECKS, "q_sample", ag.q_sample_given)
    assert_accepts(ag.CHECKS, "ddpm_step", ag.ddpm_step_given)


# --- the references ----------------------------------------------------------------------------------

def test_step_reference_draws_the_same_noise_as_the_inputs():
    """diffusers' step draws its noise from a generator: the one seeded like the task's noise."""
    from diffusers.utils.torch_utils import randn_tensor

    for case in H.STEP.cases:
        inputs = make_inputs(case, seed=4)
        again = randn_tensor(inputs["noise"].shape, generator=torch.Generator().manual_seed(inputs["noise_seed"]),
                             dtype=torch.float32)
        assert torch.equal(again, inputs["noise"])


def test_step_reference_equals_the_posterior_formula():
    case = next(c for c in H.STEP.cases if c.name.startswith("strided: t=980"))
    i = make_inputs(case, seed=2)
    ab = i["alphas_cumprod"].double()
    t, p = i["t"], i["prev_t"]
    beta = 1 - ab[t] / ab[p]
    x0 = ((i["sample"] - (1 - ab[t]).sqrt() * i["model_output"]) / ab[t].sqrt()).clamp(-1, 1)
    mean = ab[p].sqrt() * beta / (1 - ab[t]) * x0 + (1 - beta).sqrt() * (1 - ab[p]) / (1 - ab[t]) * i["sample"]
    expected = mean + ((1 - ab[p]) / (1 - ab[t]) * beta).sqrt() * i["noise"]
    got, got_x0 = ag.STEP.reference(i)
    torch.testing.assert_close(got.double(), expected.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_x0.double(), x0.double(), atol=1e-5, rtol=1e-5)


def test_loop_reference_equals_coursekit_sample_loop():
    from coursekit.diffusion import DDPMScheduler, sample_loop

    case = H.LOOP.cases[0]
    i = make_inputs(case, seed=1)
    s = DDPMScheduler(len(i["alphas_cumprod"]))
    s.alphas_cumprod = i["alphas_cumprod"]
    s.set_timesteps(timesteps=i["timesteps"].tolist())
    out, _ = sample_loop(H.build_toy(i), s, i["shape"], generator=torch.Generator().manual_seed(i["seed"]))
    torch.testing.assert_close(out, ag.LOOP.reference(i), atol=1e-5, rtol=1e-5)


def test_harness_inputs_are_the_schedules_they_say():
    from coursekit.diffusion import make_betas

    assert torch.equal(H.linear_alphas_cumprod(1000), torch.cumprod(1 - make_betas(1000), 0))
    torch.testing.assert_close(H.cosine_alphas_cumprod(100), torch.cumprod(1 - make_betas(100, "cosine"), 0),
                               atol=1e-7, rtol=1e-6)


def test_toy_model_insists_on_batched_integer_timesteps():
    model = H.ToyDenoiser(torch.randn(1, 1, 3, 3), torch.zeros(1))
    x = torch.randn(2, 1, 8, 8)
    assert model(x, torch.tensor([3, 4])).shape == x.shape
    for bad in (3, torch.tensor(3), torch.tensor([3.0, 4.0]), torch.tensor([1, 2, 3])):
        with pytest.raises(TypeError, match=r"\(B,\)"):
            model(x, bad)


# --- noise_schedule --------------------------------------------------------------------------------------

def schedule_python_floats(T, kind="linear", beta_start=1e-4, beta_end=0.02):
    """Correct, written like diffusers: a Python loop over math.cos."""
    if kind == "linear":
        betas = torch.linspace(beta_start, beta_end, T)
    else:
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float32)
    return betas, torch.cumprod(1 - betas, 0)


def schedule_float64_products(T, kind="linear", beta_start=1e-4, beta_end=0.02):
    """Also correct: products in float64, rounded at the end."""
    betas, _ = sol.noise_schedule(T, kind, beta_start, beta_end)
    return betas, torch.cumprod(1 - betas.double(), 0).float()


def test_other_correct_schedules_pass():
    assert_accepts(ag.CHECKS, "noise_schedule", schedule_python_floats)
    assert_accepts(ag.CHECKS, "noise_schedule", schedule_float64_products)


def schedule_float32_cosine(T, kind="linear", beta_start=1e-4, beta_end=0.02):
    if kind == "linear":
        return sol.noise_schedule(T, kind, beta_start, beta_end)
    s = torch.arange(T + 1, dtype=torch.float32) / T
    f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return betas, torch.cumprod(1 - betas, 0)


def schedule_alphas_not_cumulative(T, kind="linear", beta_start=1e-4, beta_end=0.02):
    betas, _ = sol.noise_schedule(T, kind, beta_start, beta_end)
    return betas, 1 - betas


def schedule_arange_linear(T, kind="linear", beta_start=1e-4, beta_end=0.02):
    if kind != "linear":
        return sol.noise_schedule(T, kind, beta_start, beta_end)
    step = (beta_end - beta_start) / T
    betas = torch.arange(T, dtype=torch.float32) * step + beta_start
    return betas, torch.cumprod(1 - betas, 0)


def schedule_cosine_without_offset(T, kind="linear", beta_start=1e-4, beta_end=0.02):
    if kind == "linear":
        return sol.noise_schedule(T, kind, beta_start, beta_end)
    s = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos(s * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999).float()
    return betas, torch.cumprod(1 - betas, 0)


def schedule_cosine_shifted(T, kind="linear", beta_start=1e-4, beta_end=0.02):
    """Off by one: beta_t from f(t/T) and f((t-1)/T)."""
    if kind == "linear":
        return sol.noise_schedule(T, kind, beta_start, beta_end)
    s = torch.arange(-1, T, dtype=torch.float64) / T
    f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999).float()
    return betas, torch.cumprod(1 - betas, 0)


def schedule_float64(T, kind="linear", beta_start=1e-4, beta_end=0.02):
    betas, abar = sol.noise_schedule(T, kind, beta_start, beta_end)
    return betas.double(), abar.double()


@pytest.mark.parametrize("wrong, hint", [
    (schedule_float32_cosine, "float64"),
    (schedule_alphas_not_cumulative, None),
    (schedule_arange_linear, "beta_end INCLUDED"),
    (schedule_cosine_without_offset, "without the offset"),
    (schedule_cosine_shifted, None),
    (schedule_float64, "float32 tensor"),
])
def test_noise_schedule_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "noise_schedule", wrong, hint)


def test_noise_schedule_says_what_is_wrong_with_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        sol.noise_schedule(10, "quadratic")
    with pytest.raises(ValueError, match="positive integer"):
        sol.noise_schedule(0)


def test_cosine_cap_is_checked_by_a_hidden_case():
    def uncapped(T, kind="linear", beta_start=1e-4, beta_end=0.02):
        if kind == "linear":
            return sol.noise_schedule(T, kind, beta_start, beta_end)
        s = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).float()
        return betas, torch.cumprod(1 - betas, 0)
    report = evaluate(ag.CHECKS["noise_schedule"], uncapped, seed=0, hidden=None)
    assert not report.passed and "0.999" in report.summary()


# --- q_sample ------------------------------------------------------------------------------------------

def _abar(alphas_cumprod, t, x):
    return alphas_cumprod[t].view(-1, *([1] * (x.ndim - 1)))


def q_variance_not_preserved(x0, t, noise, alphas_cumprod):
    a = _abar(alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a) * noise


def q_uses_betas_product(x0, t, noise, alphas_cumprod):  # sqrt(1 - abar) written as 1 - sqrt(abar)
    a = _abar(alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a.sqrt()) * noise


def q_last_axis(x0, t, noise, alphas_cumprod):
    a = alphas_cumprod[t]
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def q_one_level_for_all(x0, t, noise, alphas_cumprod):
    a = alphas_cumprod[t[0]]
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def q_swapped(x0, t, noise, alphas_cumprod):
    a = _abar(alphas_cumprod, t, x0)
    return (1 - a).sqrt() * x0 + a.sqrt() * noise


@pytest.mark.parametrize("wrong, hint", [
    (q_variance_not_preserved, None),
    (q_uses_betas_product, None),
    (q_last_axis, None),           # a shape error on most cases, the broadcasting hint on the batch-8 case
    (q_one_level_for_all, None),
    (q_swapped, "SIGNAL"),
])
def test_q_sample_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "q_sample", wrong, hint)


def test_q_sample_broadcast_mistake_gets_its_hint_when_graded():
    report = evaluate(ag.CHECKS["q_sample"], q_last_axis, seed=0, hidden=True)
    assert not report.passed and "(B, 1, 1, ...)" in report.summary()


# --- ddpm_loss -----------------------------------------------------------------------------------------

def loss_item(model, x0, t, noise, alphas_cumprod):
    return sol.ddpm_loss(model, x0, t, noise, alphas_cumprod).item()


def loss_detached(model, x0, t, noise, alphas_cumprod):
    return sol.ddpm_loss(model, x0, t, noise, alphas_cumprod).detach()


def loss_per_example(model, x0, t, noise, alphas_cumprod):
    x_t = sol.q_sample(x0, t, noise, alphas_cumprod)
    return ((model(x_t, t) - noise) ** 2).flatten(1).mean(1)


def loss_predicts_x0(model, x0, t, noise, alphas_cumprod):
    return F.mse_loss(model(sol.q_sample(x0, t, noise, alphas_cumprod), t), x0)


def loss_fresh_noise(model, x0, t, noise, alphas_cumprod):
    fresh = torch.randn_like(noise)
    return F.mse_loss(model(sol.q_sample(x0, t, fresh, alphas_cumprod), t), fresh)


def loss_sum(model, x0, t, noise, alphas_cumprod):
    return F.mse_loss(model(sol.q_sample(x0, t, noise, alphas_cumprod), t), noise, reduction="sum")


def loss_t_as_fraction(model, x0, t, noise, alphas_cumprod):
    return F.mse_loss(model(sol.q_sample(x0, t, noise, alphas_cumprod), t.float() / 1000), noise)


@pytest.mark.parametrize("wrong, hint", [
    (loss_item, "do not call .item()"),
    (loss_detached, "not connected"),
    (loss_per_example, "scalar"),
    (loss_predicts_x0, "target is `noise`"),
    (loss_fresh_noise, None),
    (loss_sum, "SUM of squared errors"),
    (loss_t_as_fraction, "integer tensor"),
])
def test_ddpm_loss_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "ddpm_loss", wrong, hint)


def test_ddpm_loss_is_graded_with_the_given_q_sample():
    """A wrong q_sample costs its own points only: the loss is checked with the grader's."""
    namespace = {"F": F, "torch": torch, "q_sample": q_swapped}
    exec("def ddpm_loss(model, x0, t, noise, alphas_cumprod):\n"
         "    return F.mse_loss(model(q_sample(x0, t, noise, alphas_cumprod), t), noise)\n", namespace)
    assert_accepts(ag.CHECKS, "ddpm_loss", namespace["ddpm_loss"])
    assert namespace["q_sample"] is q_swapped, "the student's function must be put back"


# --- ddpm_step -----------------------------------------------------------------------------------------

def step_fixed_large(model_output, t, sample, noise, alphas_cumprod, prev_t, clip_sample=True):
    mean, x0 = sol.ddpm_step(model_output, t, sample, torch.zeros_like(noise), alphas_cumprod, prev_t, clip_sample)
    ab_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
    beta = 1 - alphas_cumprod[t] / ab_prev
    return (mean + beta.sqrt() * noise if t > 0 else mean), x0


def step_no_clip(model_output, t, sample, noise, alphas_cumprod, prev_t, clip_sample=True):
    return sol.ddpm_step(model_output, t, sample, noise, alphas_cumprod, prev_t, False)


def step_always_clip(model_output, t, sample, noise, alphas_cumprod, prev_t, clip_sample=True):
    return sol.ddpm_step(model_output, t, sample, noise, alphas_cumprod, prev_t, True)


def step_full_chain_beta(model_output, t, sample, noise, alphas_cumprod, prev_t, clip_sample=True):
    """Uses abar_{t-1} for alpha even on strided steps."""
    return sol.ddpm_step(model_output, t, sample, noise, alphas_cumprod, t - 1 if t > 0 else -1, clip_sample)


def step_eps_form(model_output, t, sample, noise, alphas_cumprod, prev_t, clip_sample=True):
    ab = alphas_cumprod[t]
    ab_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
    alpha = ab / ab_prev
    mean = (sample - (1 - alpha) / (1 - ab).sqrt() * model_output) / alpha.sqrt()
    x0 = (sample - (1 - ab).sqrt() * model_output) / ab.sqrt()
    if clip_sample:
        x0 = x0.clamp(-1, 1)
    if t > 0:
        mean = mean + ((1 - ab_prev) / (1 - ab) * (1 - alpha)).sqrt() * noise
    return mean, x0


def step_swapped_outputs(model_output, t, sample, noise, alphas_cumprod, prev_t, clip_sample=True):
    prev, x0 = sol.ddpm_step(model_output, t, sample, noise, alphas_cumprod, prev_t, clip_sample)
    return x0, prev


def step_noise_at_every_t_with_variance_beta(model_output, t, sample, noise, alphas_cumprod, prev_t, clip_sample=True):
    mean, x0 = sol.ddpm_step(model_output, t, sample, torch.zeros_like(noise), alphas_cumprod, prev_t, clip_sample)
    beta = 1 - alphas_cumprod[t] / (alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0))
    return mean + beta.sqrt() * noise, x0


@pytest.mark.parametrize("wrong, hint", [
    (step_fixed_large, "beta~_t"),
    (step_no_clip, "not clipped"),
    (step_always_clip, None),
    (step_full_chain_beta, None),
    (step_eps_form, "cannot use the clipped"),
    (step_swapped_outputs, None),
    (step_noise_at_every_t_with_variance_beta, None),
])
def test_ddpm_step_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "ddpm_step", wrong, hint)


# --- ddpm_sample ---------------------------------------------------------------------------------------

def sample_with(**changes):
    def impl(model, shape, alphas_cumprod, timesteps, generator, clip_sample=True):
        x = torch.randn(shape, generator=generator)
        steps = [int(t) for t in timesteps]
        for i, t in enumerate(steps):
            prev_t = steps[i + 1] if i + 1 < len(steps) else -1
            if changes.get("prev_t_minus_one"):
                prev_t = t - 1
            tt = t if changes.get("int_t") else torch.full((shape[0],), t, dtype=torch.int64)
            eps = model(x, tt)
            noise = torch.randn_like(x) if changes.get("global_rng") else torch.randn(shape, generator=generator)
            x, x0 = sol.ddpm_step(eps, t, x, noise, alphas_cumprod, prev_t,
                                  False if changes.get("no_clip") else clip_sample)
            if changes.get("continue_from_x0"):
                x = x0
        return x
    return impl


@pytest.mark.parametrize("wrong, hint", [
    (sample_with(prev_t_minus_one=True), "NEXT entry"),
    (sample_with(int_t=True), "integer tensor"),
    (sample_with(global_rng=True), None),
    (sample_with(continue_from_x0=True), "continue from prev_sample"),
    (sample_with(no_clip=True), None),
])
def test_ddpm_sample_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "ddpm_sample", wrong, hint)


def test_drawing_noise_at_t0_too_is_fine():
    """The last step ignores its noise; whether it is drawn does not change the result."""
    assert_accepts(ag.CHECKS, "ddpm_sample", sample_with())


def test_ddpm_sample_is_graded_with_the_given_step():
    def broken_step(model_output, t, sample, noise, alphas_cumprod, prev_t, clip_sample=True):
        return sample, sample
    namespace = {"torch": torch, "ddpm_step": broken_step}
    exec("def ddpm_sample(model, shape, alphas_cumprod, timesteps, generator, clip_sample=True):\n"
         "    x = torch.randn(shape, generator=generator)\n"
         "    steps = [int(t) for t in timesteps]\n"
         "    for i, t in enumerate(steps):\n"
         "        prev_t = steps[i + 1] if i + 1 < len(steps) else -1\n"
         "        eps = model(x, torch.full((shape[0],), t, dtype=torch.int64))\n"
         "        noise = torch.randn(shape, generator=generator)\n"
         "        x, _ = ddpm_step(eps, t, x, noise, alphas_cumprod, prev_t, clip_sample)\n"
         "    return x\n", namespace)
    assert_accepts(ag.CHECKS, "ddpm_sample", namespace["ddpm_sample"])


def test_the_solution_says_what_is_wrong_with_bad_inputs():
    abar = H.linear_alphas_cumprod(100)
    x = torch.zeros(3, 1, 8, 8)
    with pytest.raises(ValueError, match=r"t of shape \(B,\)"):
        sol.q_sample(x, torch.tensor(5), x, abar)
    with pytest.raises(ValueError, match="prev_t < t"):
        sol.ddpm_step(x, 10, x, x, abar, 10)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sol.ddpm_sample(lambda a, b: a, (1, 1, 2, 2), abar, torch.tensor([0, 10]), torch.Generator())


# --- the reference may not stand in for the student's code ----------------------------------------

def test_diffusers_schedulers_may_not_compute_the_answer():
    """diffusers' DDPMScheduler is what the checks compare with; called inside an exercise it scores 0."""
    from diffusers import DDPMScheduler

    def schedule_by_diffusers(T, kind="linear", beta_start=1e-4, beta_end=0.02):
        s = DDPMScheduler(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end,
                          beta_schedule="linear" if kind == "linear" else "squaredcos_cap_v2")
        return s.betas.float(), s.alphas_cumprod.float()

    def q_sample_by_diffusers(x0, t, noise, alphas_cumprod):
        s = DDPMScheduler(num_train_timesteps=len(alphas_cumprod))
        s.alphas_cumprod = alphas_cumprod
        return s.add_noise(x0, noise, t)

    def loss_by_diffusers(model, x0, t, noise, alphas_cumprod):
        return F.mse_loss(model(q_sample_by_diffusers(x0, t, noise, alphas_cumprod), t), noise)

    for name, impl in (("noise_schedule", schedule_by_diffusers), ("q_sample", q_sample_by_diffusers),
                       ("ddpm_loss", loss_by_diffusers)):
        assert_rejects(ag.CHECKS, name, impl, hint="diffusers' DDPMScheduler")
