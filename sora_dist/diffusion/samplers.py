"""Samplers: DDPM ancestral (Algorithm 2 of Ho et al.), DDIM (eta = 0), and Euler for
rectified flow; classifier-free guidance wraps the model into a guided denoiser.

A sampler takes ``denoise(x, t) -> prediction`` where t is the model's timestep, (B,) or (B, T'),
and an optional ``progress(done, total)`` callback called after every step.

Frame-conditioned applications pass a ``FrameCondition``: its given frames are held at their
clean latents and timestep 0 throughout, exactly as the mask strategy trained them. Editing
(SDEdit, Meng et al. 2022) passes ``init`` latents and a ``strength`` in (0, 1]: the sampler
noises ``init`` to the point ``strength`` of the way back along its schedule and runs only the
remaining steps (strength 1 starts from pure noise)."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from sora_dist.diffusion.masks import FrameCondition
from sora_dist.diffusion.objectives import DDPMObjective, FlowObjective
from sora_dist.diffusion.schedules import shift_time

GuidedDenoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Optional[Callable[[int, int], None]]


def _report(progress: Progress, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def guided(model, text: torch.Tensor, text_mask: torch.Tensor, scale: float) -> GuidedDenoiser:
    """Classifier-free guidance: uncond + scale * (cond - uncond), in one batched call."""
    if scale == 1.0:
        return lambda x, t: model(x, t, text, text_mask)
    null_mask = torch.zeros_like(text_mask)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, text]), torch.cat([text_mask, null_mask]))
        cond, uncond = out.float().chunk(2)
        return uncond + scale * (cond - uncond)

    return denoise


def _eps(objective: DDPMObjective, prediction: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    if objective.prediction == "eps":
        return prediction
    return alpha_bar.sqrt() * prediction + (1 - alpha_bar).sqrt() * x_t  # eps from v


class Conditioned:
    """The denoiser seen through a frame condition: given frames clean, at timestep 0."""

    def __init__(self, denoise: GuidedDenoiser, condition: Optional[FrameCondition]):
        self.denoise, self.condition = denoise, condition

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.condition is None:
            return self.denoise(x, t)
        return self.denoise(x, self.condition.timesteps(t))

    def keep_given(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.condition is None else self.condition.keep_given(x)


def steps_to_run(total: int, strength: float) -> int:
    """How many of a schedule's ``total`` steps an edit of ``strength`` runs (the last ones)."""
    return max(1, math.ceil(strength * total - 1e-9))


@torch.no_grad()
def ddpm_sample(objective: DDPMObjective, denoise: GuidedDenoiser, noise: torch.Tensor, generator: Optional[torch.Generator] = None,
                progress: Progress = None, condition: Optional[FrameCondition] = None, init: Optional[torch.Tensor] = None,
                strength: float = 1.0) -> torch.Tensor:
    """x_{t-1} = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t) + sqrt(beta_t) z."""
    denoise = Conditioned(denoise, condition)
    schedule = objective.schedule
    total = steps_to_run(schedule.num_timesteps, strength) if init is not None else schedule.num_timesteps
    x = noise if init is None else _noised_ddpm(objective, init, noise, total - 1)
    x = denoise.keep_given(x)
    for done, step in enumerate(reversed(range(total)), start=1):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        alpha_bar = schedule.alpha_bar(t, x)
        beta, alpha = (float(v[step]) for v in (schedule.betas, schedule.alphas))
        eps = _eps(objective, denoise(x, t.to(x.dtype)), x, alpha_bar)
        x = (x - beta / (1 - alpha_bar).sqrt() * eps) / alpha**0.5
        if step > 0:
            x = x + beta**0.5 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = denoise.keep_given(x)
        _report(progress, done, total)
    return x


def _noised_ddpm(objective: DDPMObjective, x0: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
    alpha_bar = float(objective.schedule.alphas_cumprod[step])
    return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise


@torch.no_grad()
def ddim_sample(objective: DDPMObjective, denoise: GuidedDenoiser, noise: torch.Tensor, steps: int, progress: Progress = None,
                condition: Optional[FrameCondition] = None, init: Optional[torch.Tensor] = None, strength: float = 1.0) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021) on an evenly spaced subset of the timesteps."""
    denoise = Conditioned(denoise, condition)
    schedule = objective.schedule
    timesteps = torch.linspace(schedule.num_timesteps - 1, 0, steps).round().long().tolist()
    if init is not None:
        timesteps = timesteps[steps - steps_to_run(steps, strength):]
    x = noise if init is None else _noised_ddpm(objective, init, noise, timesteps[0])
    x = denoise.keep_given(x)
    for i, step in enumerate(timesteps):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        alpha_bar = schedule.alpha_bar(t, x)
        eps = _eps(objective, denoise(x, t.to(x.dtype)), x, alpha_bar)
        x0 = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        alpha_bar_prev = float(schedule.alphas_cumprod[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        x = denoise.keep_given(alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * eps)
        _report(progress, i + 1, len(timesteps))
    return x


@torch.no_grad()
def euler_sample(objective: FlowObjective, denoise: GuidedDenoiser, noise: torch.Tensor, steps: int, progress: Progress = None,
                 condition: Optional[FrameCondition] = None, init: Optional[torch.Tensor] = None, strength: float = 1.0) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 on the shifted time grid."""
    denoise = Conditioned(denoise, condition)
    times = shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), objective.shift_for(noise.shape))
    if init is not None:
        times = times[steps - steps_to_run(steps, strength):]
    start = float(times[0])
    x = noise if init is None else (1 - start) * init + start * noise
    x = denoise.keep_given(x)
    for done, (t_now, t_next) in enumerate(zip(times[:-1].tolist(), times[1:].tolist()), start=1):
        t = torch.full((x.shape[0],), t_now * 1000, device=x.device, dtype=x.dtype)
        x = denoise.keep_given(x + (t_next - t_now) * denoise(x, t).to(x.dtype))
        _report(progress, done, len(times) - 1)
    return x


def sample(objective, sampler: str, denoise: GuidedDenoiser, noise: torch.Tensor, steps: int, generator=None, progress: Progress = None,
           condition: Optional[FrameCondition] = None, init: Optional[torch.Tensor] = None, strength: float = 1.0) -> torch.Tensor:
    """Run the named sampler from ``noise`` (or ``init`` noised to ``strength``) to clean latents,
    holding the given frames of ``condition``."""
    if sampler == "euler":
        return euler_sample(objective, denoise, noise, steps, progress, condition, init, strength)
    if sampler == "ddim":
        return ddim_sample(objective, denoise, noise, steps, progress, condition, init, strength)
    return ddpm_sample(objective, denoise, noise, generator, progress, condition, init, strength)
