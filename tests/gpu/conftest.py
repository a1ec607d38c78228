"""GPU tests: they run only where CUDA exists (``pytest tests/gpu``, or ``scripts/gpu_proof.sh``,
which also records their results). On a machine without a GPU every one of them is skipped, with
the reason. Triton must compile here, not run in its CPU interpreter: run this folder in a
pytest process of its own (the CPU kernel tests set TRITON_INTERPRET when there is no GPU)."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
NO_GPU_REASON = "needs a CUDA GPU (torch.cuda.is_available() is False here); scripts/gpu_proof.sh runs these on a GPU machine"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.gpu)
            if not HAS_CUDA:
                item.add_marker(pytest.mark.skip(reason=NO_GPU_REASON))


@pytest.fixture(autouse=True)
def compiled_triton_and_clean_backends():
    assert os.environ.get("TRITON_INTERPRET") != "1", "run tests/gpu in a pytest process of its own: Triton is in interpreter mode"
    from sora_dist.kernels import set_attention_backend
    from sora_dist.kernels import fused

    yield
    set_attention_backend("sdpa")
    fused.set_fused_backend("reference")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (METHOD.md's measure); NaN anywhere fails it."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


# bf16 operands land between 1e-3 and 1e-2; fp32 far under 1e-3 (tf32 matmuls near 3e-4).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
