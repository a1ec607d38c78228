"""The video DiT, its size presets, and its parameter and FLOP counts."""

from sora_dist.models.dit import DiTConfig, VideoDiT
from sora_dist.models.presets import PRESETS
from sora_dist.models.flops import context_len, count_parameters, executed_train_flops, forward_flops, train_flops

__all__ = [
    "DiTConfig",
    "VideoDiT",
    "PRESETS",
    "context_len",
    "count_parameters",
    "executed_train_flops",
    "forward_flops",
    "train_flops",
]
