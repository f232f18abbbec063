"""Tasks of chapter 13, Stable Diffusion: inputs, calls and rules (what the grading sandbox sees).

Conventions (stated in the notebook): a VAE's posterior is given by ``mean`` and ``logvar`` tensors of
shape ``(B, C, h, w)``; ``noise`` for the reparameterisation has the same shape. Noise predictions for
guidance are ``(B, C, H, W)`` with any number of channels. Features for FID are ``(N, d)`` rows, one
per image; the two sets may have different N.

Scalar results come back as shape ``(1,)`` tensors (the engine's array transport keeps at least one axis).
"""

from __future__ import annotations

import torch

from autograders.engine.core import Case, Task, TaskSet, no_course_version, randn

CHAPTER = "13_stable_diffusion"


def _seed(g: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=g))


def _scalar(value, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got a {type(value).__name__} (do not call .item())")
    if value.numel() != 1:
        raise ValueError(f"{what} must be a single number, got shape {tuple(value.shape)}")
    return value.reshape(1)


# ---------------------------------------------------------------------------------------------
# 1. the reparameterisation trick


def _posterior(g, shape, logvar_range=(-4.0, 1.0), extreme=False):
    lo, hi = logvar_range
    mean = randn(g, *shape)
    logvar = lo + (hi - lo) * torch.rand(shape, generator=g)
    if extreme:  # beyond diffusers' clamp to [-30, 20]
        flat = logvar.view(-1)
        flat[0], flat[1] = 25.0, -40.0
    seed = _seed(g)
    return {"mean": mean, "logvar": logvar, "noise": torch.randn(shape, generator=torch.Generator().manual_seed(seed)),
            "noise_seed": seed}


def _call_reparameterize(impl, inputs):
    mean = inputs["mean"].clone().requires_grad_(True)
    logvar = inputs["logvar"].clone().requires_grad_(True)
    with torch.enable_grad():
        z = impl(mean, logvar, inputs["noise"])
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"reparameterize must return a tensor, got a {type(z).__name__}")
        if not z.requires_grad:
            raise ValueError("the sample is not differentiable with respect to mean and logvar: that is the point "
                             "of the trick (was something detached?)")
        (z * inputs["noise"].flip(0)).sum().backward()  # any fixed weighting of the sample's entries
    grad_mean = mean.grad if mean.grad is not None else torch.zeros_like(mean)
    grad_logvar = logvar.grad if logvar.grad is not None else torch.zeros_like(logvar)
    return z.detach(), grad_mean, grad_logvar


REPARAMETERIZE = Task(
    "reparameterize",
    cases=(
        Case("4 latents 4x2x2", lambda g: _posterior(g, (4, 4, 2, 2))),
        Case("2 latents 3x4x4, small variances", lambda g: _posterior(g, (2, 3, 4, 4), (-8.0, -2.0))),
        Case("one latent 4x2x2", lambda g: _posterior(g, (1, 4, 2, 2)), hidden=True),
        Case("log-variances outside [-30, 20]", lambda g: _posterior(g, (3, 4, 2, 2), extreme=True), hidden=True),
        Case("8 latents 8x1x1, large variances", lambda g: _posterior(g, (8, 8, 1, 1), (0.0, 4.0)), hidden=True),
    ),
    call=_call_reparameterize,
    output_names=("z", "gradient w.r.t. mean", "gradient w.r.t. logvar"),
    rules=(no_course_version("coursekit.vae:reparameterize"),),
)


# ---------------------------------------------------------------------------------------------
# 2. the VAE loss


def _vae_inputs(g, B, image_shape=(1, 8, 8), latent_shape=(4, 2, 2), beta=0.01, extreme=False):
    x = randn(g, B, *image_shape).clamp(-1, 1)
    post = _posterior(g, (B, *latent_shape), extreme=extreme)
    return {"x": x, "reconstruction": x + 0.3 * randn(g, B, *image_shape), "mean": post["mean"],
            "logvar": post["logvar"], "beta": beta}


def _call_vae_loss(impl, inputs):
    rec = inputs["reconstruction"].clone().requires_grad_(True)
    mean = inputs["mean"].clone().requires_grad_(True)
    logvar = inputs["logvar"].clone().requires_grad_(True)
    with torch.enable_grad():
        out = impl(inputs["x"], rec, mean, logvar, inputs["beta"])
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise TypeError("vae_loss must return a triple (loss, reconstruction_term, kl_term)")
        loss, rec_term, kl_term = out
        loss = _scalar(loss, "the loss")
        if not loss.requires_grad:
            raise ValueError("the loss is not connected to the reconstruction, mean and logvar (was it detached?)")
        loss.sum().backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in (rec, mean, logvar)]
    return (loss.detach(), _scalar(rec_term, "the reconstruction term").detach(),
            _scalar(kl_term, "the KL term").detach(), *grads)


VAE_LOSS = Task(
    "vae_loss",
    cases=(
        Case("batch 4 of 1x8x8, latents 4x2x2, beta 0.01", lambda g: _vae_inputs(g, 4)),
        Case("batch 3, beta 1", lambda g: _vae_inputs(g, 3, beta=1.0)),
        Case("one image, beta 0.1", lambda g: _vae_inputs(g, 1, beta=0.1), hidden=True),
        Case("3-channel 16x16 images, latents 4x4x4", lambda g: _vae_inputs(g, 2, (3, 16, 16), (4, 4, 4)), hidden=True),
        Case("log-variances outside [-30, 20]", lambda g: _vae_inputs(g, 3, beta=0.5, extreme=True), hidden=True),
        Case("beta 0 (a plain autoencoder)", lambda g: _vae_inputs(g, 5, beta=0.0), hidden=True),
    ),
    call=_call_vae_loss,
    output_names=("loss", "reconstruction term", "KL term", "gradient w.r.t. reconstruction",
                  "gradient w.r.t. mean", "gradient w.r.t. logvar"),
    rules=(no_course_version("coursekit.vae:vae_loss", "coursekit.vae:gaussian_kl"),),
)


# ---------------------------------------------------------------------------------------------
# 3. classifier-free guidance


def _cfg_inputs(g, shape, scale):
    return {"eps_uncond": randn(g, *shape), "eps_cond": randn(g, *shape), "guidance_scale": scale}


def _call_cfg(impl, inputs):
    out = impl(inputs["eps_uncond"].clone(), inputs["eps_cond"].clone(), inputs["guidance_scale"])
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"cfg_combine must return a tensor, got a {type(out).__name__}")
    return out


CFG = Task(
    "cfg_combine",
    cases=(
        Case("4 latent channels 2x2, scale 3", lambda g: _cfg_inputs(g, (5, 4, 2, 2), 3.0)),
        Case("scale 7.5 (Stable Diffusion's default)", lambda g: _cfg_inputs(g, (2, 4, 8, 8), 7.5)),
        Case("scale 1 (no guidance)", lambda g: _cfg_inputs(g, (3, 4, 2, 2), 1.0), hidden=True),
        Case("scale 0 (the unconditional model)", lambda g: _cfg_inputs(g, (3, 4, 2, 2), 0.0), hidden=True),
        Case("1 channel 8x8 pixels, scale 2", lambda g: _cfg_inputs(g, (4, 1, 8, 8), 2.0), hidden=True),
        Case("16 channels, scale 4", lambda g: _cfg_inputs(g, (2, 16, 2, 2), 4.0), hidden=True),
    ),
    call=_call_cfg,
    output_names=("guided noise prediction",),
    rules=(no_course_version("coursekit.diffusion:cfg_combine", "coursekit.diffusion:guided"),),
)


# ---------------------------------------------------------------------------------------------
# 4. the Frechet distance between two sets of features


def _features(g, n, d, shift=0.0, spread=1.0, offset=0.0):
    mixing = randn(g, d, d) / d ** 0.5
    base = randn(g, n, d) @ (torch.eye(d) + spread * mixing)
    return (base + shift * randn(g, 1, d) + offset).float()


def _fid_inputs(g, n_a, n_b, d, shift=0.5, offset=0.0, scale=1.0):
    return {"features_a": scale * _features(g, n_a, d, offset=offset),
            "features_b": scale * _features(g, n_b, d, shift=shift, offset=offset)}


def _call_fid(impl, inputs):
    out = impl(inputs["features_a"].clone(), inputs["features_b"].clone())
    if isinstance(out, float):
        out = torch.tensor(out, dtype=torch.float64)
    return _scalar(out, "the Frechet distance")


FID = Task(
    "frechet_distance",
    cases=(
        Case("200 vs 150 features of size 8", lambda g: _fid_inputs(g, 200, 150, 8)),
        Case("the same distribution (a small distance)", lambda g: _fid_inputs(g, 300, 300, 6, shift=0.0)),
        Case("500 vs 400 features of size 32", lambda g: _fid_inputs(g, 500, 400, 32), hidden=True),
        Case("features offset by 100 (float32 loses digits)", lambda g: _fid_inputs(g, 300, 250, 16, offset=100.0),
             hidden=True),
        Case("far apart (shift 5)", lambda g: _fid_inputs(g, 120, 100, 4, shift=5.0), hidden=True),
        Case("one feature", lambda g: _fid_inputs(g, 50, 60, 1), hidden=True),
        Case("features of size 128 (the judge's), 400 vs 300", lambda g: _fid_inputs(g, 400, 300, 128, scale=0.3),
             hidden=True),
    ),
    call=_call_fid,
    output_names=("distance",),
    rules=(no_course_version("coursekit.judge:frechet_distance", "coursekit.judge:Judge.fid"),),
)


TASKS = TaskSet(CHAPTER, [REPARAMETERIZE, VAE_LOSS, CFG, FID])
