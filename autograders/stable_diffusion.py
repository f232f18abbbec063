"""Checks for chapter 13, Stable Diffusion.

References: diffusers' ``DiagonalGaussianDistribution`` (the posterior of ``AutoencoderKL``: log-variance
clamped to [-30, 20], ``sample`` = mean + std * noise, ``kl`` summed over the latent axes) for the
reparameterisation and the KL term; ``F.mse_loss(reduction="sum")`` for the reconstruction term;
diffusers' ``ClassifierFreeGuidance`` guider (the formula of its Stable Diffusion pipelines,
``uncond + scale * (cond - uncond)``) for guidance; and the float64 computation of pytorch-fid's
``calculate_frechet_distance`` with ``scipy.linalg.sqrtm`` for the Frechet distance.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from autograders.engine.core import Check, CheckSet, Mistake, Tolerance
from autograders.harness import stable_diffusion as H

CHAPTER = H.CHAPTER


def _posterior(mean, logvar):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))


REPARAM_TOL = Tolerance(1e-6, 1e-5, "float32: one exp, one product and one sum per element")
VAE_TOL = Tolerance(1e-5, 1e-5, "float32 sums of a few hundred terms; with log-variances up to 20, exp() "
                                "values of ~5e8 are rounded to ~30, well within the relative part")
CFG_TOL = Tolerance(1e-6, 1e-6, "float32: a difference, a product and a sum per element")
FID_TOL = Tolerance(1e-7, 1e-6, "float64 throughout: an eigendecomposition and scipy's sqrtm agree to ~1e-10 "
                                "relative; a float32 computation is off by 1e-5 or more")


# ---------------------------------------------------------------------------------------------
# 1. reparameterize

def _reparam_ref(inputs):
    mean = inputs["mean"].clone().requires_grad_(True)
    logvar = inputs["logvar"].clone().requires_grad_(True)
    with torch.enable_grad():
        z = _posterior(mean, logvar).sample(generator=torch.Generator().manual_seed(inputs["noise_seed"]))
        (z * inputs["noise"].flip(0)).sum().backward()
    return z.detach(), mean.grad, logvar.grad


REPARAMETERIZE = Check(
    H.REPARAMETERIZE,
    reference=_reparam_ref,
    tolerance=REPARAM_TOL,
    mistakes=(
        Mistake("variance as the standard deviation", lambda m, lv, n: m + torch.exp(lv.clamp(-30, 20)) * n,
                "your sample scales the noise by exp(logvar), the variance: the standard deviation is "
                "exp(logvar / 2)."),
        Mistake("log-variance as the standard deviation", lambda m, lv, n: m + lv * n,
                "your sample scales the noise by logvar itself: the standard deviation is exp(logvar / 2)."),
        Mistake("no clamp", lambda m, lv, n: m + torch.exp(0.5 * lv) * n,
                "your sample does not clamp the log-variance: clamp it to [-30, 20] first, as diffusers' "
                "DiagonalGaussianDistribution does, so that an extreme encoder output cannot overflow."),
        Mistake("the mean only", lambda m, lv, n: m + 0 * lv,
                "your sample is the mean: add exp(logvar / 2) * noise, or the VAE has no noise to be robust to."),
        Mistake("the standard deviation inside the exponent", lambda m, lv, n: m + torch.exp(0.5 * lv.clamp(-30, 20) * n),
                "your sample is mean + exp(logvar * noise / 2): multiply the standard deviation by the noise, "
                "mean + exp(logvar / 2) * noise."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. vae_loss

def _vae_ref(inputs):
    x = inputs["x"]
    rec = inputs["reconstruction"].clone().requires_grad_(True)
    mean = inputs["mean"].clone().requires_grad_(True)
    logvar = inputs["logvar"].clone().requires_grad_(True)
    with torch.enable_grad():
        rec_term = F.mse_loss(rec, x, reduction="sum") / x.shape[0]
        kl = _posterior(mean, logvar).kl().mean()
        loss = rec_term + inputs["beta"] * kl
        loss.backward()
    return (loss.detach().reshape(1), rec_term.detach().reshape(1), kl.detach().reshape(1), rec.grad, mean.grad,
            logvar.grad)


def _vae_generic(x, rec, mean, logvar, beta, *, rec_mean=False, kl_half=True, kl_mean=False, use_beta=True,
                 clamp=True, kl_sign=1.0, std_for_var=False):
    lv = logvar.clamp(-30, 20) if clamp else logvar
    if rec_mean:
        rec_term = F.mse_loss(rec, x)
    else:
        rec_term = ((rec - x) ** 2).flatten(1).sum(1).mean()
    var = torch.exp(0.5 * lv) if std_for_var else lv.exp()
    per = (mean ** 2 + var - 1 - lv) * (0.5 if kl_half else 1.0)
    kl = per.flatten(1).mean(1).mean() if kl_mean else per.flatten(1).sum(1).mean()
    kl = kl_sign * kl
    return rec_term + (beta if use_beta else 1.0) * kl, rec_term, kl


def _vae_mistake(**options):
    return lambda x, rec, mean, logvar, beta: _vae_generic(x, rec, mean, logvar, beta, **options)


VAE_LOSS = Check(
    H.VAE_LOSS,
    reference=_vae_ref,
    tolerance=VAE_TOL,
    mistakes=(
        Mistake("reconstruction averaged over pixels", _vae_mistake(rec_mean=True),
                "your reconstruction term is the mean over every pixel (F.mse_loss's default): sum the squared "
                "errors over each image's pixels and average over the batch, so that beta weighs the KL against "
                "a whole image."),
        Mistake("KL without the 1/2", _vae_mistake(kl_half=False),
                "your KL term is twice too large: KL = 1/2 * sum(mean^2 + var - 1 - logvar)."),
        Mistake("KL averaged over latent elements", _vae_mistake(kl_mean=True),
                "your KL term averages over the latent elements: sum them per image (as diffusers' "
                "DiagonalGaussianDistribution.kl does), then average over the batch."),
        Mistake("beta not applied", _vae_mistake(use_beta=False),
                "your loss adds the KL term with weight 1: multiply it by beta."),
        Mistake("KL subtracted", _vae_mistake(kl_sign=-1.0),
                "your KL term has the wrong sign: the KL divergence is >= 0 and is ADDED to the loss."),
        Mistake("no clamp", _vae_mistake(clamp=False),
                "your KL does not clamp the log-variance to [-30, 20] (diffusers' DiagonalGaussianDistribution "
                "does, and so should your reparameterize)."),
        Mistake("std in place of the variance", _vae_mistake(std_for_var=True),
                "your KL uses exp(logvar / 2), the standard deviation, where the variance exp(logvar) belongs."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 3. cfg_combine

def _guider(scale: float):
    """diffusers' ClassifierFreeGuidance, built without its "experimental feature" log line."""
    import logging

    from diffusers.guiders import ClassifierFreeGuidance

    log = logging.getLogger("diffusers.guiders.guider_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return ClassifierFreeGuidance(guidance_scale=scale)
    finally:
        log.setLevel(level)


def _cfg_ref(inputs):
    return _guider(inputs["guidance_scale"]).forward(inputs["eps_cond"], inputs["eps_uncond"]).pred


def _cfg_dit_bug(eps_uncond, eps_cond, scale):
    out = eps_cond.clone()
    k = min(3, eps_cond.shape[1])
    out[:, :k] = eps_uncond[:, :k] + scale * (eps_cond[:, :k] - eps_uncond[:, :k])
    return out


CFG = Check(
    H.CFG,
    reference=_cfg_ref,
    tolerance=CFG_TOL,
    mistakes=(
        Mistake("only 3 channels guided", _cfg_dit_bug,
                "your result guides only the first 3 channels and leaves the others conditional -- the bug in "
                "DiT's reference forward_with_cfg (inherited from GLIDE): guide EVERY channel."),
        Mistake("roles swapped", lambda u, c, s: c + s * (u - c),
                "your result moves from the conditional towards the UNconditional prediction: "
                "uncond + scale * (cond - uncond)."),
        Mistake("no unconditional term", lambda u, c, s: s * c,
                "your result scales the conditional prediction alone: guidance extrapolates from the "
                "unconditional prediction, uncond + scale * (cond - uncond)."),
        Mistake("scale added to the conditional", lambda u, c, s: c + s * (c - u),
                "your result is cond + scale * (cond - uncond), one step of guidance too many: "
                "uncond + scale * (cond - uncond) (scale 1 must give the conditional prediction)."),
        Mistake("an average", lambda u, c, s: (u + s * c) / (1 + s),
                "your result averages the two predictions: guidance extrapolates beyond the conditional one, "
                "uncond + scale * (cond - uncond)."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 4. frechet_distance

def _fid_numpy(a: np.ndarray, b: np.ndarray, *, bias=False, factor=2.0, mean_squared=True, diagonal=False,
               product_of_roots=False) -> float:
    import scipy.linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False, bias=bias)), np.atleast_2d(np.cov(b, rowvar=False, bias=bias))
    if diagonal:
        s1, s2 = np.diag(np.diag(s1)), np.diag(np.diag(s2))
    if product_of_roots:
        covmean = scipy.linalg.sqrtm(s1) @ scipy.linalg.sqrtm(s2)
    else:
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():  # pytorch-fid's fallback for a singular product
            offset = np.eye(s1.shape[0]) * 1e-6
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    mean_term = diff @ diff if mean_squared else np.sqrt(diff @ diff)
    return float(mean_term + np.trace(s1) + np.trace(s2) - factor * np.trace(covmean))


def _fid_ref(inputs):
    a = inputs["features_a"].double().numpy()
    b = inputs["features_b"].double().numpy()
    return torch.tensor([_fid_numpy(a, b)], dtype=torch.float64)


def _fid_mistake(**options):
    def impl(features_a, features_b):
        return torch.tensor(_fid_numpy(features_a.double().numpy(), features_b.double().numpy(), **options),
                            dtype=torch.float64)
    return impl


def _fid_float32(features_a, features_b):
    def fit(f):
        mu = f.mean(0)
        c = f - mu
        return mu, c.T @ c / (f.shape[0] - 1)
    (m1, s1), (m2, s2) = fit(features_a.float()), fit(features_b.float())
    w, v = torch.linalg.eigh(s1)
    root = (v * w.clamp(min=0).sqrt()) @ v.T
    tr = torch.linalg.eigvalsh(root @ s2 @ root).clamp(min=0).sqrt().sum()
    return ((m1 - m2) ** 2).sum() + s1.trace() + s2.trace() - 2 * tr


FID = Check(
    H.FID,
    reference=_fid_ref,
    tolerance=FID_TOL,
    mistakes=(
        Mistake("biased covariance", _fid_mistake(bias=True),
                "your covariances divide by N: use the unbiased estimate, dividing by N - 1 (np.cov's default, "
                "as pytorch-fid does)."),
        Mistake("cross term without the 2", _fid_mistake(factor=1.0),
                "your distance subtracts tr(sqrt(S1 S2)) once: the formula has 2 tr((S1 S2)^(1/2))."),
        Mistake("distance of the means not squared", _fid_mistake(mean_squared=False),
                "your mean term is |mu1 - mu2|: FID uses the SQUARED distance |mu1 - mu2|^2."),
        Mistake("variances only", _fid_mistake(diagonal=True),
                "your result uses only the variances of each feature: FID fits full covariance matrices."),
        Mistake("product of square roots", _fid_mistake(product_of_roots=True),
                "your cross term is tr(sqrt(S1) sqrt(S2)): the formula needs the square root of the PRODUCT, "
                "tr((S1 S2)^(1/2)), which differs unless S1 and S2 commute."),
        Mistake("float32", _fid_float32,
                "your result matches a float32 computation: convert the features to float64 before computing "
                "means, covariances and the matrix square root."),
    ),
)


CHECKS = CheckSet(CHAPTER, [REPARAMETERIZE, VAE_LOSS, CFG, FID])
check = CHECKS.check
