"""Every Triton kernel, compiled for this GPU, against its plain-PyTorch reference: forward and
backward, fp32 and bf16, at powers of two, odd widths and a DiT-XL-sized row. The kernels' output
buffers are poisoned with NaN first, so an element a kernel fails to write fails the test."""

import pytest
import torch

from conftest import TOLERANCE, relative_error
from sora_dist.kernels import fused

@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """The autograd wrappers allocate every kernel output with torch.empty_like: fill those with NaN."""
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, *args, **kwargs: real(t, *args, **kwargs).fill_(float("nan")))


SHAPES = [(2, 7, 64), (1, 33, 48), (3, 5, 30), (2, 1024, 1152)]
DTYPES = [torch.float32, torch.bfloat16]


def check(fn, reference, inputs, dtype):
    """Outputs and every input gradient of the Triton path against the reference evaluated in fp32
    on the same (rounded) inputs; output poisoned beforehand would show as NaN."""
    fused.set_fused_backend("triton")
    leaves = [t.to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    assert out.dtype == dtype and torch.isfinite(out).all()
    exact = [t.detach().float().requires_grad_() for t in leaves]
    expected = reference(*exact)
    grad = torch.randn_like(expected)
    got_grads = torch.autograd.grad(out, leaves, grad.to(dtype))
    want_grads = torch.autograd.grad(expected, exact, grad)
    assert relative_error(out, expected) < TOLERANCE[dtype]
    for got, want in zip(got_grads, want_grads):
        assert got.dtype == dtype and relative_error(got, want) < TOLERANCE[dtype]


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator(device="cuda").manual_seed(seed), device="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_modulated_layer_norm(shape, dtype):
    b, n, d = shape
    check(fused.modulated_layer_norm, fused.reference_modulated_layer_norm, [3 * rand(b, n, d, seed=1) + 1, rand(b, d, seed=2), rand(b, d, seed=3)], dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_modulated_layer_norm_of_bf16_with_fp32_modulation(shape):
    """Wan's setting: bf16 activations, fp32 modulation tables. Output and x's gradient in bf16,
    the modulation's gradients in fp32, against the fp32 reference."""
    fused.set_fused_backend("triton")
    b, n, d = shape
    leaves = [(3 * rand(b, n, d, seed=1) + 1).bfloat16().requires_grad_(), rand(b, d, seed=2).requires_grad_(), rand(b, d, seed=3).requires_grad_()]
    out = fused.modulated_layer_norm(*leaves)
    exact = [t.detach().float().requires_grad_() for t in leaves]
    expected = fused.reference_modulated_layer_norm(*exact)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, leaves, grad.bfloat16())
    want = torch.autograd.grad(expected, exact, grad)
    assert out.dtype == torch.bfloat16 and relative_error(out, expected) < TOLERANCE[torch.bfloat16]
    assert [g.dtype for g in got] == [torch.bfloat16, torch.float32, torch.float32]
    for g, w in zip(got, want):
        assert relative_error(g, w) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm(shape, dtype):
    b, n, d = shape
    check(fused.rms_norm, fused.reference_rms_norm, [rand(b, 2, n, d, seed=4), 1 + 0.1 * rand(d, seed=5)], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 7, 64), (1, 2, 33, 30), (2, 1, 5, 6), (1, 16, 4096, 72)], ids=str)
def test_rope(shape, dtype):
    b, h, n, d = shape
    angles = rand(n, d // 2, seed=6) * 3
    cos, sin = angles.cos(), angles.sin()
    check(lambda x: fused.rope(x, cos, sin), lambda x: fused.reference_rope(x, cos, sin), [rand(b, h, n, d, seed=7)], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_residual(shape, dtype):
    b, n, d = shape
    check(fused.gated_residual, fused.reference_gated_residual, [rand(b, n, d, seed=8), rand(b, d, seed=9), rand(b, n, d, seed=10)], dtype)
