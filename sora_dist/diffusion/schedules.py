"""DDPM noise schedules (Ho et al. 2020; cosine: Nichol & Dhariwal 2021) and the rectified-flow
timestep shift. Schedules are kept in float64 and cast when indexed."""

from __future__ import annotations

import math

import torch


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al.'s linear betas, rescaled so other step counts keep the same total noise."""
    scale = 1000 / num_timesteps
    return torch.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Betas whose alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), normalized to alpha_bar(0)=1."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


class DDPMSchedule:
    """alpha_t = 1 - beta_t and alpha_bar_t = prod_{s<=t} alpha_s, for t = 0 .. T-1."""

    def __init__(self, kind: str, num_timesteps: int):
        builders = {"linear": linear_betas, "cosine": cosine_betas}
        self.num_timesteps = num_timesteps
        self.betas = builders[kind](num_timesteps)
        self.alphas = 1 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar at integer timesteps t (B,), shaped to broadcast against ``like`` (B, ...)."""
        values = self.alphas_cumprod.to(t.device)[t].to(like.dtype)
        return values.view(-1, *([1] * (like.dim() - 1)))


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Warp flow times in [0, 1] toward 1 (more noise) for shift > 1, as in SD3: s t / (1 + (s-1) t)."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, reference_tokens: int) -> float:
    """Shift that keeps the signal-to-noise ratio per token comparable across resolutions.

    Noise at a given t destroys less of a larger image (neighbouring tokens are redundant),
    so larger inputs spend more time near pure noise: shift = sqrt(tokens / reference), >= 1.
    """
    return max(1.0, math.sqrt(num_tokens / reference_tokens))
