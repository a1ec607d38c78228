"""Attention and fused kernels, installed as ``sora_dist.kernels``.

Every attention in the model calls ``attention()``; the backend is chosen once at start-up
with ``set_attention_backend`` (the trainer does this from the device and the config). Ring
attention takes the same backend's per-block kernels from ``block_kernels()``.
"""

from sora_dist.kernels.attention import (
    BACKENDS,
    attention,
    attention_varlen,
    block_kernels,
    get_attention_backend,
    select_attention_backend,
    set_attention_backend,
)

__all__ = ["BACKENDS", "attention", "attention_varlen", "block_kernels", "get_attention_backend", "select_attention_backend", "set_attention_backend"]
