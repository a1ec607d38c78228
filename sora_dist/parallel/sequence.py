"""Sequence parallelism: one sample's tokens split over the ranks of the SP group.

The plan is declarative and lives outside the model (diffusers' pattern):
- after ``x_embedder`` and ``rope``: pad the token axis to a multiple of the SP degree and keep
  this rank's contiguous slice; after ``frames``: the span of that slice, so that per-frame
  timestep modulation reaches each of this rank's tokens from its own frame;
- every self-attention ``core``: Ulysses all-to-all (sequence-sharded -> head-sharded and back)
  within ``sp_ulysses``, and ring attention across ``sp_ring``, both on the active backend's
  fused kernels, with padded keys (a suffix of the sequence) sliced off;
- after ``final_layer``: gather the tokens back and drop the padding.
Cross-attention needs nothing: its keys are the (replicated) text tokens.

Every rank of an SP group sees the same sample, timestep and noise, so every rank computes the
same full output and loss; the gather's backward keeps only this rank's slice of the gradient,
so per-rank parameter gradients are partial sums over the SP group. The data-parallel engine
averages over dp x sp ranks; the trainer multiplies the loss by the SP degree to turn that
average back into a sum over the SP group.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from sora_dist.kernels import attention
from sora_dist.parallel.ring import ring_attention


@dataclass
class SequenceShards:
    """Token bookkeeping of the current forward pass, shared by the hooks and attention cores."""

    sp_rank: int
    sp_size: int
    num_tokens: int = 0
    padded_tokens: int = 0

    @property
    def local_tokens(self) -> int:
        return self.padded_tokens // self.sp_size

    def set_length(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens
        self.padded_tokens = -(-num_tokens // self.sp_size) * self.sp_size

    def local_slice(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Pad ``x`` along ``dim`` to the padded length and keep this rank's slice."""
        pad = self.padded_tokens - x.shape[dim]
        if pad:
            widths = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, pad]
            x = F.pad(x, widths)
        return x.narrow(dim, self.sp_rank * self.local_tokens, self.local_tokens)

    def valid_length(self, first_rank: int, num_ranks: int) -> int:
        """How many of the tokens held by SP ranks first_rank .. first_rank+num_ranks-1 are real;
        padding is a suffix of the sequence, so these are the first ones."""
        start = first_rank * self.local_tokens
        return max(0, min(num_ranks * self.local_tokens, self.num_tokens - start))


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """all_to_all_single over the leading dimension (one chunk per rank)."""
    x = x.contiguous()
    out = torch.empty_like(x)  # contiguous like x: empty_like keeps a dense view's strides
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(B, H, n, D) sequence-sharded -> (B, H/U, U*n, D) head-sharded."""
    chunks = rearrange(x, "b (u h) n d -> u b h n d", u=dist.get_world_size(group))  # chunk j -> rank j
    received = _all_to_all(chunks, group)  # received[j] = rank j's tokens of my heads
    return rearrange(received, "u b h n d -> b h (u n) d")


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, H/U, U*n, D) head-sharded -> (B, H, n, D) sequence-sharded."""
    chunks = rearrange(x, "b h (u n) d -> u b h n d", u=dist.get_world_size(group))  # chunk j -> rank j
    received = _all_to_all(chunks, group)  # received[j] = my tokens of rank j's heads
    return rearrange(received, "u b h n d -> b (u h) n d")


class _UlyssesAllToAll(torch.autograd.Function):
    """Sequence-sharded -> head-sharded (``to_heads``) or back; the backward is the inverse."""

    @staticmethod
    def forward(ctx, x, group, to_heads: bool):
        ctx.group, ctx.to_heads = group, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group)

    @staticmethod
    def backward(ctx, grad):
        return (_heads_to_seq if ctx.to_heads else _seq_to_heads)(grad, ctx.group), None, None


class _GatherTokens(torch.autograd.Function):
    """All-gather the token axis (dim 1). Every rank then holds the same tensor and computes the
    same loss, so the backward keeps this rank's slice instead of summing over ranks."""

    @staticmethod
    def forward(ctx, x, group, rank):
        ctx.rank, ctx.local = rank, x.shape[1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(1, ctx.rank * ctx.local, ctx.local).contiguous(), None, None


class SequenceParallelAttention(nn.Module):
    """Drop-in for ``AttentionCore`` in self-attention: Ulysses inside, ring across."""

    def __init__(self, shards: SequenceShards, ulysses_group, ring_group):
        super().__init__()
        self.shards = shards
        self.ulysses_group, self.ring_group = ulysses_group, ring_group
        self.ulysses = dist.get_world_size(ulysses_group) if ulysses_group is not None else 1
        self.ring = dist.get_world_size(ring_group) if ring_group is not None else 1

    def forward(self, q, k, v, key_mask: Optional[torch.Tensor] = None):
        assert key_mask is None, "sequence parallelism applies to self-attention only"
        if self.ulysses > 1:
            q, k, v = (_UlyssesAllToAll.apply(t, self.ulysses_group, True) for t in (q, k, v))
        # After the all-to-all this rank holds the tokens of the U consecutive SP ranks of its
        # Ulysses group; SP rank = ring_rank * U + ulysses_rank. Padded keys are cut off the end.
        if self.ring > 1:
            lengths = [self.shards.valid_length(r * self.ulysses, self.ulysses) for r in range(self.ring)]
            out = ring_attention(q, k, v, lengths, self.ring_group)
        else:
            valid = self.shards.valid_length(0, self.ulysses)
            out = attention(q, k[:, :, :valid], v[:, :, :valid])
        if self.ulysses > 1:
            out = _UlyssesAllToAll.apply(out, self.ulysses_group, False)
        return out


def apply_sequence_parallel(model: nn.Module, sp_rank: int, sp_group, ulysses_group, ring_group) -> SequenceShards:
    """Install the split/gather hooks and swap every self-attention core of ``model``."""
    shards = SequenceShards(sp_rank=sp_rank, sp_size=dist.get_world_size(sp_group))

    def split_tokens(module, args, tokens):  # (B, N, D) -> (B, N_local, D)
        shards.set_length(tokens.shape[1])
        return shards.local_slice(tokens, dim=1)

    def split_rope(module, args, angles):  # (N, Dh/2) each -> (N_local, Dh/2)
        return tuple(shards.local_slice(a, dim=0) for a in angles)

    def split_frames(module, args, span):  # the whole sequence's FrameSpan -> this rank's tokens
        return replace(span, first=shards.sp_rank * shards.local_tokens, count=shards.local_tokens)

    def gather_tokens(module, args, out):  # (B, N_local, P*C) -> (B, N, P*C)
        return _GatherTokens.apply(out, sp_group, sp_rank)[:, : shards.num_tokens]

    model.x_embedder.register_forward_hook(split_tokens)
    model.rope.register_forward_hook(split_rope)
    model.frames.register_forward_hook(split_frames)
    model.final_layer.register_forward_hook(gather_tokens)
    for block in model.blocks:
        block.attn.core = SequenceParallelAttention(shards, ulysses_group, ring_group)
    return shards
