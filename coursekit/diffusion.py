"""Noise schedules, a DDPM/DDIM scheduler with diffusers' ``step`` contract, guidance and a sampling loop.

The diffusion chapters (12 DDPM, 13 Stable Diffusion, 14 SDXL, 15 DiT) share these pieces; chapter 12
has students write the schedule, the forward process, the loss and the reverse step themselves, and
later chapters call the versions here. Conventions are those of diffusers (checked against it in
``tests/test_coursekit_diffusion.py``):

* timesteps are integers ``0 .. T-1``; ``alphas_cumprod[t]`` is the signal fraction of ``x_t``, so
  ``x_t = sqrt(alphas_cumprod[t]) x_0 + sqrt(1 - alphas_cumprod[t]) eps``;
* a sampler walks a decreasing list of timesteps (``scheduler.set_timesteps(n)``); ``step(model_output,
  t, sample, noise=...)`` returns the sample at the previous timestep of that list and the predicted
  ``x_0``, like diffusers' ``SchedulerMixin.step`` (here the noise can be passed in explicitly);
* a model is any callable ``model_fn(x_t, t) -> eps`` with ``t`` a ``(B,)`` int64 tensor; conditioning and
  classifier-free guidance are closures around a network (:func:`guided`).

Helpers for training runs under a time budget (:func:`progress`, :func:`ema_model`) are here too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DDIMScheduler", "DDPMScheduler", "StepOutput", "cfg_combine", "ema_model", "guided", "image_grid",
           "make_betas", "progress", "q_sample", "sample_loop", "spaced_timesteps"]

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Schedules


def make_betas(num_train_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
               beta_end: float = 0.02, max_beta: float = 0.999) -> torch.Tensor:
    """The betas (float32, ``(T,)``) of diffusers' ``DDPMScheduler`` for the same arguments, bit for bit.

    ``"linear"``: evenly spaced from ``beta_start`` to ``beta_end`` (DDPM); ``"scaled_linear"``: evenly
    spaced square roots, squared (Stable Diffusion); ``"cosine"`` (diffusers' ``"squaredcos_cap_v2"``):
    ``alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2)`` (Nichol & Dhariwal 2021), with
    ``beta_t = min(1 - alpha_bar((t+1)/T) / alpha_bar(t/T), max_beta)`` computed in float64."""
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be at least 1, got {num_train_timesteps}")
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule in ("cosine", "squaredcos_cap_v2"):
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        T = num_train_timesteps
        return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)],
                            dtype=torch.float32)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}: use 'linear', 'scaled_linear' or 'cosine'")


def _expand(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` shaped ``(B, 1, 1, ...)`` to broadcast against ``like``."""
    out = values.to(like.device)[t.to(like.device)].to(like.dtype)
    return out.reshape(out.shape + (1,) * (like.ndim - out.ndim))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The forward process in closed form: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (diffusers' ``add_noise``)."""
    t = torch.as_tensor(t, device=x0.device)
    if t.ndim == 0:
        t = t.expand(x0.shape[0])
    if noise.shape != x0.shape:
        raise ValueError(f"noise {tuple(noise.shape)} must have the shape of x0 {tuple(x0.shape)}")
    ab = _expand(alphas_cumprod, t, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def spaced_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str = "leading",
                     steps_offset: int = 0) -> torch.Tensor:
    """A decreasing int64 list of ``num_inference_steps`` timesteps, as diffusers' ``set_timesteps`` makes it
    (``"leading"``: ``arange(n) * (T // n)`` reversed, ending at 0; ``"trailing"``: starting at ``T - 1``;
    ``"linspace"``: ``linspace(0, T - 1, n)`` rounded)."""
    T, n = num_train_timesteps, num_inference_steps
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be between 1 and {T}, got {n}")
    if spacing == "leading":
        steps = torch.arange(n, dtype=torch.int64) * (T // n) + steps_offset
        return steps.flip(0)
    if spacing == "trailing":
        ratio = T / n
        import numpy as np
        return torch.from_numpy(np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1)
    if spacing == "linspace":
        import numpy as np
        return torch.from_numpy(np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64))
    raise ValueError(f"unknown spacing {spacing!r}: use 'leading', 'trailing' or 'linspace'")


# ---------------------------------------------------------------------------------------------
# Schedulers: the step contract


@dataclass
class StepOutput:
    """What ``step`` returns: the sample at the previous timestep and the predicted clean sample."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class _Scheduler:
    """Shared state: the betas, the cumulative products and the timesteps of the current sampling run."""

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, clip_sample: bool = True, clip_sample_range: float = 1.0,
                 betas: torch.Tensor | None = None):
        self.betas = (betas.float().clone() if betas is not None
                      else make_betas(num_train_timesteps, beta_schedule, beta_start, beta_end))
        self.num_train_timesteps = len(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.clip_sample, self.clip_sample_range = clip_sample, clip_sample_range
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1)
        self._prev: dict[int, int] = {}
        self._set_prev()

    def _set_prev(self) -> None:
        ts = [int(t) for t in self.timesteps]
        self._prev = {t: (ts[i + 1] if i + 1 < len(ts) else -1) for i, t in enumerate(ts)}

    def set_timesteps(self, num_inference_steps: int | None = None, spacing: str = "leading",
                      timesteps: Sequence[int] | None = None) -> torch.Tensor:
        """Choose the timesteps a sampler walks (strided when fewer than T); returns them."""
        if timesteps is not None:
            ts = torch.as_tensor(list(timesteps), dtype=torch.int64)
            if len(ts) == 0 or (ts[1:] >= ts[:-1]).any() or ts[0] >= self.num_train_timesteps or ts[-1] < 0:
                raise ValueError("timesteps must be strictly decreasing, within [0, num_train_timesteps)")
            self.timesteps = ts
        else:
            self.timesteps = spaced_timesteps(self.num_train_timesteps, num_inference_steps or self.num_train_timesteps,
                                              spacing)
        self._set_prev()
        return self.timesteps

    def previous_timestep(self, t: int) -> int:
        t = int(t)
        if t not in self._prev:
            raise ValueError(f"timestep {t} is not one of this scheduler's timesteps (call set_timesteps)")
        return self._prev[t]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return q_sample(x0, t, noise, self.alphas_cumprod)

    def _alpha_bars(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        prev_t = self.previous_timestep(t)
        ab = self.alphas_cumprod[int(t)]
        ab_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        return ab, ab_prev

    def _pred_x0(self, eps: torch.Tensor, sample: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
        x0 = (sample - (1 - ab) ** 0.5 * eps) / ab ** 0.5
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0

    def __len__(self) -> int:
        return self.num_train_timesteps


class DDPMScheduler(_Scheduler):
    """Ancestral DDPM sampling (Ho et al. 2020) with the posterior variance ("fixed_small"), equal to diffusers'
    ``DDPMScheduler(variance_type="fixed_small", prediction_type="epsilon")``. On a strided list of timesteps
    the step from ``t`` to ``prev_t`` uses ``beta = 1 - abar_t / abar_prev`` (the respaced chain)."""

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> StepOutput:
        t = int(timestep)
        ab, ab_prev = self._alpha_bars(t)
        alpha = ab / ab_prev
        beta = 1 - alpha
        x0 = self._pred_x0(model_output, sample, ab)
        mean = (ab_prev ** 0.5 * beta / (1 - ab)) * x0 + (alpha ** 0.5 * (1 - ab_prev) / (1 - ab)) * sample
        if t > 0:
            if noise is None:
                noise = torch.randn(model_output.shape, generator=generator, dtype=model_output.dtype,
                                    device=generator.device if generator is not None else model_output.device)
                noise = noise.to(model_output.device)
            variance = torch.clamp((1 - ab_prev) / (1 - ab) * beta, min=1e-20)
            mean = mean + variance ** 0.5 * noise
        return StepOutput(mean, x0)


class DDIMScheduler(_Scheduler):
    """Deterministic DDIM sampling (Song et al. 2021, eta = 0), equal to diffusers' ``DDIMScheduler`` with
    ``eta=0, set_alpha_to_one=True``: ``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps``. Few steps
    (10-50) give good samples from a model trained for DDPM."""

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> StepOutput:
        ab, ab_prev = self._alpha_bars(int(timestep))
        x0 = self._pred_x0(model_output, sample, ab)
        # diffusers' default (use_clipped_model_output=False): the direction term keeps the model's noise
        return StepOutput(ab_prev ** 0.5 * x0 + (1 - ab_prev) ** 0.5 * model_output, x0)


# ---------------------------------------------------------------------------------------------
# Guidance and the sampling loop


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on EVERY channel: ``uncond + scale * (cond - uncond)`` (diffusers' pipelines).
    (DiT's reference ``forward_with_cfg`` guides only the first 3 of 4 latent channels: a known bug.)"""
    if eps_uncond.shape != eps_cond.shape:
        raise ValueError(f"shapes differ: {tuple(eps_uncond.shape)} vs {tuple(eps_cond.shape)}")
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def guided(net: nn.Module, cond: dict, uncond: dict, guidance_scale: float = 1.0) -> ModelFn:
    """A ``model_fn(x, t)`` for :func:`sample_loop`: ``net(x, t, **cond)`` guided by ``net(x, t, **uncond)``.

    ``cond``/``uncond`` are keyword arguments of ``net`` (e.g. ``{"labels": y}`` and ``{"labels": null}``),
    one row per sample. Scale 1 is the plain conditional model (one forward pass); otherwise the two
    passes run as one batch of twice the size."""
    if guidance_scale == 1.0:
        return lambda x, t: net(x, t, **cond)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        out = net(torch.cat([x, x]), torch.cat([t, t]), **both)
        eps_uncond, eps_cond = out.chunk(2)
        return cfg_combine(eps_uncond, eps_cond, guidance_scale)
    return fn


@torch.no_grad()
def sample_loop(model_fn: ModelFn, scheduler: _Scheduler, shape: Sequence[int] | None = None, *,
                generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                sample: torch.Tensor | None = None, start_index: int = 0, end_index: int | None = None,
                keep: Sequence[int] = (), show_progress: bool = False) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Walk ``scheduler.timesteps[start_index:end_index]`` from ``sample`` (default: Gaussian noise of
    ``shape`` drawn from ``generator``), calling ``model_fn(x, t)`` and ``scheduler.step`` at each one.

    Returns the final sample and ``{t: x_t}`` for the timesteps in ``keep`` (the sample *entering* step
    ``t``; ``-1`` in ``keep`` is the final sample). ``start_index``/``end_index`` let a run start from a
    partly noised image (img2img, a refiner's ``denoising_start``) or stop early (``denoising_end``).
    Noise is drawn from ``generator`` in order: first the start sample, then one tensor per step with t > 0."""
    timesteps = scheduler.timesteps[start_index:end_index]
    if sample is None:
        if shape is None:
            raise ValueError("give either a start sample or a shape")
        gen_device = generator.device if generator is not None else "cpu"
        sample = torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)
    x = sample
    kept: dict[int, torch.Tensor] = {}
    keep = set(int(k) for k in keep)
    with (progress(timesteps.tolist(), desc="sampling") if show_progress else _plain(timesteps.tolist())) as steps:
        for t in steps:
            if t in keep:
                kept[t] = x.detach().cpu().clone()
            t_batch = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
            x = scheduler.step(model_fn(x, t_batch), t, x, generator=generator).prev_sample
    if -1 in keep:
        kept[-1] = x.detach().cpu().clone()
    return x, kept


@contextmanager
def _plain(items):
    yield items


# ---------------------------------------------------------------------------------------------
# Training helpers


def ema_model(model: nn.Module, decay: float = 0.99) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``model``'s weights (``torch.optim.swa_utils.AveragedModel``):
    call ``.update_parameters(model)`` after each optimizer step; use ``.module`` to sample."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay))
    ema.requires_grad_(False)
    return ema


class _DisplayStream:
    """A file for tqdm that shows its latest line in one notebook output (no widget): the output is
    updated in place while the bar runs and keeps the bar's last state, so a notebook executed headless
    (tests, the book) stores one readable line and no widget state."""

    def __init__(self):
        from IPython.display import display

        self.handle = display({"text/plain": ""}, raw=True, display_id=True)
        self.text = ""

    def write(self, s: str) -> int:
        line = s.replace("\r", "").strip()
        if line and line != self.text:
            self.text = line
            self.handle.update({"text/plain": line}, raw=True)
        return len(s)

    def flush(self) -> None:
        pass


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


@contextmanager
def progress(iterable=None, total: int | None = None, desc: str = "") -> Iterator:
    """A tqdm progress bar (``bar.update()``, ``bar.set_postfix(loss=...)``) for loops that may stop before
    ``total`` (a time budget: the total then shrinks to the steps done, which is not an error). In a
    notebook it is one text output updated in place (no widget), so that a notebook executed headless
    keeps the bar's last line; elsewhere it writes to stderr as usual."""
    from tqdm.std import tqdm

    stream = _DisplayStream() if _in_notebook() else None
    bar = tqdm(iterable, total=total, desc=desc, mininterval=0.5, file=stream, ascii=False)
    try:
        yield bar
    finally:
        if bar.total is not None and bar.n < bar.total:
            bar.total = bar.n
        bar.refresh()
        bar.close()


# ---------------------------------------------------------------------------------------------
# Pictures


def image_grid(images: torch.Tensor, nrow: int = 10, pad: int = 1, value_range: tuple[float, float] = (-1.0, 1.0)):
    """Tile ``(N, C, H, W)`` images into one ``(rows * (H + pad) - pad, nrow * (W + pad) - pad[, C])`` numpy
    array in [0, 1] (for ``plt.imshow(grid, vmin=0, vmax=1)``), ``nrow`` images per row, separated by ``pad``
    pixels of mid grey (0.5). One channel gives a 2-D array."""
    import numpy as np

    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"image_grid expects an (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    n, c, h, w = x.shape
    rows = max(1, math.ceil(n / nrow))
    grid = torch.full((c, rows * (h + pad) - pad, nrow * (w + pad) - pad), 0.5)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = x[i]
    out = grid.numpy()
    return out[0] if c == 1 else np.transpose(out, (1, 2, 0))
