"""Ring attention: each rank keeps its query block and the key/value blocks travel around the
ring; partial results merge with an online softmax (log-sum-exp). The backward pass sends the
key/value blocks around again, with their gradient accumulators travelling alongside, so no
rank ever holds the whole sequence's keys (Liu et al. 2023; FlashAttention-2's backward).

Tensors are (B, H, n, D) per rank. Each block is computed by the active attention backend's
fused block kernels (``sora_dist.kernels.block_kernels``); merging and the gradient accumulators
are float32. Sequence padding sits at the end of the sequence, so each rank's block holds its
real keys first: ``valid_lengths[r]`` is how many keys of ring rank r's block are real, and
blocks are sliced to that prefix instead of masked.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sora_dist.kernels import block_kernels


def _start_pass(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> tuple:
    """Start sending each tensor to the next rank of the ring and receiving the previous rank's;
    returns what ``_finish_pass`` waits for: the receive buffers, the requests and the tensors in
    flight (kept alive, and unchanged by the caller, until then)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    send_to = dist.get_global_rank(group, (rank + 1) % size)
    recv_from = dist.get_global_rank(group, (rank - 1) % size)
    tensors = [t.contiguous() for t in tensors]
    received = [torch.empty_like(t) for t in tensors]
    ops = []
    for t, r in zip(tensors, received):
        ops.append(dist.P2POp(dist.isend, t, send_to, group))
        ops.append(dist.P2POp(dist.irecv, r, recv_from, group))
    return received, dist.batch_isend_irecv(ops), tensors


def _finish_pass(pending: tuple) -> list[torch.Tensor]:
    """Wait for a pass begun by ``_start_pass``; the received tensors (on a device, the current
    stream waits for them and the host runs on)."""
    received, requests, _ = pending
    for request in requests:
        request.wait()
    return received


def _merge(out, lse, block_out, block_lse):
    """Combine two softmax-normalized partial results by their log-sum-exps."""
    if out is None:
        return block_out.to(block_lse.dtype), block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    keep, take = torch.exp(lse - new_lse)[..., None], torch.exp(block_lse - new_lse)[..., None]
    return out * keep + block_out.to(out.dtype) * take, new_lse


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, valid_lengths, group):
        block_forward, _ = block_kernels()
        scale = q.shape[-1] ** -0.5
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        out = lse = None
        block_k, block_v = k, v
        for step in range(size):
            # The next blocks travel while this one is computed.
            pending = _start_pass([block_k, block_v], group) if step + 1 < size else None
            length = valid_lengths[(rank - step) % size]  # this block came from ring rank rank - step
            if length:
                block_out, block_lse = block_forward(q, block_k[:, :, :length], block_v[:, :, :length], scale)
                out, lse = _merge(out, lse, block_out, block_lse)
            if pending is not None:
                block_k, block_v = _finish_pass(pending)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.valid_lengths = group, scale, valid_lengths
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        _, block_backward = block_kernels()
        group, scale = ctx.group, ctx.scale
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        accumulate = torch.promote_types(q.dtype, torch.float32)
        grad_out = grad_out.contiguous()
        grad_q = torch.zeros_like(q, dtype=accumulate)
        block_k, block_v = k, v
        grad_k, grad_v = torch.zeros_like(k, dtype=accumulate), torch.zeros_like(v, dtype=accumulate)
        # The block and its gradient accumulator move on together, each pass behind the next
        # compute: the block's while its gradients are computed, the accumulator's while the next
        # block's are. After `size` passes the accumulators are back on the rank owning the block.
        grads_pending = None
        for step in range(size):
            blocks_pending = _start_pass([block_k, block_v], group) if step + 1 < size else None
            length = ctx.valid_lengths[(rank - step) % size]
            if length:
                dq, dk, dv = block_backward(grad_out, q, block_k[:, :, :length], block_v[:, :, :length], out, lse, scale)
                grad_q += dq
            if grads_pending is not None:
                grad_k, grad_v = _finish_pass(grads_pending)
            if length:
                grad_k[:, :, :length] += dk
                grad_v[:, :, :length] += dv
            grads_pending = _start_pass([grad_k, grad_v], group)
            if blocks_pending is not None:
                block_k, block_v = _finish_pass(blocks_pending)
        grad_k, grad_v = _finish_pass(grads_pending)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None


def ring_attention(q, k, v, valid_lengths: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Attention of the local queries over the keys of every rank in ``group``; ring rank r's
    block has ``valid_lengths[r]`` real keys followed by padding."""
    return _RingAttention.apply(q, k, v, valid_lengths, group)
