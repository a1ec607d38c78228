"""The single attention entry point of the model, and its per-device backends.

Tensors are (batch, heads, tokens, head_dim). ``key_mask`` is (batch, keys) with True where a
key may be attended to (text padding is False). Backends are plain functions in a dict; one is
chosen once at start-up (``select_attention_backend``) and logged by the trainer.

- ``sdpa``: PyTorch scaled_dot_product_attention (CPU, and any device).
- ``cudnn``: SDPA restricted to the cuDNN / FlashAttention kernels (CUDA without flash-attn).
- ``flash2`` / ``flash3``: the flash-attn packages (FlashAttention-2, FlashAttention-3 on Hopper);
  masked calls go through their variable-length entry with the padded keys removed.
- ``npu``: ``torch_npu.npu_fusion_attention`` in the BNSD layout (our layout: no transposes), with
  its documented conventions: ``atten_mask`` True means *masked out*, ``scale`` must be passed
  (its default is 1.0, not 1/sqrt(d)).
- ``reference``: plain softmax(q k^T / sqrt(d)) v, the ground truth of every test.

Ring attention (sequence parallelism across ranks) uses the same backend's fused kernels one key
block at a time: ``block_kernels()``.

``attention_varlen`` is the packed entry point, for samples of different sizes sharing one
sequence without padding: (total_tokens, heads, head_dim) tensors and cumulative lengths.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from sora_dist.errors import ConfigError
from sora_dist.kernels.block_attention import BLOCK_KERNELS, BlockBackward, BlockForward

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def reference_attention(q, k, v, key_mask=None):
    """Plain softmax(q k^T / sqrt(d)) v in at least fp32, the ground truth every backend is tested against."""
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bhnd,bhmd->bhnm", q.to(compute), k.to(compute)) / q.shape[-1] ** 0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhnm,bhmd->bhnd", scores.softmax(dim=-1), v.to(compute)).to(q.dtype)


def sdpa_attention(q, k, v, key_mask=None):
    """PyTorch scaled_dot_product_attention; the mask broadcasts over heads and queries."""
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, M)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def cudnn_attention(q, k, v, key_mask=None):
    """SDPA with only the fused CUDA kernels allowed (cuDNN first), never the math fallback."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], set_priority=True):
        return sdpa_attention(q, k, v, key_mask)


def _first(out):
    """FlashAttention-3 returns (out, lse), FlashAttention-2 just out."""
    return out[0] if isinstance(out, tuple) else out


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))


FLASH_DTYPES = (torch.float16, torch.bfloat16)


def _flash(module_name: str):
    """A backend over a flash-attn module's flash_attn_func / flash_attn_varlen_func. flash-attn
    computes in fp16/bf16 only; fp32 calls (an fp32 run, or sampling outside autocast) take SDPA."""

    def run(q, k, v, key_mask=None):
        if q.dtype not in FLASH_DTYPES:
            return sdpa_attention(q, k, v, key_mask)
        flash = importlib.import_module(module_name)
        scale = q.shape[-1] ** -0.5
        q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn takes (B, S, H, D)
        if key_mask is None or bool(key_mask.all()):
            out = flash.flash_attn_func(q_, k_, v_, softmax_scale=scale)
        else:  # drop the padded keys and run the variable-length kernel
            b, n = q_.shape[:2]
            lengths = key_mask.sum(dim=1)
            keys = key_mask.reshape(-1)
            out = _first(flash.flash_attn_varlen_func(
                q_.reshape(b * n, *q_.shape[2:]),
                k_.reshape(-1, *k_.shape[2:])[keys],
                v_.reshape(-1, *v_.shape[2:])[keys],
                cu_seqlens_q=_cu_seqlens(torch.full((b,), n, device=q.device)),
                cu_seqlens_k=_cu_seqlens(lengths),
                max_seqlen_q=n,
                max_seqlen_k=int(lengths.max()),
                softmax_scale=scale,
            )).reshape(b, n, *q_.shape[2:])
        return _first(out).transpose(1, 2)

    return run


def npu_attention(q, k, v, key_mask=None):
    """torch_npu.npu_fusion_attention in BNSD; atten_mask True = masked out (B, 1, Sq, Skv)."""
    from sora_dist.device import npu_ops

    atten_mask = None
    if key_mask is not None and not bool(key_mask.all()):
        atten_mask = (~key_mask)[:, None, None, :].expand(q.shape[0], 1, q.shape[2], k.shape[2])
    outputs = npu_ops().npu_fusion_attention(
        q, k, v, q.shape[1], "BNSD", atten_mask=atten_mask, scale=q.shape[-1] ** -0.5, keep_prob=1.0,
    )
    return outputs[0]


BACKENDS: dict[str, AttentionFn] = {
    "sdpa": sdpa_attention,
    "reference": reference_attention,
    "cudnn": cudnn_attention,
    "flash2": _flash("flash_attn"),
    "flash3": _flash("flash_attn_interface"),
    "npu": npu_attention,
}


def select_attention_backend(device_kind: str, capability: Optional[tuple[int, int]] = None) -> str:
    """The best installed backend for a device: FlashAttention-3 on Hopper, then -2, then cuDNN SDPA
    on CUDA; the fused op on Ascend; SDPA on CPU."""
    if device_kind == "cuda":
        if capability is not None and capability[0] == 9 and importlib.util.find_spec("flash_attn_interface"):
            return "flash3"
        if importlib.util.find_spec("flash_attn"):
            return "flash2"
        return "cudnn"
    if device_kind == "npu":
        return "npu"
    return "sdpa"


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


def attention(q, k, v, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention through the backend chosen at start-up."""
    return _active(q, k, v, key_mask)


def block_kernels() -> tuple[BlockForward, BlockBackward]:
    """The active backend's (forward, backward) pair over one key block with its log-sum-exp,
    which ring attention is built from (see ``block_attention``)."""
    return BLOCK_KERNELS[_active_name]


# ---------------------------------------------------------------------------------------------
# Packed (variable-length) attention


def attention_varlen(q, k, v, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int) -> torch.Tensor:
    """Attention within each packed segment. q: (Tq, H, D), k/v: (Tk, H, D); cu_seqlens_*:
    (S+1,) int32 cumulative lengths starting at 0. Uses the active backend's varlen kernel."""
    if _active_name in ("flash2", "flash3") and q.dtype in FLASH_DTYPES:
        flash = importlib.import_module("flash_attn" if _active_name == "flash2" else "flash_attn_interface")
        return _first(flash.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                                   max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=q.shape[-1] ** -0.5))
    if _active_name == "npu":
        from sora_dist.device import npu_ops

        # TND layout; actual_seq_* are the cumulative ends of the segments, without the leading 0.
        return npu_ops().npu_fusion_attention(
            q, k, v, q.shape[1], "TND", scale=q.shape[-1] ** -0.5, keep_prob=1.0,
            actual_seq_qlen=cu_seqlens_q[1:].tolist(), actual_seq_kvlen=cu_seqlens_k[1:].tolist(),
        )[0]
    return _block_diagonal_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k)


def _block_diagonal_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k):
    """Fallback: one SDPA call over the packed sequence with a block-diagonal mask."""
    segment_q = torch.searchsorted(cu_seqlens_q[1:], torch.arange(q.shape[0], device=q.device), right=True)
    segment_k = torch.searchsorted(cu_seqlens_k[1:], torch.arange(k.shape[0], device=k.device), right=True)
    mask = segment_q[:, None] == segment_k[None, :]  # (Tq, Tk)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask[None, None])
    return out[0].transpose(0, 1)
