"""Every attention backend against the plain-PyTorch reference, forward and backward, including
the CUDA and Ascend ones through stand-in modules that enforce the documented argument contracts
of flash-attn and torch_npu (layouts, mask polarity, explicit scale, cumulative lengths) and
compute with the reference."""

import sys

import pytest
import torch

from sora_dist.kernels import BACKENDS, attention, attention_varlen, select_attention_backend, set_attention_backend
from sora_dist.kernels.attention import reference_attention
from stand_ins import fake_flash_attn, fake_torch_npu


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", fake_torch_npu())
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn(returns_lse=False))
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fake_flash_attn(returns_lse=True))
    yield sys.modules["torch_npu"]
    set_attention_backend("sdpa")


CPU_RUNNABLE = ["sdpa", "reference", "flash2", "flash3", "npu"]  # cudnn needs a GPU
FLASH = ("flash2", "flash3")


def dtype_and_tolerance(backend):
    """flash-attn computes in fp16/bf16 only; the other backends are checked in fp64."""
    return (torch.bfloat16, dict(atol=2e-2, rtol=2e-2)) if backend in FLASH else (torch.float64, {})


@pytest.mark.parametrize("backend", CPU_RUNNABLE)
@pytest.mark.parametrize("shape", [(2, 3, 10, 7, 16), (1, 4, 33, 5, 64), (3, 2, 17, 17, 30)], ids=["cross", "odd", "self"])
@pytest.mark.parametrize("masked", [False, True])
def test_backend_matches_reference_forward_and_backward(stand_ins, backend, shape, masked):
    b, h, n, m, d = shape
    dtype, tol = dtype_and_tolerance(backend)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(b, h, size, d, generator=g, dtype=torch.float64).to(dtype) for size in (n, m, m)]
    exact = [t.double().requires_grad_() for t in inputs]  # the same (rounded) values in fp64
    q, k, v = (t.clone().requires_grad_() for t in inputs)
    key_mask = None
    if masked:
        key_mask = torch.ones(b, m, dtype=torch.bool)
        key_mask[0, m // 2 :] = False  # text padding
    expected = reference_attention(*exact, key_mask)
    grad_out = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, exact, grad_out)
    set_attention_backend(backend)
    out = attention(q, k, v, key_mask)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, **tol)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad_out.to(dtype)), expected_grads):
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("backend", FLASH)
def test_flash_backends_take_fp32_through_sdpa(stand_ins, backend):
    """flash-attn has no fp32 kernels (its stand-in refuses fp32): an fp32 call, as when sampling
    outside autocast, must not reach it."""
    q, k, v = (torch.randn(2, 2, 6, 16) for _ in range(3))
    key_mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    set_attention_backend(backend)
    torch.testing.assert_close(attention(q, k, v, key_mask), reference_attention(q, k, v, key_mask))
    cu = torch.tensor([0, 6], dtype=torch.int32)
    flat = [t[0].transpose(0, 1).contiguous() for t in (q, k, v)]
    torch.testing.assert_close(attention_varlen(*flat, cu, cu, 6, 6), reference_attention(q[:1], k[:1], v[:1])[0].transpose(0, 1))


def test_npu_backend_uses_the_transpose_free_layout(stand_ins):
    set_attention_backend("npu")
    attention(*(torch.randn(1, 2, 4, 8) for _ in range(3)))
    assert stand_ins.calls == ["BNSD"]


@pytest.mark.parametrize("backend", ["sdpa", "flash2", "flash3", "npu"])
def test_varlen_attends_within_segments_only(stand_ins, backend):
    lengths = [5, 1, 9]
    dtype, tol = dtype_and_tolerance(backend)
    g = torch.Generator().manual_seed(1)
    segments = [[torch.randn(n, 3, 16, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)] for n in lengths]
    q, k, v = (torch.cat([s[i] for s in segments]) for i in range(3))
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    set_attention_backend(backend)
    out = attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths))
    expected = torch.cat([reference_attention(*(t.transpose(0, 1)[None].double() for t in seg))[0].transpose(0, 1) for seg in segments])
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, **tol)


def test_backend_choice_per_device(monkeypatch):
    found = {"flash_attn_interface": object(), "flash_attn": object()}
    monkeypatch.setattr("importlib.util.find_spec", lambda name: found.get(name))
    assert select_attention_backend("cuda", (9, 0)) == "flash3"  # Hopper with FA3 installed
    assert select_attention_backend("cuda", (8, 0)) == "flash2"  # FA3 is Hopper-only
    del found["flash_attn"]
    assert select_attention_backend("cuda", (8, 0)) == "cudnn"
    assert select_attention_backend("npu") == "npu" and select_attention_backend("cpu") == "sdpa"
    assert set(CPU_RUNNABLE) | {"cudnn"} == set(BACKENDS)


def test_every_attention_of_the_model_goes_through_the_dispatch(stand_ins):
    from sora_dist.models import DiTConfig, VideoDiT

    model = VideoDiT(DiTConfig(in_channels=4, text_dim=8, hidden_size=32, depth=3, num_heads=2))
    with torch.no_grad():  # away from the zero-output init, so the comparison below means something
        for p in model.parameters():
            p.normal_(0, 0.1)
    x, t = torch.randn(2, 4, 2, 4, 4), torch.rand(2) * 1000
    text, mask = torch.randn(2, 3, 8), torch.tensor([[True, True, False], [True, True, True]])
    expected = model(x, t, text, mask)
    set_attention_backend("npu")
    out = model(x, t, text, mask)
    assert stand_ins.calls == ["BNSD"] * (2 * 3)  # self- and cross-attention of each of 3 blocks
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
