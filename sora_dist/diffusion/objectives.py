"""Training objectives. Each takes the denoiser, clean latents and text, and returns the
per-sample loss. Random draws come from an explicit generator so that every rank of a
sequence-parallel group can draw the same timesteps, noise and given frames.

With the mask strategy on (``MaskConfig``), each sample's given frames are clean (t = 0, the
network sees them at timestep 0) and carry no loss; the others are noised to the sample's t.
Timesteps are then per patch frame, (B, T'); with it off they are per sample, (B,)."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from sora_dist.config import DiffusionConfig, MaskConfig
from sora_dist.diffusion.masks import MaskStrategy, broadcast_to_latents, frame_timesteps, masked_mean_per_sample
from sora_dist.diffusion.schedules import DDPMSchedule, resolution_shift, shift_time

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def drop_captions(text_mask: torch.Tensor, probability: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Mask out every text token of a random fraction of the samples (classifier-free training)."""
    if probability == 0:
        return text_mask
    keep = torch.rand(text_mask.shape[0], generator=generator, device=text_mask.device) >= probability
    return text_mask & keep[:, None]


class DDPMObjective:
    """Algorithm 1 of Ho et al. (2020): x_t = sqrt(ab) x0 + sqrt(1-ab) eps, regress eps or v."""

    def __init__(self, schedule: DDPMSchedule, prediction: str, caption_dropout: float, masks: Optional[MaskStrategy] = None):
        self.schedule = schedule
        self.prediction = prediction
        self.caption_dropout = caption_dropout
        self.masks = masks or MaskStrategy(MaskConfig(), patch_t=1)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return noise
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0  # v (Salimans & Ho 2022)

    def loss(self, model: Denoiser, x0, text, text_mask, generator=None) -> torch.Tensor:
        b = x0.shape[0]
        t = torch.randint(0, self.schedule.num_timesteps, (b,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        given = self.masks.draw(x0, generator)
        alpha_bar = self.schedule.alpha_bar(t, x0)
        if given is not None:  # given frames: alpha_bar = 1, so x_t = x0 there
            alpha_bar = torch.where(broadcast_to_latents(given, x0, self.masks.patch_t), torch.ones_like(alpha_bar), alpha_bar)
            t = frame_timesteps(t, given)
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        mask = drop_captions(text_mask, self.caption_dropout, generator)
        prediction = model(x_t, t.to(x0.dtype), text, mask)
        error = (prediction.float() - self.target(x0, noise, alpha_bar).float()) ** 2
        return masked_mean_per_sample(error, given, self.masks.patch_t)


class FlowObjective:
    """Rectified flow: x_t = (1 - t) x0 + t noise, regress the velocity noise - x0.

    t follows a logit-normal law (SD3), warped by a shift that grows with the token count.
    The network sees t * 1000, the same range as DDPM timesteps.
    """

    def __init__(self, cfg: DiffusionConfig, patch_size: tuple[int, int, int], masks: Optional[MaskStrategy] = None):
        self.mean, self.std = cfg.logit_normal_mean, cfg.logit_normal_std
        self.fixed_shift, self.reference_tokens = cfg.shift, cfg.shift_reference_tokens
        self.caption_dropout = cfg.caption_dropout
        self.timestep_range = cfg.timestep_range
        self.patch_volume = math.prod(patch_size)
        self.masks = masks or MaskStrategy(MaskConfig(), patch_size[0])

    def shift_for(self, latent_shape: tuple[int, ...]) -> float:
        """Shift for a latent (..., T, h, w), from the fixed value or its token count."""
        if self.fixed_shift is not None:
            return self.fixed_shift
        tokens = math.prod(latent_shape[-3:]) / self.patch_volume
        return resolution_shift(tokens, self.reference_tokens)

    def sample_t(self, batch: int, shift: float, device, generator=None) -> torch.Tensor:
        """Times in [0, 1]: logit-normal, shifted; within ``timestep_range`` (timesteps, 0-1000)
        when one is set, drawn from the same law truncated to it (inverse CDF: the shift and the
        sigmoid are monotone, so the range maps to one interval of the normal draw)."""
        if self.timestep_range is None:
            u = torch.sigmoid(self.mean + self.std * torch.randn(batch, generator=generator, device=device))
            return shift_time(u, shift)
        low, high = (self._normal_quantile(bound / 1000, shift) for bound in self.timestep_range)
        level = low + (high - low) * torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
        u = torch.sigmoid(self.mean + self.std * torch.special.ndtri(level))
        return shift_time(u, shift).float().clamp(self.timestep_range[0] / 1000, self.timestep_range[1] / 1000)

    def _normal_quantile(self, t: float, shift: float) -> float:
        """The standard normal CDF at the draw that gives time ``t`` (0 at t = 0, 1 at t = 1)."""
        if t <= 0.0 or t >= 1.0:
            return float(t >= 1.0)
        u = t / (shift - (shift - 1) * t)  # shift_time's inverse
        return float(torch.special.ndtr(torch.tensor((math.log(u / (1 - u)) - self.mean) / self.std, dtype=torch.float64)))

    def loss(self, model: Denoiser, x0, text, text_mask, generator=None) -> torch.Tensor:
        b = x0.shape[0]
        t = self.sample_t(b, self.shift_for(x0.shape), x0.device, generator).to(x0.dtype)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        given = self.masks.draw(x0, generator)
        if given is not None:
            t = frame_timesteps(t, given)  # (B, T'), 0 on given frames: x_t = x0 there
        t_b = broadcast_to_latents(t, x0, self.masks.patch_t)
        x_t = (1 - t_b) * x0 + t_b * noise
        mask = drop_captions(text_mask, self.caption_dropout, generator)
        prediction = model(x_t, t * 1000, text, mask)
        return masked_mean_per_sample((prediction.float() - (noise - x0).float()) ** 2, given, self.masks.patch_t)


def build_objective(cfg: DiffusionConfig, patch_size: tuple[int, int, int], mask: Optional[MaskConfig] = None):
    """The training objective of ``cfg``, with the mask strategy ``mask`` (off when None)."""
    masks = MaskStrategy(mask or MaskConfig(), patch_size[0])
    if cfg.objective == "flow":
        return FlowObjective(cfg, patch_size, masks)
    return DDPMObjective(DDPMSchedule(cfg.schedule, cfg.num_timesteps), cfg.prediction, cfg.caption_dropout, masks)
