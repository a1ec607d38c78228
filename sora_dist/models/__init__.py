"""The video DiT, its size presets, and its parameter and FLOP counts."""

from sora_dist.models.dit import DiTConfig, VideoDiT
from sora_dist.models.presets import PRESETS, resolve_model_config
from sora_dist.models.flops import count_parameters, forward_flops, train_flops

__all__ = [
    "DiTConfig",
    "VideoDiT",
    "PRESETS",
    "resolve_model_config",
    "count_parameters",
    "forward_flops",
    "train_flops",
]
