"""Ring attention: each rank keeps its query block and the key/value blocks travel around the
ring; partial results merge with an online softmax (log-sum-exp). The backward pass sends the
key/value blocks around again, with their gradient accumulators travelling alongside, so no
rank ever holds the whole sequence's keys (Liu et al. 2023; FlashAttention-2's backward).

Tensors are (B, H, n, D) per rank; ``key_valid`` (B, n) marks real keys (padding is False).
Full-precision math; fused per-device block kernels plug in later through the same function.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _ring_pass(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> list[torch.Tensor]:
    """Send each tensor to the next rank of the ring, receive the previous rank's."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    send_to = dist.get_global_rank(group, (rank + 1) % size)
    recv_from = dist.get_global_rank(group, (rank - 1) % size)
    tensors = [t.contiguous() for t in tensors]
    received = [torch.empty_like(t) for t in tensors]
    ops = []
    for t, r in zip(tensors, received):
        ops.append(dist.P2POp(dist.isend, t, send_to, group))
        ops.append(dist.P2POp(dist.irecv, r, recv_from, group))
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def _block_scores(q, k, key_valid, scale):
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    return scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))


def _block_forward(q, k, v, key_valid, scale):
    """Attention of q over one key block: (output normalized within the block, its log-sum-exp)."""
    scores = _block_scores(q, k, key_valid, scale)
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, n); -inf where the block has no valid key
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhnm,bhmd->bhnd", probs, v), lse


def _merge(out, lse, block_out, block_lse):
    """Combine two softmax-normalized partial results by their log-sum-exps."""
    new_lse = torch.logaddexp(lse, block_lse)
    keep = torch.exp(lse - new_lse).nan_to_num(0.0)[..., None]
    take = torch.exp(block_lse - new_lse).nan_to_num(0.0)[..., None]
    return out * keep + block_out * take, new_lse


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_valid, group):
        scale = q.shape[-1] ** -0.5
        size = dist.get_world_size(group)
        q32, k32, v32 = q.float(), k.float(), v.float()
        out = torch.zeros_like(q32)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        block_k, block_v, block_valid = k32, v32, key_valid
        for step in range(size):
            if step + 1 < size:  # start passing the blocks on before computing with them
                next_blocks = _ring_pass([block_k, block_v, block_valid.to(torch.uint8)], group)
            block_out, block_lse = _block_forward(q32, block_k, block_v, block_valid, scale)
            out, lse = _merge(out, lse, block_out, block_lse)
            if step + 1 < size:
                block_k, block_v, block_valid = next_blocks[0], next_blocks[1], next_blocks[2].bool()
        ctx.save_for_backward(q32, k32, v32, key_valid, out, lse)
        ctx.group, ctx.scale, ctx.dtype = group, scale, q.dtype
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, key_valid, out, lse = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        size = dist.get_world_size(group)
        grad_out = grad_out.float()
        delta = (grad_out * out).sum(dim=-1, keepdim=True)  # (B, H, n, 1)
        grad_q = torch.zeros_like(q)
        block_k, block_v, block_valid = k, v, key_valid
        grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
        for step in range(size):
            probs = torch.exp(_block_scores(q, block_k, block_valid, scale) - lse[..., None]).nan_to_num(0.0)
            grad_v = grad_v + torch.einsum("bhnm,bhnd->bhmd", probs, grad_out)
            grad_scores = probs * (torch.einsum("bhnd,bhmd->bhnm", grad_out, block_v) - delta)
            grad_q = grad_q + torch.einsum("bhnm,bhmd->bhnd", grad_scores, block_k) * scale
            grad_k = grad_k + torch.einsum("bhnm,bhnd->bhmd", grad_scores, q) * scale
            # The block and its gradient accumulators move on together; after `size` passes the
            # accumulators are back on the rank that owns the block.
            if step + 1 < size:
                block_k, block_v, block_valid, grad_k, grad_v = _ring_pass(
                    [block_k, block_v, block_valid.to(torch.uint8), grad_k, grad_v], group
                )
                block_valid = block_valid.bool()
            else:
                grad_k, grad_v = _ring_pass([grad_k, grad_v], group)
        dtype = ctx.dtype
        return grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype), None, None


def ring_attention(q, k, v, key_valid: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Attention of the local queries over the keys of every rank in ``group``."""
    return _RingAttention.apply(q, k, v, key_valid, group)
