"""Fused elementwise operations of the DiT, each with a plain-PyTorch reference and a switch back
to it:

- ``modulated_layer_norm(x, shift, scale)``: LayerNorm(x) * (1 + scale) + shift (adaLN);
- ``rms_norm(x, weight)``: RMSNorm, for QK-norm;
- ``rope(x, cos, sin)``: rotary embedding, half-split pairs (channel i with i + D/2), the
  convention of torch_npu's npu_rotary_mul;
- ``gated_residual(x, gate, y)``: x + gate * y (adaLN-Zero's gated residual).

Backends, chosen once at start-up like attention: ``triton`` (CUDA; Triton's interpreter in CPU
tests), ``npu`` (torch_npu's npu_rms_norm and npu_rotary_mul; the other two stay in PyTorch,
where the NPU graph compiler fuses them), ``reference``. DTensor inputs (tensor parallel)
always take the reference path, which DTensor understands.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from sora_dist.errors import ConfigError

FUSED_BACKENDS = ("reference", "triton", "npu")
_backend = "reference"


def select_fused_backend(device_kind: str) -> str:
    if device_kind == "cuda" and importlib.util.find_spec("triton"):
        return "triton"
    return "npu" if device_kind == "npu" else "reference"


def set_fused_backend(name: str) -> None:
    global _backend
    if name not in FUSED_BACKENDS:
        raise ConfigError(f"model.fused_backend={name!r} is unknown: choose auto or one of {', '.join(FUSED_BACKENDS)}")
    _backend = name


def get_fused_backend() -> str:
    return _backend


def _use(name: str, *tensors: torch.Tensor) -> bool:
    return _backend == name and not any(isinstance(t, DTensor) for t in tensors)


# ---------------------------------------------------------------------------------------------
# References


def _at_least_fp32(x):
    """x in fp32, or as it is if wider (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def reference_modulated_layer_norm(x, shift, scale, eps=1e-6):
    """In at least fp32 (the modulation may be wider than x: Wan's fp32 tables), returned as x."""
    normed = F.layer_norm(_at_least_fp32(x), x.shape[-1:], eps=eps)
    return (normed * (1 + scale[:, None]) + shift[:, None]).type_as(x)


def reference_rms_norm(x, weight, eps=1e-6):
    x32 = _at_least_fp32(x)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def reference_all_heads_rms_norm(x, weight, eps=1e-6):
    """(B, H, N, Dh) x normalized over all heads' channels of each token, times the (H*Dh) weight."""
    x32 = _at_least_fp32(x)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=(1, 3), keepdim=True) + eps)
    return normed.type_as(x) * weight.view(x.shape[1], 1, -1)


def reference_rope(x, cos, sin):
    x1, x2 = _at_least_fp32(x).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


def reference_gated_residual(x, gate, y):
    return (x + gate[:, None] * y).type_as(x)


# ---------------------------------------------------------------------------------------------
# Triton autograd wrappers


def _kernels():
    from sora_dist.kernels import triton_kernels  # imports triton: only when that backend is used

    return triton_kernels


class _ModulatedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        k = _kernels()
        b, n, d = x.shape
        x_, shift_, scale_ = x.contiguous(), shift.contiguous(), scale.contiguous()
        y = torch.empty_like(x_)
        mean = torch.empty(b * n, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        k._modulated_ln_fwd[(b * n,)](x_, shift_, scale_, y, mean, rstd, n, d, eps, BLOCK=k.block_for(d))
        ctx.save_for_backward(x_, scale_, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        k = _kernels()
        x, scale, mean, rstd = ctx.saved_tensors
        b, n, d = x.shape
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        k._modulated_ln_bwd[(b * n,)](dy, x, scale, mean, rstd, dx, n, d, BLOCK=k.block_for(d))
        xhat = (x.float() - mean.view(b, n, 1)) * rstd.view(b, n, 1)
        return dx, dy.float().sum(1).to(scale.dtype), (dy.float() * xhat).sum(1).to(scale.dtype), None


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        k = _kernels()
        d = x.shape[-1]
        x_ = x.contiguous()
        rows = x_.numel() // d
        y = torch.empty_like(x_)
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        k._rms_norm_fwd[(rows,)](x_, weight.contiguous(), y, rstd, d, eps, BLOCK=k.block_for(d))
        ctx.save_for_backward(x_, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        k = _kernels()
        x, weight, rstd = ctx.saved_tensors
        d = x.shape[-1]
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        k._rms_norm_bwd[(rstd.numel(),)](dy, x, weight.contiguous(), rstd, dx, d, BLOCK=k.block_for(d))
        dweight = (dy.float() * x.float() * rstd.view(*x.shape[:-1], 1)).reshape(-1, d).sum(0)
        return dx, dweight.to(weight.dtype), None


def _rope_launch(x, cos, sin, sign):
    k = _kernels()
    x_ = x.contiguous()
    out = torch.empty_like(x_)
    n, half = cos.shape
    k._rope[(x_.numel() // (2 * half),)](x_, cos.contiguous(), sin.contiguous(), out, n, half, sign, BLOCK=k.block_for(half))
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dout):
        cos, sin = ctx.saved_tensors
        return _rope_launch(dout, cos, sin, -1.0), None, None  # a rotation's transpose is its inverse


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y):
        k = _kernels()
        b, n, d = x.shape
        x_, gate_, y_ = x.contiguous(), gate.contiguous(), y.contiguous()
        out = torch.empty_like(x_)
        k._gated_residual[(b * n,)](x_, gate_, y_, out, n, d, BLOCK=k.block_for(d))
        ctx.save_for_backward(gate_, y_)
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, y = ctx.saved_tensors
        return dout, (dout.float() * y.float()).sum(1).to(gate.dtype), dout * gate[:, None]


# ---------------------------------------------------------------------------------------------
# Public functions


def modulated_layer_norm(x, shift, scale, eps: float = 1e-6):
    """(B, N, D) x, (B, D) shift and scale, possibly wider than x (Wan's fp32 modulation of bf16
    activations): the Triton kernel computes in fp32 whatever they are and returns x's dtype."""
    if _use("triton", x, shift, scale):
        return _ModulatedLayerNorm.apply(x, shift, scale, eps)
    return reference_modulated_layer_norm(x, shift, scale, eps)


def rms_norm(x, weight, eps: float = 1e-6):
    """RMS-normalize the last dimension, times ``weight``."""
    if _use("triton", x, weight):
        return _RMSNorm.apply(x, weight, eps)
    if _use("npu", x, weight):
        from sora_dist.device import npu_ops

        return npu_ops().npu_rms_norm(x, weight, epsilon=eps)[0]
    return reference_rms_norm(x, weight, eps)


def all_heads_rms_norm(x, weight, eps: float = 1e-6):
    """RMS-normalize (B, H, N, Dh) over all heads' channels of each token (Wan's QK-norm), times
    the (H*Dh) weight. x is a head view of a flat (B, N, H*Dh) projection: one fused norm over
    that (torch's rms_norm, as diffusers' torch.nn.RMSNorm). Under tensor parallelism x is a
    DTensor split by heads and the reference's reductions span the ranks' heads."""
    if any(isinstance(t, DTensor) for t in (x, weight)):
        return reference_all_heads_rms_norm(x, weight, eps)
    b, h, n, dh = x.shape
    flat = x.transpose(1, 2).reshape(b, n, h * dh)
    return F.rms_norm(flat, (h * dh,), weight, eps).view(b, n, h, dh).transpose(1, 2)


def rope(x, cos, sin):
    """(B, H, N, D) x rotated by (N, D/2) angles, half-split pairs."""
    if _use("triton", x):
        return _Rope.apply(x, cos, sin)
    if _use("npu", x):
        from sora_dist.device import npu_ops

        # npu_rotary_mul(x, r1, r2) = x * r1 + rotate_half(x) * r2 over (1, 1, N, D) tables.
        r1, r2 = (torch.cat((t, t), dim=-1)[None, None].to(x.dtype) for t in (cos, sin))
        return npu_ops().npu_rotary_mul(x, r1, r2)
    return reference_rope(x, cos, sin)


def gated_residual(x, gate, y):
    """x + gate[:, None] * y for (B, N, D) x and y, (B, D) gate; returned as x."""
    if _use("triton", x, gate, y) and gate.dtype == x.dtype:
        return _GatedResidual.apply(x, gate, y)
    return reference_gated_residual(x, gate, y)
