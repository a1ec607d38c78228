"""Triton kernels for the DiT's memory-bound elementwise work, one program per row of the last
dimension. On CPU they run in Triton's interpreter (TRITON_INTERPRET=1; fp32 only) for the
parity tests; on CUDA they compile.

Autograd wrappers live in fused.py; the reductions over rows that the backward needs (weight,
shift, scale and gate gradients) are left to PyTorch, which already does them at bandwidth.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, x * rstd * w, mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, D, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    dyw = tl.load(dy_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32) * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    dx = rstd * (dyw - x * rstd * rstd * tl.sum(dyw * x, axis=0) / D)
    tl.store(dx_ptr + row * D + cols, dx, mask=mask)


@triton.jit
def _modulated_ln_fwd(x_ptr, shift_ptr, scale_ptr, y_ptr, mean_ptr, rstd_ptr, N, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    batch = row // N
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    centred = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
    scale = tl.load(scale_ptr + batch * D + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + batch * D + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, centred * rstd * (1.0 + scale) + shift, mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _modulated_ln_bwd(dy_ptr, x_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, N, D, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    batch = row // N
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    scale = tl.load(scale_ptr + batch * D + cols, mask=mask, other=0.0).to(tl.float32)
    dxhat = tl.load(dy_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32) * (1.0 + scale)
    dx = rstd * (dxhat - tl.sum(dxhat, axis=0) / D - xhat * tl.sum(dxhat * xhat, axis=0) / D)
    tl.store(dx_ptr + row * D + cols, dx, mask=mask)


@triton.jit
def _rope(x_ptr, cos_ptr, sin_ptr, out_ptr, N, HALF, sign, BLOCK: tl.constexpr):
    """out = [x1 cos - s x2 sin, x2 cos + s x1 sin] over halves x1, x2 of each row; the token of
    row r is r % N. sign = 1 rotates forward, sign = -1 backward (the transpose)."""
    row = tl.program_id(0)
    token = row % N
    cols = tl.arange(0, BLOCK)
    mask = cols < HALF
    base = x_ptr + row * 2 * HALF
    x1 = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + token * HALF + cols, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * HALF + cols, mask=mask, other=0.0).to(tl.float32) * sign
    out = out_ptr + row * 2 * HALF
    tl.store(out + cols, x1 * cos - x2 * sin, mask=mask)
    tl.store(out + HALF + cols, x2 * cos + x1 * sin, mask=mask)


@triton.jit
def _gated_residual(x_ptr, gate_ptr, y_ptr, out_ptr, N, D, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    batch = row // N
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0)
    y = tl.load(y_ptr + row * D + cols, mask=mask, other=0.0)
    gate = tl.load(gate_ptr + batch * D + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * D + cols, x + gate * y, mask=mask)


def block_for(width: int) -> int:
    return triton.next_power_of_2(width)
