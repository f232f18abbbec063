"""coursekit's diffusion pieces: schedules and steps equal diffusers', the U-Net's contract, the judge and FID."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import scipy.linalg
import torch

from coursekit import diffusion as D
from coursekit.judge import frechet_distance, gaussian_fit, get_judge
from coursekit.unet import CaptionEncoder, CrossAttention, TinyUNet, timestep_embedding


def _diffusers(name, **config):
    import diffusers

    return getattr(diffusers, name)(**config)


# --- schedules -----------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    {"num_train_timesteps": 1000, "beta_schedule": "linear"},
    {"num_train_timesteps": 100, "beta_schedule": "linear", "beta_start": 1e-3, "beta_end": 0.2},
    {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"},
    {"num_train_timesteps": 37, "beta_schedule": "squaredcos_cap_v2"},
])
def test_betas_equal_diffusers_exactly(config):
    ours = D.DDPMScheduler(**config)
    theirs = _diffusers("DDPMScheduler", **config)
    assert torch.equal(ours.betas, theirs.betas)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)


def test_cosine_is_an_alias_and_bad_names_fail():
    assert torch.equal(D.make_betas(50, "cosine"), D.make_betas(50, "squaredcos_cap_v2"))
    with pytest.raises(ValueError, match="unknown beta_schedule"):
        D.make_betas(10, "quadratic")
    with pytest.raises(ValueError, match="at least 1"):
        D.make_betas(0)


def test_small_T_needs_rescaled_betas():
    """The chapters' teaching point: DDPM's betas are tuned for T=1000."""
    abar_end = lambda T, scale=1.0: D.DDPMScheduler(T, beta_start=1e-4 * scale, beta_end=0.02 * scale).alphas_cumprod[-1]
    assert abs(abar_end(100) - 0.36) < 0.01 and abs(abar_end(300) - 0.048) < 0.002
    assert abar_end(100, 10.0) < 1e-4 and abar_end(1000) < 1e-4


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 7, 25, 50, 1000])
def test_spaced_timesteps_equal_diffusers(spacing, n):
    theirs = _diffusers("DDPMScheduler", timestep_spacing=spacing)
    theirs.set_timesteps(n)
    assert torch.equal(D.spaced_timesteps(1000, n, spacing), theirs.timesteps)


def test_q_sample_equals_add_noise():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 10, 200, 500, 998, 999])
    theirs = _diffusers("DDPMScheduler", beta_schedule="squaredcos_cap_v2")
    ours = D.DDPMScheduler(beta_schedule="cosine")
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        D.q_sample(x0, t, noise[:, :1], ours.alphas_cumprod)


# --- steps -----------------------------------------------------------------------------------------

def _walk(scheduler, model, x, generator, steps=None):
    for t in (steps if steps is not None else scheduler.timesteps).tolist():
        x = scheduler.step(model(x, t), t, x, generator=generator).prev_sample
    return x


def _toy_model(x, t):
    return torch.tanh(x * (1 + t / 1000)) * 0.7 + 0.1 * np.cos(t / 50)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("schedule, n", [("linear", None), ("linear", 25), ("squaredcos_cap_v2", 10),
                                         ("squaredcos_cap_v2", 50)])
def test_ddpm_steps_equal_diffusers(clip, schedule, n):
    ours = D.DDPMScheduler(beta_schedule=schedule, clip_sample=clip)
    theirs = _diffusers("DDPMScheduler", beta_schedule=schedule, clip_sample=clip)
    if n is not None:
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    a = _walk(ours, _toy_model, x, torch.Generator().manual_seed(2))
    b = _walk(theirs, _toy_model, x, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_ddpm_step_takes_explicit_noise_like_the_generator():
    s = D.DDPMScheduler()
    s.set_timesteps(20)
    x, eps = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    t = int(s.timesteps[3])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    a = s.step(eps, t, x, noise=noise).prev_sample
    b = s.step(eps, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
    assert torch.equal(a, b)
    last = s.step(eps, 0, x, noise=noise)  # t = 0: no noise, the mean is predicted x0 exactly
    torch.testing.assert_close(last.prev_sample, last.pred_original_sample)


def test_step_rejects_a_timestep_it_does_not_walk():
    s = D.DDPMScheduler()
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="not one of"):
        s.step(torch.zeros(1, 1, 2, 2), 5, torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="strictly decreasing"):
        s.set_timesteps(timesteps=[10, 20])


@pytest.mark.parametrize("n", [10, 50])
def test_ddim_equals_diffusers(n):
    ours = D.DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    theirs = _diffusers("DDIMScheduler", beta_schedule="squaredcos_cap_v2")
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_walk(ours, _toy_model, x, None), _walk(theirs, _toy_model, x, None),
                               atol=1e-4, rtol=1e-4)


# --- the loop and guidance -------------------------------------------------------------------------

def test_sample_loop_equals_a_diffusers_loop_and_keeps_what_it_is_asked():
    ours, theirs = D.DDPMScheduler(), _diffusers("DDPMScheduler")
    ours.set_timesteps(8)
    theirs.set_timesteps(8)
    fn = lambda x, t: _toy_model(x, int(t[0]))
    out, kept = D.sample_loop(fn, ours, (2, 1, 4, 4), generator=torch.Generator().manual_seed(3),
                              keep=[int(ours.timesteps[0]), int(ours.timesteps[4]), -1])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 4, 4, generator=g)
    start = x.clone()
    expected = _walk(theirs, _toy_model, x, g)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(kept[int(ours.timesteps[0])], start) and torch.equal(kept[-1], out)
    assert len(kept) == 3


def test_sample_loop_can_start_late_and_stop_early():
    s = D.DDPMScheduler()
    s.set_timesteps(10)
    fn = lambda x, t: _toy_model(x, int(t[0]))
    g = torch.Generator().manual_seed(0)
    full, _ = D.sample_loop(fn, s, (1, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    first, _ = D.sample_loop(fn, s, (1, 1, 4, 4), generator=g, end_index=6)
    rest, _ = D.sample_loop(fn, s, sample=first, generator=g, start_index=6)
    torch.testing.assert_close(rest, full)   # a base/refiner split walks the same chain
    with pytest.raises(ValueError, match="start sample or a shape"):
        D.sample_loop(fn, s)


def test_cfg_guides_every_channel():
    """DiT's forward_with_cfg guides only 3 of 4 latent channels; ours guides all of them."""
    uncond, cond = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    out = D.cfg_combine(uncond, cond, 3.0)
    assert torch.equal(out, torch.full((2, 4, 2, 2), 3.0))
    with pytest.raises(ValueError):
        D.cfg_combine(uncond, cond[:, :3], 2.0)


def test_guided_batches_cond_and_uncond():
    net = TinyUNet(1, (8, 16), num_classes=3)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 500)
    y, null = torch.tensor([0, 1, 2, 0]), torch.full((4,), 3)
    with torch.no_grad():
        e_c, e_u = net(x, t, labels=y), net(x, t, labels=null)
        torch.testing.assert_close(D.guided(net, {"labels": y}, {"labels": null}, 1.0)(x, t), e_c)
        torch.testing.assert_close(D.guided(net, {"labels": y}, {"labels": null}, 4.0)(x, t),
                                   e_u + 4.0 * (e_c - e_u), atol=1e-5, rtol=1e-5)


def test_ema_model_averages():
    net = torch.nn.Linear(2, 1, bias=False)
    ema = D.ema_model(net, 0.5)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update_parameters(net)           # the first update copies
    with torch.no_grad():
        net.weight.fill_(3.0)
    ema.update_parameters(net)
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 2.0))
    assert not any(p.requires_grad for p in ema.parameters())
    with pytest.raises(ValueError):
        D.ema_model(net, 1.0)


def test_progress_bar_outside_a_notebook():
    with D.progress(total=10, desc="test") as bar:
        for _ in range(4):
            bar.update()
    assert bar.n == 4 and bar.total == 4   # stopped early on purpose: the total shrinks, no error


def test_image_grid():
    grid = D.image_grid(torch.linspace(-1, 1, 5 * 64).view(5, 1, 8, 8), nrow=3)
    assert grid.shape == (2 * 9 - 1, 3 * 9 - 1) and grid.min() >= 0 and grid.max() <= 1
    assert D.image_grid(torch.zeros(2, 3, 4, 4), nrow=2).shape == (4, 9, 3)
    with pytest.raises(ValueError):
        D.image_grid(torch.zeros(4, 4))


# --- the U-Net ---------------------------------------------------------------------------------------

def test_timestep_embedding_equals_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 999])
    torch.testing.assert_close(timestep_embedding(t, 32),
                               get_timestep_embedding(t, 32, flip_sin_to_cos=True, downscale_freq_shift=0))


def test_unet_shapes_and_fresh_output():
    net = TinyUNet(1, (16, 32), num_classes=10)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999])
    out = net(x, t, labels=torch.tensor([1, 2, 10]))
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out)), "the output layer starts at zero"
    latent = TinyUNet(4, (32,), attention=(True,), context_dim=12)
    assert latent(torch.randn(2, 4, 2, 2), torch.tensor(3), context=torch.randn(2, 5, 12)).shape == (2, 4, 2, 2)


def test_unet_uses_time_labels_and_context():
    torch.manual_seed(0)
    net = TinyUNet(1, (8, 16), attention=(False, True), num_classes=10, context_dim=6)
    for m in net.modules():  # wake up the zero-initialised layers
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.normal_(m.weight, std=0.2)
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([10, 10])
    y = torch.tensor([1, 1])
    ctx = torch.randn(2, 3, 6)
    base = net(x, t, labels=y, context=ctx)
    assert not torch.allclose(base, net(x, torch.tensor([900, 900]), labels=y, context=ctx))
    assert not torch.allclose(base, net(x, t, labels=torch.tensor([2, 2]), context=ctx))
    assert not torch.allclose(base, net(x, t, labels=y, context=torch.randn(2, 3, 6)))
    assert torch.allclose(net(x, t, context=ctx), net(x, t, labels=torch.tensor([10, 10]), context=ctx)), \
        "no labels means the null label"
    mask = torch.tensor([[True, True, False], [True, True, False]])
    changed = ctx.clone()
    changed[:, 2] += 5.0
    torch.testing.assert_close(net(x, t, labels=y, context=ctx, context_mask=mask),
                               net(x, t, labels=y, context=changed, context_mask=mask))


def test_unet_clear_errors():
    net = TinyUNet(1, (8, 16))
    with pytest.raises(ValueError, match="expected x of shape"):
        net(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(2, 1, 7, 7), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="no class conditioning"):
        net(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no cross-attention"):
        net(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), context=torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="one flag per level"):
        TinyUNet(1, (8, 16), attention=(True,))
    with pytest.raises(ValueError, match="divisible by heads"):
        CrossAttention(6, heads=4)


# --- the judge and FID ----------------------------------------------------------------------------------

def test_frechet_distance_equals_the_scipy_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 0.5
    (m1, s1), (m2, s2) = gaussian_fit(a), gaussian_fit(b)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert abs(frechet_distance(m1, s1, m2, s2) - expected) < 1e-8 * max(1.0, expected)
    assert abs(frechet_distance(m1, s1, m1, s1)) < 1e-9
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(m1, s1, m2[:3], s2)
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_fit(a[:1])


def test_judge_is_cached_accurate_and_leaves_the_rng_alone():
    from coursekit.digits import load_digits

    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    judge = get_judge(8, (-1.0, 1.0), verbose=False)
    assert torch.equal(torch.rand(1), expected_next), "get_judge must not consume the caller's random numbers"
    assert get_judge(8, (-1.0, 1.0), verbose=False) is judge
    test = load_digits("test", 8, (-1.0, 1.0))
    assert judge.test_accuracy >= 0.97
    assert judge.fid(test.images) < 5.0
    noise = torch.randn(400, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert judge.fid(noise) > 100.0
    assert judge.features(test.images[:5]).shape == (5, 128)
    with pytest.raises(ValueError, match="trained on 8x8"):
        judge.predict(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="one label per image"):
        judge.accuracy(test.images[:3], test.labels[:2])


# --- the VAE and the caption encoder -----------------------------------------------------------------------

def test_vae_posterior_equals_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from coursekit.vae import gaussian_kl, reparameterize

    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g) * 20
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(reparameterize(mean, logvar, noise), posterior.sample(torch.Generator().manual_seed(1)))
    torch.testing.assert_close(gaussian_kl(mean, logvar), posterior.kl())


def test_tiny_vae_shapes_training_and_cache():
    from coursekit.vae import TinyVAE, get_vae, train_vae, vae_loss

    vae = TinyVAE()
    mean, logvar = vae.encode(torch.zeros(5, 1, 8, 8))
    assert mean.shape == logvar.shape == (5, 4, 2, 2)
    assert vae.decode(mean).shape == (5, 1, 8, 8)
    with pytest.raises(ValueError, match="divisible by 4"):
        vae.encode(torch.zeros(2, 1, 6, 6))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(2, 3, 2, 2))
    x = torch.zeros(2, 1, 8, 8)
    assert vae_loss(x, x, torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2), 1.0).item() == 0.0
    short = train_vae(steps=60)
    assert short.scale > 0 and short.encode(torch.zeros(2, 1, 8, 8)).shape == (2, 4, 2, 2)
    assert short.decode(torch.zeros(2, 4, 2, 2)).abs().max() <= 1.0
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    cached = get_vae(verbose=False, steps=40)
    assert torch.equal(torch.rand(1), expected), "get_vae must not consume the caller's random numbers"
    assert get_vae(verbose=False, steps=40) is cached


def test_caption_encoder_keeps_a_start_token():
    enc = CaptionEncoder(vocab_size=10, dim=8, max_len=4)
    ids = torch.tensor([[3, 4, 0, 0], [0, 0, 0, 0]])
    context, mask = enc(ids, ids != 0)
    assert context.shape == (2, 5, 8) and mask.tolist() == [[True, True, True, False, False], [True] + [False] * 4]
    attn = CrossAttention(8, context_dim=8, heads=2)
    torch.nn.init.normal_(attn.to_out.weight)
    out = attn(torch.randn(2, 8, 2, 2), context, mask)          # the empty caption: only the start token
    assert torch.isfinite(out).all()
    assert CaptionEncoder.pooled(context, mask).shape == (2, 8)
    with pytest.raises(ValueError, match="L <= 4"):
        enc(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool))


def test_mid_attention_only():
    net = TinyUNet(4, (32,), attention=(False,), mid_attention=True, context_dim=8)
    assert sum(isinstance(m, CrossAttention) for m in net.modules()) == 1
    net = TinyUNet(4, (32,), attention=(True,), context_dim=8)
    assert sum(isinstance(m, CrossAttention) for m in net.modules()) == 3


def test_progress_bar_in_a_notebook_keeps_its_last_line_and_no_widget():
    """Executed headless (tests, the book), the bar leaves one text line and no widget state (the book
    would otherwise load the widget manager from a CDN)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.cells.append(nbformat.v4.new_code_cell(
        "from coursekit.diffusion import progress\n"
        "with progress(total=50, desc='training') as bar:\n"
        "    for i in range(20):\n"
        "        bar.update()\n"
        "        bar.set_postfix(loss=0.5)\n"))
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    outputs = nb.cells[0].outputs
    assert "widgets" not in nb.metadata
    assert len(outputs) == 1 and outputs[0].output_type == "display_data"
    text = outputs[0].data["text/plain"]
    assert text.startswith("training: 100%") and "20/20" in text and "loss=0.5" in text
