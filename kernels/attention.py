"""The single attention entry point of the model, and its backends.

Tensors are (batch, heads, tokens, head_dim). ``key_mask`` is (batch, keys) with True where a
key may be attended to (text padding is False). Backends are plain functions in a dict.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from sora_dist.errors import ConfigError

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """PyTorch scaled_dot_product_attention; the mask broadcasts over heads and queries."""
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, M)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Plain softmax(q k^T / sqrt(d)) v, the ground truth every backend is tested against."""
    scores = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) / q.shape[-1] ** 0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhnm,bhmd->bhnd", scores.softmax(dim=-1), v.float()).to(q.dtype)


BACKENDS: dict[str, AttentionFn] = {
    "sdpa": sdpa_attention,
    "reference": reference_attention,
}

_active: AttentionFn = sdpa_attention
_active_name = "sdpa"


def set_attention_backend(name: str) -> None:
    """Choose the backend every later ``attention()`` call uses."""
    global _active, _active_name
    if name not in BACKENDS:
        raise ConfigError(f"model.attention_backend={name!r} is unknown: choose auto or one of {', '.join(BACKENDS)}")
    _active, _active_name = BACKENDS[name], name


def get_attention_backend() -> str:
    return _active_name


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Attention through the backend chosen at start-up."""
    return _active(q, k, v, key_mask)
