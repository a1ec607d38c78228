import os

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's CPU interpreter (fp32; bf16 is wrong in the
# interpreter). It is chosen when a kernel is defined, so before sora_dist.kernels.triton_kernels
# is imported. On a CUDA machine Triton compiles instead, and tests/gpu checks the kernels there.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        return
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "triton" and "tests/kernels/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.skip(reason="Triton compiles for the GPU on this machine; tests/gpu/test_triton_kernels.py covers it"))
