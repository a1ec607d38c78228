"""Attention over one key block with its log-sum-exp, and the matching backward: the pieces ring
attention is built from, one pair per attention backend.

Ring attention computes, for its local queries, attention over each rank's key block in turn and
merges the partial outputs by their log-sum-exps. Its backward runs each block's fused backward
kernel with the *merged* output and log-sum-exp, which gives exactly that block's share of the
gradient (FlashAttention-2's backward, applied per block). So every backend supplies:

- ``forward(q, k, v, scale) -> (out, lse)``: out (B, H, n, D) in q's dtype, softmax-normalized
  within the block; lse (B, H, n) in float32 (float64 for float64 inputs), the natural log-sum-exp of the scaled scores.
- ``backward(grad_out, q, k, v, out, lse, scale) -> (dq, dk, dv)`` in q's dtype, for the merged
  ``out`` and ``lse``.

Blocks carry no mask: the caller slices padded keys off the end of a block (sequence padding is
always a suffix), and never calls with an empty block.

Backends:
- ``reference``: float32 einsum, the ground truth of the tests.
- ``sdpa`` / ``cudnn`` / ``flash2`` / ``flash3``: PyTorch's fused flash kernels, the aten ops that
  ``scaled_dot_product_attention`` dispatches to (the CPU flash kernel on CPU, the bundled
  FlashAttention-2 on CUDA). The flash-attn packages expose their LSE-taking backward only
  through private functions that change between releases, so ring blocks use the aten ops.
- ``npu``: ``torch_npu.npu_fusion_attention`` and ``npu_fusion_attention_grad`` in BNSD. Their
  softmax statistics are a running max and sum, each (B, N, S, 8) float32; the backward is given
  the merged LSE as the max and ones as the sum, which describes the same softmax.
"""

from __future__ import annotations

from typing import Callable

import torch

BlockForward = Callable[..., tuple[torch.Tensor, torch.Tensor]]
BlockBackward = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def reference_block_forward(q, k, v, scale):
    compute = _compute_dtype(q)
    scores = torch.einsum("bhnd,bhmd->bhnm", q.to(compute), k.to(compute)) * scale
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, n)
    out = torch.einsum("bhnm,bhmd->bhnd", torch.exp(scores - lse[..., None]), v.to(compute))
    return out.to(q.dtype), lse


def reference_block_backward(grad_out, q, k, v, out, lse, scale):
    compute = _compute_dtype(q)
    q32, k32, v32, grad_out = q.to(compute), k.to(compute), v.to(compute), grad_out.to(compute)
    probs = torch.exp(torch.einsum("bhnd,bhmd->bhnm", q32, k32) * scale - lse[..., None])  # (B, H, n, m)
    delta = (grad_out * out.to(compute)).sum(dim=-1, keepdim=True)  # (B, H, n, 1)
    grad_scores = probs * (torch.einsum("bhnd,bhmd->bhnm", grad_out, v32) - delta)
    grad_q = torch.einsum("bhnm,bhmd->bhnd", grad_scores, k32) * scale
    grad_k = torch.einsum("bhnm,bhnd->bhmd", grad_scores, q32) * scale
    grad_v = torch.einsum("bhnm,bhnd->bhmd", probs, grad_out)
    return grad_q.to(q.dtype), grad_k.to(q.dtype), grad_v.to(q.dtype)


def aten_flash_block_forward(q, k, v, scale):
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    return out, lse


def aten_flash_block_backward(grad_out, q, k, v, out, lse, scale):
    grad_out, out = grad_out.contiguous(), out.contiguous()
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse.to(_compute_dtype(q)), 0.0, False, scale=scale
        )
    # Dense, dropout-free call: no cumulative lengths, and the RNG state is never read.
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
    unused = torch.zeros((), dtype=torch.uint64, device=q.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad_out, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, False, rng_state, unused, scale=scale
    )


def npu_block_forward(q, k, v, scale):
    from sora_dist.device import npu_ops

    out, softmax_max, softmax_sum = npu_ops().npu_fusion_attention(
        q, k, v, q.shape[1], "BNSD", scale=scale, keep_prob=1.0
    )[:3]
    return out, softmax_max[..., 0] + torch.log(softmax_sum[..., 0])  # (B, N, S)


def npu_block_backward(grad_out, q, k, v, out, lse, scale):
    from sora_dist.device import npu_ops

    softmax_max = lse.float()[..., None].expand(*lse.shape, 8).contiguous()  # (B, N, S, 8) float32
    return tuple(npu_ops().npu_fusion_attention_grad(
        q, k, v, grad_out, q.shape[1], "BNSD",
        softmax_max=softmax_max, softmax_sum=torch.ones_like(softmax_max), attention_in=out,
        scale_value=scale, keep_prob=1.0,
    )[:3])


BLOCK_KERNELS: dict[str, tuple[BlockForward, BlockBackward]] = {
    "reference": (reference_block_forward, reference_block_backward),
    "sdpa": (aten_flash_block_forward, aten_flash_block_backward),
    "cudnn": (aten_flash_block_forward, aten_flash_block_backward),
    "flash2": (aten_flash_block_forward, aten_flash_block_backward),
    "flash3": (aten_flash_block_forward, aten_flash_block_backward),
    "npu": (npu_block_forward, npu_block_backward),
}
