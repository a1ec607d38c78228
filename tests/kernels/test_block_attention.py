"""The per-block attention kernels that ring attention is built from, against the plain-PyTorch
reference: each block's output and log-sum-exp, and each block's share of the gradient when its
backward is given the merged output and log-sum-exp of the whole key sequence. The NPU pair runs
through the stand-in torch_npu; the CUDA pair is checked for its argument contract on meta tensors
(PyTorch's own shape functions for those ops), since this machine has no GPU."""

import sys

import pytest
import torch

from sora_dist.kernels.attention import reference_attention
from sora_dist.kernels.block_attention import BLOCK_KERNELS, aten_flash_block_backward, aten_flash_block_forward
from stand_ins import fake_torch_npu

CPU_BLOCK_BACKENDS = ["reference", "sdpa", "npu"]
BLOCK_SIZES = [[5, 11, 1], [16, 16], [7]]  # odd and single-key blocks


@pytest.fixture
def npu_stand_in(monkeypatch):
    module = fake_torch_npu()
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    return module


def random_qkv(blocks, dtype, seed, batch=2, heads=3, queries=9, head_dim=16):
    g = torch.Generator().manual_seed(seed)
    keys = sum(blocks)
    q = torch.randn(batch, heads, queries, head_dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(batch, heads, keys, head_dim, generator=g, dtype=torch.float64) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("backend", CPU_BLOCK_BACKENDS)
@pytest.mark.parametrize("blocks", BLOCK_SIZES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_blocks_reassemble_full_attention_and_its_gradient(npu_stand_in, backend, blocks, dtype):
    forward, backward = BLOCK_KERNELS[backend]
    q, k, v = random_qkv(blocks, dtype, seed=len(blocks))
    scale = q.shape[-1] ** -0.5
    # torch_npu keeps its softmax statistics in float32 whatever the input dtype.
    exact = dtype == torch.float64 and backend != "npu"
    tol = dict(atol=1e-9, rtol=1e-9) if exact else dict(atol=2e-5, rtol=2e-5)

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*leaves)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    scores = torch.einsum("bhnd,bhmd->bhnm", *leaves[:2]).detach() * scale

    merged_lse, starts = torch.logsumexp(scores, dim=-1), [0]
    for size in blocks:
        starts.append(starts[-1] + size)
    for start, stop in zip(starts, starts[1:]):
        out, lse = forward(q, k[:, :, start:stop], v[:, :, start:stop], scale)
        assert out.dtype == dtype and lse.shape == q.shape[:3]
        block = reference_attention(*(t.detach() for t in (leaves[0], leaves[1][:, :, start:stop], leaves[2][:, :, start:stop])))
        torch.testing.assert_close(out.double(), block, **tol)
        torch.testing.assert_close(lse.double(), torch.logsumexp(scores[..., start:stop], dim=-1), **tol)

    grad_q = torch.zeros_like(q, dtype=torch.float64)
    merged_out = expected.detach().to(dtype)
    for start, stop in zip(starts, starts[1:]):
        dq, dk, dv = backward(grad_out.to(dtype), q, k[:, :, start:stop], v[:, :, start:stop], merged_out, merged_lse.to(torch.promote_types(dtype, torch.float32)), scale)
        assert dq.dtype == dk.dtype == dv.dtype == dtype
        grad_q += dq.double()
        torch.testing.assert_close(dk.double(), expected_grads[1][:, :, start:stop], **tol)
        torch.testing.assert_close(dv.double(), expected_grads[2][:, :, start:stop], **tol)
    torch.testing.assert_close(grad_q, expected_grads[0], **tol)


def test_npu_blocks_call_the_fused_ops_in_bnsd(npu_stand_in):
    forward, backward = BLOCK_KERNELS["npu"]
    q, k, v = random_qkv([4], torch.float32, seed=0)
    out, lse = forward(q, k, v, 0.25)
    backward(torch.randn_like(out), q, k, v, out, lse, 0.25)
    assert npu_stand_in.calls == ["BNSD", "grad:BNSD"]


def test_sdpa_blocks_in_bf16_stay_close_to_the_reference():
    forward, backward = BLOCK_KERNELS["sdpa"]
    q, k, v = random_qkv([12], torch.bfloat16, seed=3)
    out, lse = forward(q, k, v, 0.25)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref_out, ref_lse = BLOCK_KERNELS["reference"][0](q.double(), k.double(), v.double(), 0.25)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-2, rtol=2e-2)
    grads = backward(torch.ones_like(out), q, k, v, out, lse, 0.25)
    ref_grads = BLOCK_KERNELS["reference"][1](torch.ones_like(ref_out), q.double(), k.double(), v.double(), ref_out, ref_lse, 0.25)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, atol=5e-2, rtol=5e-2)


def test_cuda_flash_blocks_match_the_aten_op_contract():
    """On a non-CPU tensor the pair calls aten's CUDA flash ops; meta tensors run PyTorch's shape
    functions for them, so a wrong argument order, count or type fails here."""
    q = torch.empty(2, 4, 40, 64, device="meta", dtype=torch.bfloat16)
    k, v = (torch.empty(2, 4, 24, 64, device="meta", dtype=torch.bfloat16) for _ in range(2))
    out, lse = aten_flash_block_forward(q, k, v, 0.125)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert lse.shape == (2, 4, 40) and lse.dtype == torch.float32
    dq, dk, dv = aten_flash_block_backward(torch.empty_like(out), q, k, v, out, lse, 0.125)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert dq.dtype == dk.dtype == dv.dtype == torch.bfloat16


def test_every_attention_backend_has_block_kernels():
    from sora_dist.kernels import BACKENDS

    assert set(BLOCK_KERNELS) == set(BACKENDS)
