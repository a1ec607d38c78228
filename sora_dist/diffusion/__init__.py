"""Diffusion objectives and samplers, outside the model."""

from sora_dist.diffusion.objectives import DDPMObjective, FlowObjective, build_objective, drop_captions
from sora_dist.diffusion.samplers import ddim_sample, ddpm_sample, euler_sample, guided, sample
from sora_dist.diffusion.schedules import DDPMSchedule, cosine_betas, linear_betas, resolution_shift, shift_time

__all__ = [
    "DDPMObjective", "FlowObjective", "build_objective", "drop_captions",
    "ddim_sample", "ddpm_sample", "euler_sample", "guided", "sample",
    "DDPMSchedule", "cosine_betas", "linear_betas", "resolution_shift", "shift_time",
]
