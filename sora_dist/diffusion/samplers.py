"""Samplers: DDPM ancestral (Algorithm 2 of Ho et al.), DDIM (eta = 0), and Euler for
rectified flow; classifier-free guidance wraps the model into a guided denoiser.

A sampler takes ``denoise(x, t) -> prediction`` where t is the model's timestep (B,), and an
optional ``progress(done, total)`` callback called after every step."""

from __future__ import annotations

from typing import Callable, Optional

import torch

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


@torch.no_grad()
def ddpm_sample(objective: DDPMObjective, denoise: GuidedDenoiser, noise: torch.Tensor, generator: Optional[torch.Generator] = None,
                progress: Progress = None) -> torch.Tensor:
    """x_{t-1} = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t) + sqrt(beta_t) z."""
    schedule, x = objective.schedule, noise
    total = schedule.num_timesteps
    for done, step in enumerate(reversed(range(total)), start=1):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        alpha_bar = schedule.alpha_bar(t, x)
        beta, alpha = (float(v[step]) for v in (schedule.betas, schedule.alphas))
        eps = _eps(objective, denoise(x, t.to(x.dtype)), x, alpha_bar)
        x = (x - beta / (1 - alpha_bar).sqrt() * eps) / alpha**0.5
        if step > 0:
            x = x + beta**0.5 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        _report(progress, done, total)
    return x


@torch.no_grad()
def ddim_sample(objective: DDPMObjective, denoise: GuidedDenoiser, noise: torch.Tensor, steps: int, progress: Progress = None) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021) on an evenly spaced subset of the timesteps."""
    schedule, x = objective.schedule, noise
    timesteps = torch.linspace(schedule.num_timesteps - 1, 0, steps).round().long().tolist()
    for i, step in enumerate(timesteps):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        alpha_bar = schedule.alpha_bar(t, x)
        eps = _eps(objective, denoise(x, t.to(x.dtype)), x, alpha_bar)
        x0 = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        alpha_bar_prev = float(schedule.alphas_cumprod[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        x = alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * eps
        _report(progress, i + 1, len(timesteps))
    return x


@torch.no_grad()
def euler_sample(objective: FlowObjective, denoise: GuidedDenoiser, noise: torch.Tensor, steps: int, progress: Progress = None) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 on the shifted time grid."""
    times = shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), objective.shift_for(noise.shape))
    x = noise
    for done, (t_now, t_next) in enumerate(zip(times[:-1].tolist(), times[1:].tolist()), start=1):
        t = torch.full((x.shape[0],), t_now * 1000, device=x.device, dtype=x.dtype)
        x = x + (t_next - t_now) * denoise(x, t).to(x.dtype)
        _report(progress, done, steps)
    return x


def sample(objective, sampler: str, denoise: GuidedDenoiser, noise: torch.Tensor, steps: int, generator=None, progress: Progress = None) -> torch.Tensor:
    """Run the named sampler from ``noise`` to clean latents."""
    if sampler == "euler":
        return euler_sample(objective, denoise, noise, steps, progress)
    if sampler == "ddim":
        return ddim_sample(objective, denoise, noise, steps, progress)
    return ddpm_sample(objective, denoise, noise, generator, progress)
