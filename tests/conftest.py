import os
import sys

# Test helpers shared across folders (stand-in torch_npu / flash-attn modules) live beside this file.
sys.path.insert(0, os.path.dirname(__file__))

# Single-process tests use both cores; multi-process tests pass OMP_NUM_THREADS=1 to their workers.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Without a GPU, the Triton kernels run in Triton's CPU interpreter (fp32; bf16 is wrong in the
# interpreter). Triton defines its own library functions (tl.sum, ...) for the interpreter or not
# when it is first imported, and diffusers imports it: so here, before any test module imports
# anything. On a CUDA machine Triton compiles instead, and tests/gpu checks the kernels there.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """A small synthetic dataset shared by the data and training tests (read-only)."""
    from sora_dist.data import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("data") / "blobs", num_samples=96, seed=0, samples_per_shard=16)
