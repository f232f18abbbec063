"""Chapter 13: the solution passes every check; plausible wrong answers and the stubs are rejected."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autograders import stable_diffusion as ag
from autograders.engine.core import evaluate, make_inputs
from autograders.harness import stable_diffusion as H
from checks_support import chapter_tests, assert_accepts, assert_rejects
from notebook_code import load_solutions

sol = load_solutions(ag.CHAPTER)
NAMES = ["reparameterize", "vae_loss", "cfg_combine", "frechet_distance"]
globals().update(chapter_tests(ag.CHECKS, H.TASKS, NAMES, sol))


def test_grading_cells_do_not_train():
    for name in ("vae", "judge", "denoiser", "ema", "results"):
        assert not hasattr(sol, name), f"{name} is defined before the last exercise"


def test_the_guider_reference_logs_nothing(capsys):
    case = H.CFG.cases[0]
    ag.CFG.reference(make_inputs(case, seed=0))
    captured = capsys.readouterr()
    assert "experimental" not in captured.err + captured.out


# --- the references agree with the formulas --------------------------------------------------------

def test_posterior_reference_draws_the_inputs_noise():
    for case in H.REPARAMETERIZE.cases:
        i = make_inputs(case, seed=3)
        z, _, _ = ag.REPARAMETERIZE.reference(i)
        expected = i["mean"] + torch.exp(0.5 * i["logvar"].clamp(-30, 20)) * i["noise"]
        torch.testing.assert_close(z, expected)


def test_guider_equals_the_pipeline_formula():
    for case in H.CFG.cases:
        i = make_inputs(case, seed=1)
        expected = i["eps_uncond"] + i["guidance_scale"] * (i["eps_cond"] - i["eps_uncond"])
        torch.testing.assert_close(ag.CFG.reference(i), expected)


def test_fid_reference_equals_coursekit_and_the_solution_in_float64():
    from coursekit.judge import frechet_distance, gaussian_fit

    for case in H.FID.cases:
        i = make_inputs(case, seed=2)
        ref = ag.FID.reference(i).item()
        ours = frechet_distance(*gaussian_fit(i["features_a"]), *gaussian_fit(i["features_b"]))
        assert abs(ours - ref) <= 1e-7 + 1e-8 * abs(ref), case.name
        assert abs(sol.frechet_distance(i["features_a"], i["features_b"]).item() - ref) <= 1e-7 + 1e-7 * abs(ref)


def test_kl_term_is_zero_for_the_prior():
    x = torch.zeros(2, 1, 8, 8)
    loss, rec, kl = sol.vae_loss(x, x, torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2), 1.0)
    assert loss.item() == rec.item() == kl.item() == 0.0


# --- reparameterize ------------------------------------------------------------------------------

def reparam_detached(mean, logvar, noise):
    return sol.reparameterize(mean, logvar, noise).detach()


def reparam_fresh_noise(mean, logvar, noise):
    return sol.reparameterize(mean, logvar, torch.randn_like(noise))


def reparam_std_from_sqrt(mean, logvar, noise):
    return mean + logvar.clamp(-30, 20).exp().sqrt() * noise + 0 * logvar  # correct, written another way


def reparam_variance(mean, logvar, noise):
    return mean + torch.exp(logvar.clamp(-30, 20)) * noise


def reparam_minus(mean, logvar, noise):
    return mean - torch.exp(0.5 * logvar.clamp(-30, 20)) * noise


def test_reparameterize_other_correct_forms_pass():
    assert_accepts(ag.CHECKS, "reparameterize", reparam_std_from_sqrt)


@pytest.mark.parametrize("wrong, hint", [
    (reparam_detached, "not differentiable"),
    (reparam_fresh_noise, None),
    (reparam_variance, "exp(logvar / 2)"),
    (reparam_minus, None),
])
def test_reparameterize_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "reparameterize", wrong, hint)


def test_reparameterize_without_clamp_fails_the_hidden_extreme_case():
    report = evaluate(ag.CHECKS["reparameterize"], lambda m, lv, n: m + torch.exp(0.5 * lv) * n, seed=0, hidden=True)
    assert not report.passed and "[-30, 20]" in report.summary()



# --- vae_loss --------------------------------------------------------------------------------------

def vae_pixel_mean(x, reconstruction, mean, logvar, beta):
    loss, rec, kl = sol.vae_loss(x, reconstruction, mean, logvar, beta)
    rec = F.mse_loss(reconstruction, x)
    return rec + beta * kl, rec, kl


def vae_items(x, reconstruction, mean, logvar, beta):
    loss, rec, kl = sol.vae_loss(x, reconstruction, mean, logvar, beta)
    return loss.item(), rec, kl


def vae_per_image(x, reconstruction, mean, logvar, beta):
    rec = ((reconstruction - x) ** 2).flatten(1).sum(1)
    lv = logvar.clamp(-30, 20)
    kl = 0.5 * (mean ** 2 + lv.exp() - 1 - lv).flatten(1).sum(1)
    return rec + beta * kl, rec, kl


def vae_kl_of_std(x, reconstruction, mean, logvar, beta):
    rec = ((reconstruction - x) ** 2).flatten(1).sum(1).mean()
    std = torch.exp(0.5 * logvar.clamp(-30, 20))
    kl = 0.5 * (mean ** 2 + std - 1 - std.log()).flatten(1).sum(1).mean()
    return rec + beta * kl, rec, kl


def vae_swapped_terms(x, reconstruction, mean, logvar, beta):
    loss, rec, kl = sol.vae_loss(x, reconstruction, mean, logvar, beta)
    return loss, kl, rec


def vae_beta_on_reconstruction(x, reconstruction, mean, logvar, beta):
    _, rec, kl = sol.vae_loss(x, reconstruction, mean, logvar, beta)
    return beta * rec + kl, rec, kl


@pytest.mark.parametrize("wrong, hint", [
    (vae_pixel_mean, "mean over every pixel"),
    (vae_items, "do not call .item()"),
    (vae_per_image, "single number"),
    (vae_kl_of_std, None),
    (vae_swapped_terms, None),
    (vae_beta_on_reconstruction, None),
])
def test_vae_loss_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "vae_loss", wrong, hint)


# --- cfg_combine -----------------------------------------------------------------------------------

def cfg_dit(eps_uncond, eps_cond, scale):
    guided = eps_uncond + scale * (eps_cond - eps_uncond)
    return torch.cat([guided[:, :3], eps_cond[:, 3:]], dim=1)


def cfg_first_channel_only(eps_uncond, eps_cond, scale):
    out = eps_cond.clone()
    out[:, 0] = eps_uncond[:, 0] + scale * (eps_cond[:, 0] - eps_uncond[:, 0])
    return out


def cfg_in_place(eps_uncond, eps_cond, scale):
    eps_cond.sub_(eps_uncond).mul_(scale).add_(eps_uncond)  # correct, and in place: allowed
    return eps_cond


def cfg_scale_minus_one(eps_uncond, eps_cond, scale):
    return eps_uncond + (scale - 1) * (eps_cond - eps_uncond)


def cfg_batch_mean(eps_uncond, eps_cond, scale):
    guided = eps_uncond + scale * (eps_cond - eps_uncond)
    return guided.mean(0, keepdim=True).expand_as(guided)


def test_cfg_in_place_passes():
    assert_accepts(ag.CHECKS, "cfg_combine", cfg_in_place)


@pytest.mark.parametrize("wrong, hint", [
    (cfg_dit, "EVERY channel"),
    (cfg_first_channel_only, None),
    (cfg_scale_minus_one, None),
    (cfg_batch_mean, None),
    (lambda u, c, s: c + s * (u - c), "UNconditional"),
])
def test_cfg_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "cfg_combine", wrong, hint)


# --- frechet_distance ----------------------------------------------------------------------------

def fid_scipy(features_a, features_b):
    """Correct, the pytorch-fid way."""
    import scipy.linalg

    a, b = features_a.double().numpy(), features_b.double().numpy()
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    d = a.mean(0) - b.mean(0)
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))


def fid_with(**changes):
    def impl(features_a, features_b):
        a, b = features_a.double(), features_b.double()
        if changes.get("float32"):
            a, b = features_a.float(), features_b.float()

        def fit(f):
            mu = f.mean(0)
            c = f - mu
            return mu, c.T @ c / (f.shape[0] - (0 if changes.get("biased") else 1))
        (m1, s1), (m2, s2) = fit(a), fit(b)
        if changes.get("elementwise"):
            tr = (s1 * s2).clamp(min=0).sqrt().trace()
        elif changes.get("sum_of_roots"):
            root = lambda s: (lambda w, v: (v * w.clamp(min=0).sqrt()) @ v.T)(*torch.linalg.eigh(s))
            tr = (root(s1) @ root(s2)).trace()
        else:
            w, v = torch.linalg.eigh(s1)
            r = (v * w.clamp(min=0).sqrt()) @ v.T
            tr = torch.linalg.eigvalsh(r @ s2 @ r).clamp(min=0).sqrt().sum()
        mean_term = (m1 - m2).norm() if changes.get("norm") else ((m1 - m2) ** 2).sum()
        return (mean_term + s1.trace() + s2.trace() - 2 * tr).reshape(1)
    return impl


def test_fid_other_correct_forms_pass():
    assert_accepts(ag.CHECKS, "frechet_distance", fid_scipy)
    assert_accepts(ag.CHECKS, "frechet_distance", fid_with())


@pytest.mark.parametrize("wrong, hint", [
    (fid_with(biased=True), "N - 1"),
    (fid_with(float32=True), "float64"),
    (fid_with(elementwise=True), None),
    (fid_with(sum_of_roots=True), "PRODUCT"),
    (fid_with(norm=True), "SQUARED"),
    (lambda a, b: sol.frechet_distance(a, b).sqrt(), None),
])
def test_fid_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "frechet_distance", wrong, hint)


def test_the_solution_says_what_is_wrong_with_bad_inputs():
    z = torch.zeros(2, 4, 2, 2)
    with pytest.raises(ValueError, match="one shape"):
        sol.reparameterize(z, z[:, :3], z)
    with pytest.raises(ValueError, match="must match"):
        sol.vae_loss(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 4, 4), z, z, 0.1)
    with pytest.raises(ValueError, match="one shape"):
        sol.cfg_combine(z, z[:, :3], 2.0)
    with pytest.raises(ValueError, match="same d"):
        sol.frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
