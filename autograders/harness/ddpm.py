"""Tasks of chapter 12, DDPM: inputs, calls and rules (what the grading sandbox sees).

Conventions (stated in the notebook): timesteps are integers ``0 .. T-1``; ``alphas_cumprod[t]`` is
``abar_t``; a batch of images is ``(B, C, H, W)`` (any shape ``(B, ...)`` works) and a batch of
timesteps a ``(B,)`` int64 tensor; a denoiser is called ``model(x_t, t)`` and returns the predicted
noise with the shape of ``x_t``. The reverse step and the sampling loop take their Gaussian noise as
arguments or from a ``torch.Generator`` in a fixed order, so that every answer is deterministic.

The models here are small fixed functions of ``(x_t, t)``, not trained denoisers: a check needs a
model whose output depends on both, nothing more.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from autograders.engine.core import Case, Forbid, Task, TaskSet, no_course_version, randn

CHAPTER = "12_ddpm"


def linear_alphas_cumprod(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Input data for the later exercises: abar of a linear schedule (float32)."""
    return torch.cumprod(1 - torch.linspace(beta_start, beta_end, T, dtype=torch.float32), dim=0)


def cosine_alphas_cumprod(T: int) -> torch.Tensor:
    """Input data: abar of the cosine schedule, computed in float64 and rounded to float32."""
    s = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999).float()
    return torch.cumprod(1 - betas, dim=0)


def _seed(g: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=g))


# diffusers' schedulers are what these checks compare with (autograders/ddpm.py); inside the sandbox they may
# not compute an exercise's answer either (Forbid(callables=...): seen however they are reached)
DIFFUSERS_SCHEDULERS = ("diffusers.schedulers.scheduling_ddpm:*", "diffusers.schedulers.scheduling_ddim:*")
NO_DIFFUSERS = Forbid("write it yourself: diffusers' DDPMScheduler / DDIMScheduler (what the checks compare with) may "
                      "not be called here", callables=DIFFUSERS_SCHEDULERS)


# ---------------------------------------------------------------------------------------------
# A small fixed denoiser: eps_hat depends on x_t (a 3x3 convolution) and on t (a sinusoid)


class ToyDenoiser(nn.Module):
    """``eps_hat = 0.8 tanh(conv3x3(x) * (1 + 0.5 sin(t / 97))) + 0.2 cos(t / 31)``, for ``(B, C, H, W)``
    inputs; it insists on ``t`` being a ``(B,)`` integer tensor, as the notebook's models do."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[0],) or t.dtype.is_floating_point:
            raise TypeError(f"the model expects t as a (B,) = ({x.shape[0]},) integer tensor, got "
                            f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                            f"{' of dtype ' + str(t.dtype) if isinstance(t, torch.Tensor) else ''}")
        if x.ndim != 4 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"the model expects x of shape (B, {self.weight.shape[1]}, H, W), got {tuple(x.shape)}")
        self.calls += 1
        tf = t.to(x.dtype)[:, None, None, None]
        h = F.conv2d(x, self.weight, self.bias, padding=1)
        return 0.8 * torch.tanh(h * (1 + 0.5 * torch.sin(tf / 97))) + 0.2 * torch.cos(tf / 31)


def _toy_params(g: torch.Generator, channels: int) -> dict:
    return {"weight": randn(g, channels, channels, 3, 3, scale=(9 * channels) ** -0.5), "bias": 0.1 * randn(g, channels)}


def build_toy(inputs: dict) -> ToyDenoiser:
    return ToyDenoiser(inputs["model"]["weight"], inputs["model"]["bias"])


# ---------------------------------------------------------------------------------------------
# 1. the noise schedule


def _schedule_inputs(T: int, kind: str, beta_start: float = 1e-4, beta_end: float = 0.02) -> dict:
    return {"num_train_timesteps": T, "kind": kind, "beta_start": beta_start, "beta_end": beta_end}


def _call_schedule(impl, inputs):
    out = impl(inputs["num_train_timesteps"], inputs["kind"], inputs["beta_start"], inputs["beta_end"])
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("noise_schedule must return a pair (betas, alphas_cumprod)")
    for name, value in zip(("betas", "alphas_cumprod"), out):
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 tensor (diffusers' dtype), got "
                            f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}")
    return tuple(out)


SCHEDULE = Task(
    "noise_schedule",
    cases=(
        Case("linear, T=1000 (DDPM's betas 1e-4 to 0.02)", lambda g: _schedule_inputs(1000, "linear")),
        Case("cosine, T=1000", lambda g: _schedule_inputs(1000, "cosine")),
        Case("linear, T=100, betas scaled by 1000/T", lambda g: _schedule_inputs(100, "linear", 1e-3, 0.2)),
        Case("cosine, T=50", lambda g: _schedule_inputs(50, "cosine"), hidden=True),
        Case("cosine, T=1 (the cap at 0.999)", lambda g: _schedule_inputs(1, "cosine"), hidden=True),
        Case("linear, T=300, betas 1e-5 to 0.05", lambda g: _schedule_inputs(300, "linear", 1e-5, 0.05), hidden=True),
        Case("linear, T=1", lambda g: _schedule_inputs(1, "linear"), hidden=True),
        Case("cosine, T=4000", lambda g: _schedule_inputs(4000, "cosine"), hidden=True),
    ),
    call=_call_schedule,
    output_names=("betas", "alphas_cumprod"),
    rules=(no_course_version("coursekit.diffusion:make_betas"), NO_DIFFUSERS),
)


# ---------------------------------------------------------------------------------------------
# 2. the forward process q(x_t | x_0)


def _q_inputs(g, shape, T=1000, t=None, cosine=False):
    B = shape[0]
    ab = cosine_alphas_cumprod(T) if cosine else linear_alphas_cumprod(T)
    if t is None:
        tt = torch.randint(0, T, (B,), generator=g)
    else:
        tt = torch.tensor(t, dtype=torch.int64)
    return {"x0": randn(g, *shape).clamp(-1, 1), "t": tt, "noise": randn(g, *shape), "alphas_cumprod": ab}


Q_SAMPLE = Task(
    "q_sample",
    cases=(
        Case("4 digits 1x8x8, random t", lambda g: _q_inputs(g, (4, 1, 8, 8))),
        Case("3 latents 4x2x2, t = 0, 500, 999", lambda g: _q_inputs(g, (3, 4, 2, 2), t=[0, 500, 999])),
        Case("batch 8 of 1x8x8 (batch equals width)", lambda g: _q_inputs(g, (8, 1, 8, 8)), hidden=True),
        Case("vectors (B, d) = (5, 6)", lambda g: _q_inputs(g, (5, 6)), hidden=True),
        Case("cosine schedule, T=100", lambda g: _q_inputs(g, (6, 3, 4, 4), T=100, cosine=True), hidden=True),
        Case("one image, t = T-1", lambda g: _q_inputs(g, (1, 1, 8, 8), t=[999]), hidden=True),
    ),
    call=lambda impl, i: impl(i["x0"], i["t"], i["noise"], i["alphas_cumprod"]),
    rules=(no_course_version("coursekit.diffusion:q_sample"), NO_DIFFUSERS),
)


# ---------------------------------------------------------------------------------------------
# 3. the training loss


def _loss_inputs(g, shape, T=1000, cosine=False):
    inputs = _q_inputs(g, shape, T, cosine=cosine)
    inputs["model"] = _toy_params(g, shape[1])
    return inputs


def _call_loss(impl, inputs):
    model = build_toy(inputs)
    with torch.enable_grad():
        loss = impl(model, inputs["x0"], inputs["t"], inputs["noise"], inputs["alphas_cumprod"])
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"ddpm_loss must return a tensor the optimiser can differentiate, got a "
                            f"{type(loss).__name__} (do not call .item())")
        if loss.ndim != 0:
            raise ValueError(f"ddpm_loss must return a scalar (the mean over the batch), got shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError("the loss is not connected to the model's parameters (was it detached?)")
        loss.backward()
    # shape (1,): the engine's array transport turns 0-d arrays into 1-d ones (np.ascontiguousarray)
    return loss.detach().reshape(1), model.weight.grad


LOSS = Task(
    "ddpm_loss",
    cases=(
        Case("4 digits 1x8x8", lambda g: _loss_inputs(g, (4, 1, 8, 8))),
        Case("6 latents 4x2x2", lambda g: _loss_inputs(g, (6, 4, 2, 2))),
        Case("batch 8 (batch equals width)", lambda g: _loss_inputs(g, (8, 1, 8, 8)), hidden=True),
        Case("cosine schedule, T=200", lambda g: _loss_inputs(g, (5, 2, 4, 4), T=200, cosine=True), hidden=True),
        Case("one image", lambda g: _loss_inputs(g, (1, 1, 8, 8)), hidden=True),
    ),
    call=_call_loss,
    output_names=("loss", "gradient of the model's conv weight"),
    uses=("q_sample",),
    rules=(NO_DIFFUSERS,),
)


# ---------------------------------------------------------------------------------------------
# 4. one reverse step


def _step_inputs(g, shape, t, prev_t, T=1000, clip_sample=True, cosine=False, eps_scale=1.0):
    ab = cosine_alphas_cumprod(T) if cosine else linear_alphas_cumprod(T)
    seed = _seed(g)
    return {"model_output": randn(g, *shape, scale=eps_scale), "t": t, "sample": randn(g, *shape),
            "noise": torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), "noise_seed": seed,
            "alphas_cumprod": ab, "prev_t": prev_t, "clip_sample": clip_sample}


def _call_step(impl, inputs):
    out = impl(inputs["model_output"], inputs["t"], inputs["sample"], inputs["noise"], inputs["alphas_cumprod"],
               inputs["prev_t"], inputs["clip_sample"])
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("ddpm_step must return a pair (prev_sample, pred_original_sample)")
    return tuple(out)


STEP = Task(
    "ddpm_step",
    cases=(
        Case("t=500 -> 499 of 1000, 3 digits 1x8x8", lambda g: _step_inputs(g, (3, 1, 8, 8), 500, 499)),
        Case("strided: t=980 -> 960", lambda g: _step_inputs(g, (2, 1, 8, 8), 980, 960)),
        Case("the last step: t=0 -> -1 (no noise)", lambda g: _step_inputs(g, (2, 1, 8, 8), 0, -1)),
        Case("clip_sample=False, t=300 -> 299", lambda g: _step_inputs(g, (2, 1, 8, 8), 300, 299, clip_sample=False)),
        Case("the first step: t=999 -> 998", lambda g: _step_inputs(g, (2, 1, 8, 8), 999, 998), hidden=True),
        Case("t=1 -> 0", lambda g: _step_inputs(g, (4, 4, 2, 2), 1, 0), hidden=True),
        Case("cosine schedule, strided 600 -> 400, latents", lambda g: _step_inputs(g, (5, 4, 2, 2), 600, 400, cosine=True),
             hidden=True),
        Case("strided, clip_sample=False, t=250 -> 0", lambda g: _step_inputs(g, (3, 1, 8, 8), 250, 0, clip_sample=False),
             hidden=True),
        Case("t=20 -> 19, small noise predictions", lambda g: _step_inputs(g, (3, 1, 8, 8), 20, 19, eps_scale=0.1),
             hidden=True),
        Case("T=100, t=99 -> -1 (one step to the end)", lambda g: _step_inputs(g, (2, 1, 8, 8), 99, -1, T=100),
             hidden=True),
    ),
    call=_call_step,
    output_names=("prev_sample", "pred_original_sample"),
    rules=(no_course_version("coursekit.diffusion:*.step"), NO_DIFFUSERS),
)


# ---------------------------------------------------------------------------------------------
# 5. the sampling loop


def _loop_inputs(g, shape, timesteps, T=1000, clip_sample=True, cosine=False):
    ab = cosine_alphas_cumprod(T) if cosine else linear_alphas_cumprod(T)
    return {"model": _toy_params(g, shape[1]), "shape": tuple(shape), "alphas_cumprod": ab,
            "timesteps": torch.tensor(timesteps, dtype=torch.int64), "seed": _seed(g), "clip_sample": clip_sample}


def _call_loop(impl, inputs):
    model = build_toy(inputs)
    generator = torch.Generator().manual_seed(inputs["seed"])
    out = impl(model, inputs["shape"], inputs["alphas_cumprod"], inputs["timesteps"], generator, inputs["clip_sample"])
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"ddpm_sample must return the final sample as a tensor, got a {type(out).__name__}")
    return out


LOOP = Task(
    "ddpm_sample",
    cases=(
        Case("5 strided steps of 1000 (800 ... 0), 3 digits", lambda g: _loop_inputs(g, (3, 1, 8, 8), [800, 600, 400, 200, 0])),
        Case("the full chain of T=20", lambda g: _loop_inputs(g, (2, 1, 8, 8), list(range(19, -1, -1)), T=20)),
        Case("one step (t=0)", lambda g: _loop_inputs(g, (2, 1, 8, 8), [0]), hidden=True),
        Case("latents 4x2x2, cosine, 10 steps from 999", lambda g: _loop_inputs(
            g, (4, 4, 2, 2), [999, 888, 777, 666, 555, 444, 333, 222, 111, 0], cosine=True), hidden=True),
        Case("clip_sample=False, 4 steps", lambda g: _loop_inputs(g, (3, 1, 8, 8), [300, 200, 100, 0], clip_sample=False),
             hidden=True),
        Case("uneven strides ending above 0", lambda g: _loop_inputs(g, (2, 1, 8, 8), [990, 700, 650, 100, 3]), hidden=True),
    ),
    call=_call_loop,
    output_names=("sample",),
    uses=("ddpm_step",),
    rules=(no_course_version("coursekit.diffusion:sample_loop", "coursekit.diffusion:*.step"), NO_DIFFUSERS),
)


TASKS = TaskSet(CHAPTER, [SCHEDULE, Q_SAMPLE, LOSS, STEP, LOOP])
