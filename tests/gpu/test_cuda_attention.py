"""The attention dispatch on every CUDA backend this machine has (FlashAttention-3 and -2 when
installed, cuDNN SDPA, SDPA's flash kernel) against the fp32 reference, forward and backward, with
and without text padding masks; the block-attention kernels ring attention is built from; the
packed variable-length entry."""

import importlib.util

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import TOLERANCE, relative_error
from sora_dist.kernels import attention, attention_varlen, set_attention_backend
from sora_dist.kernels.attention import reference_attention
from sora_dist.kernels.block_attention import BLOCK_KERNELS

INSTALLED = {"flash2": "flash_attn", "flash3": "flash_attn_interface"}
CUDA_BACKENDS = ["cudnn", "sdpa", *INSTALLED]


def available(backend: str) -> bool:
    module = INSTALLED.get(backend)
    return module is None or importlib.util.find_spec(module) is not None


def qkv(b, h, n, m, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, h, size, d, generator=g, device="cuda").to(dtype) for size in (n, m, m)]


def compare(fn, inputs, key_mask, dtype):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves, key_mask)
    exact = [t.detach().float().requires_grad_() for t in inputs]
    expected = reference_attention(*exact, key_mask)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, leaves, grad.to(dtype))
    want = torch.autograd.grad(expected, exact, grad)
    assert out.dtype == dtype and relative_error(out, expected) < TOLERANCE[dtype]
    for g, w in zip(got, want):
        assert relative_error(g, w) < TOLERANCE[dtype]


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 16, 4096, 4096, 72), (2, 12, 1024, 301, 128), (1, 4, 333, 333, 64)], ids=["xl-self", "1b-cross", "odd"])
@pytest.mark.parametrize("masked", [False, True], ids=["full", "text-mask"])
def test_backend_against_reference(backend, dtype, shape, masked):
    if not available(backend):
        pytest.skip(f"{INSTALLED[backend]} is not installed on this machine")
    b, h, n, m, d = shape
    key_mask = None
    if masked:
        key_mask = torch.ones(b, m, dtype=torch.bool, device="cuda")
        key_mask[0, m // 3 :] = False
    set_attention_backend(backend)
    compare(attention, qkv(b, h, n, m, d, dtype, seed=n + m), key_mask, dtype)


def test_sdpa_flash_kernel_alone():
    """SDPA restricted to its flash kernel (no math fallback), the kernel the ring blocks use."""
    inputs = qkv(2, 8, 2048, 2048, 128, torch.bfloat16, seed=1)

    def flash_only(q, k, v, key_mask):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    compare(flash_only, inputs, None, torch.bfloat16)


@pytest.mark.parametrize("blocks", [[2048, 2048], [1000, 17, 3031]], ids=str)
def test_block_kernels_reassemble_attention_and_its_gradient(blocks):
    """Ring attention's pieces on CUDA: each key block's output and LSE, and each block's share of
    dq/dk/dv from the merged output and LSE, sum to full attention and its gradient."""
    forward, backward = BLOCK_KERNELS["cudnn"]
    q, k, v = qkv(1, 8, 1536, sum(blocks), 128, torch.bfloat16, seed=2)
    scale = q.shape[-1] ** -0.5
    exact = [t.float().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*exact)
    grad_out = torch.randn_like(expected)
    want = torch.autograd.grad(expected, exact, grad_out)
    scores = torch.einsum("bhnd,bhmd->bhnm", exact[0].detach(), exact[1].detach()) * scale
    merged_lse = torch.logsumexp(scores, dim=-1)
    starts = [0]
    for size in blocks:
        starts.append(starts[-1] + size)
    grad_q = torch.zeros_like(q, dtype=torch.float32)
    grad_k, grad_v = [], []
    for start, stop in zip(starts, starts[1:]):
        out, lse = forward(q, k[:, :, start:stop], v[:, :, start:stop], scale)
        assert relative_error(lse, torch.logsumexp(scores[..., start:stop], dim=-1)) < 1e-3
        dq, dk, dv = backward(grad_out.bfloat16(), q, k[:, :, start:stop], v[:, :, start:stop], expected.detach().bfloat16(), merged_lse, scale)
        grad_q += dq.float()
        grad_k.append(dk), grad_v.append(dv)
    for got, ref in zip((grad_q, torch.cat(grad_k, dim=2), torch.cat(grad_v, dim=2)), want):
        assert relative_error(got, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_varlen_attends_within_segments(backend):
    if not available(backend):
        pytest.skip(f"{INSTALLED[backend]} is not installed on this machine")
    lengths = [1000, 1, 777, 2048]
    g = torch.Generator(device="cuda").manual_seed(3)
    segments = [[torch.randn(n, 8, 64, generator=g, device="cuda").bfloat16() for _ in range(3)] for n in lengths]
    q, k, v = (torch.cat([s[i] for s in segments]) for i in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    set_attention_backend(backend)
    out = attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths))
    expected = torch.cat([reference_attention(*(t.float().transpose(0, 1)[None] for t in seg))[0].transpose(0, 1) for seg in segments])
    assert relative_error(out, expected) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("backend", ["flash2", "flash3"])
def test_flash_backends_take_fp32_through_sdpa(backend):
    if not available(backend):
        pytest.skip(f"{INSTALLED[backend]} is not installed on this machine")
    q, k, v = qkv(1, 4, 256, 256, 64, torch.float32, seed=4)
    set_attention_backend(backend)
    assert relative_error(attention(q, k, v), reference_attention(q, k, v)) < TOLERANCE[torch.float32]
