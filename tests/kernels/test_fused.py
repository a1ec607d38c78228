"""Every fused kernel against its plain-PyTorch reference, forward and backward, on random inputs
of several shapes including odd widths: Triton through its CPU interpreter (fp32), the NPU path
through a stand-in torch_npu that enforces the ops' documented signatures."""

import sys

import pytest
import torch

from sora_dist.kernels import fused
from stand_ins import fake_torch_npu

SHAPES = [(2, 7, 64), (1, 33, 48), (3, 5, 30)]  # (B, N, D): powers of two and odd widths


@pytest.fixture
def backend(request, monkeypatch):
    if request.param == "npu":
        monkeypatch.setitem(sys.modules, "torch_npu", fake_torch_npu())
    fused.set_fused_backend(request.param)
    yield request.param
    fused.set_fused_backend("reference")


def check(fn, reference, inputs, grad_seed=0):
    """Outputs and input gradients of ``fn`` equal those of ``reference``."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    out, expected = fn(*leaves), reference(*ref_leaves)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(grad_seed))
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(expected, ref_leaves, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("shape", SHAPES)
def test_modulated_layer_norm(backend, shape):
    b, n, d = shape
    check(fused.modulated_layer_norm, fused.reference_modulated_layer_norm, [3 * rand(b, n, d, seed=1) + 1, rand(b, d, seed=2), rand(b, d, seed=3)])


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_modulated_layer_norm_takes_wider_modulation(backend):
    """Wan's modulation is fp32 under bf16 activations: here fp64 modulation of fp32 x (the
    interpreter computes fp32 only) runs the kernel, not the reference, and the output and x's
    gradient keep x's dtype, the modulation's gradients its own."""
    from unittest import mock

    x, shift, scale = 3 * rand(2, 7, 48, seed=1) + 1, rand(2, 48, seed=2).double(), rand(2, 48, seed=3).double()
    with mock.patch.object(fused, "reference_modulated_layer_norm", side_effect=AssertionError("fell back")):
        leaves = [t.clone().requires_grad_() for t in (x, shift, scale)]
        out = fused.modulated_layer_norm(*leaves)
        grads = torch.autograd.grad(out, leaves, rand(2, 7, 48, seed=4))
    assert out.dtype == torch.float32 and [g.dtype for g in grads] == [torch.float32, torch.float64, torch.float64]
    ref_leaves = [t.clone().requires_grad_() for t in (x, shift, scale)]
    expected = fused.reference_modulated_layer_norm(*ref_leaves)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(expected, ref_leaves, rand(2, 7, 48, seed=4))):
        torch.testing.assert_close(got, want.to(got.dtype), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "npu"], indirect=True)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(backend, shape):
    b, n, d = shape
    check(fused.rms_norm, fused.reference_rms_norm, [rand(b, 2, n, d, seed=4), 1 + 0.1 * rand(d, seed=5)])


@pytest.mark.parametrize("backend", ["triton", "npu"], indirect=True)
@pytest.mark.parametrize("shape", [(2, 3, 7, 64), (1, 2, 33, 30), (2, 1, 5, 6)])
def test_rope(backend, shape):
    b, h, n, d = shape
    angles = rand(n, d // 2, seed=6) * 3
    check(lambda x: fused.rope(x, angles.cos(), angles.sin()), lambda x: fused.reference_rope(x, angles.cos(), angles.sin()), [rand(b, h, n, d, seed=7)])


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual(backend, shape):
    b, n, d = shape
    check(fused.gated_residual, fused.reference_gated_residual, [rand(b, n, d, seed=8), rand(b, d, seed=9), rand(b, n, d, seed=10)])


@pytest.mark.parametrize("backend", ["npu"], indirect=True)
def test_npu_path_calls_the_fused_ops(backend):
    x = rand(1, 2, 4, 8, seed=11)
    fused.rms_norm(x, torch.ones(8))
    fused.rope(x, torch.ones(4, 4), torch.zeros(4, 4))
    assert sys.modules["torch_npu"].calls == ["npu_rms_norm", "npu_rotary_mul"]


def test_backend_choice_and_errors():
    assert fused.select_fused_backend("npu") == "npu" and fused.select_fused_backend("cpu") == "reference"
    with pytest.raises(Exception, match="model.fused_backend='cuda' is unknown"):
        fused.set_fused_backend("cuda")


@pytest.mark.parametrize("backend", ["triton", "npu"], indirect=True)
def test_fused_training_curve_matches_the_reference(backend):
    """Ten AdamW steps of the DiT on the flow objective: the fused kernels give the reference
    path's loss curve. (The trainer picks them with model.fused_backend; on CPU the Triton
    interpreter makes full demo runs slow, so the curve is checked here on a tiny batch.)"""
    from sora_dist.config import DiffusionConfig
    from sora_dist.diffusion import build_objective
    from sora_dist.models import DiTConfig, VideoDiT

    def curve(kernels):
        fused.set_fused_backend(kernels)
        torch.manual_seed(0)
        model = VideoDiT(DiTConfig(in_channels=4, text_dim=8, hidden_size=32, depth=2, num_heads=2, patch_size=(1, 2, 2)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        objective = build_objective(DiffusionConfig(caption_dropout=0.2), (1, 2, 2))
        g = torch.Generator().manual_seed(1)
        x, text = torch.randn(2, 4, 2, 4, 6, generator=g), torch.randn(2, 3, 8, generator=g)
        mask = torch.tensor([[True, True, False], [True, True, True]])
        losses = []
        for _ in range(10):
            loss = objective.loss(model, x, text, mask, g).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    fused_curve = curve(backend)
    reference_curve = curve("reference")
    assert fused_curve == pytest.approx(reference_curve, rel=1e-4)
    assert reference_curve[-1] < reference_curve[0]
