"""Run by torchrun from test_ring.py: ring attention over the whole world on every CPU-runnable
block backend (reference, the CPU flash kernel, the NPU pair through the stand-in torch_npu),
for token counts that divide, leave a short last block, and leave whole blocks of padding.
Every rank compares its output and its slice of dq/dk/dv with single-process attention over the
full sequence; rank 0 writes {case: max abs error} to the JSON path given as the argument."""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from stand_ins import fake_torch_npu  # noqa: E402

from sora_dist.build import stop_distributed  # noqa: E402
from sora_dist.kernels import set_attention_backend  # noqa: E402
from sora_dist.kernels.attention import reference_attention  # noqa: E402
from sora_dist.parallel.ring import ring_attention  # noqa: E402
from sora_dist.parallel.sequence import SequenceShards  # noqa: E402
from sora_dist.console import exit_process

BACKENDS = ["reference", "sdpa", "npu"]
TOKENS = [24, 21, 5]  # divides 2 and 4; short last block; on 4 ranks a block of padding only


def largest(diff: torch.Tensor) -> torch.Tensor:
    return diff.abs().max() if diff.numel() else torch.zeros((), dtype=torch.float64)


def check(backend: str, num_tokens: int, dtype: torch.dtype) -> float:
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(num_tokens)
    q, k, v = (torch.randn(2, 3, num_tokens, 16, generator=g, dtype=torch.float64) for _ in range(3))
    grad_out = torch.randn(q.shape, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*leaves)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)

    shards = SequenceShards(sp_rank=rank, sp_size=world)
    shards.set_length(num_tokens)
    local = [shards.local_slice(t, dim=2).to(dtype).requires_grad_() for t in (q, k, v)]
    lengths = [shards.valid_length(r, 1) for r in range(world)]
    out = ring_attention(*local, lengths, dist.group.WORLD)
    grads = torch.autograd.grad(out, local, shards.local_slice(grad_out, dim=2).to(dtype))

    real = shards.valid_length(rank, 1)  # this rank's real tokens come first; the rest is padding
    out = out.detach()
    errors = [largest(out[:, :, :real].double() - shards.local_slice(expected.detach(), dim=2)[:, :, :real])]
    for got, want in zip(grads, expected_grads):
        errors.append(largest(got[:, :, :real].double() - shards.local_slice(want, dim=2)[:, :, :real]))
        errors.append(largest(got[:, :, real:].double()))  # padding gets no gradient
    worst = torch.stack(errors).max()
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def main():
    dist.init_process_group("gloo")
    sys.modules["torch_npu"] = fake_torch_npu()
    results = {}
    for backend in BACKENDS:
        set_attention_backend(backend)
        for num_tokens in TOKENS:
            results[f"{backend}-{num_tokens}-float64"] = check(backend, num_tokens, torch.float64)
            results[f"{backend}-{num_tokens}-float32"] = check(backend, num_tokens, torch.float32)
    set_attention_backend("sdpa")
    results["sdpa-21-bfloat16"] = check("sdpa", 21, torch.bfloat16)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    stop_distributed()


if __name__ == "__main__":
    exit_process(main())
