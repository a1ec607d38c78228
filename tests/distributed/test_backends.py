"""The process group of a GPU or NPU run must carry the CPU-tensor collectives of checkpoints and
the data position: the device layer asks for the accelerator's backend *and* gloo for the CPU.
Reproduced on CPU by letting gloo stand in for nccl on the cuda device type."""

import subprocess
from pathlib import Path

import pytest

from sora_dist.device import COMM_BACKENDS, Device
from warm_ranks import run_ranks

WORKER = Path(__file__).with_name("backend_worker.py")


def emulated(backend: str) -> str:
    """The backend string with gloo standing in for nccl. A bare 'nccl' serves only the cuda
    device type, so it becomes 'cuda:gloo'."""
    if ":" not in backend:
        return "cuda:gloo" if backend == "nccl" else backend
    return backend.replace("cuda:nccl", "cuda:gloo")


def run_worker(backend: str, data_dir) -> subprocess.CompletedProcess:
    return run_ranks(2, [str(WORKER), backend, str(data_dir)], timeout=120)


@pytest.mark.parametrize("kind, expected", [("cuda", "cpu:gloo,cuda:nccl"), ("npu", "cpu:gloo,npu:hccl"), ("cpu", "gloo")])
def test_each_device_kind_gets_a_backend_for_cpu_tensors_too(kind, expected):
    assert Device(kind=kind, index=0, name="x").comm_backend == expected == COMM_BACKENDS[kind]


def test_accelerator_only_backend_cannot_save_the_data_position(synthetic_dir):
    result = run_worker(emulated("nccl"), synthetic_dir)
    assert result.returncode != 0 and "No backend type associated with device type cpu" in result.stderr


def test_the_device_layers_cuda_backend_carries_the_cpu_collectives(synthetic_dir):
    result = run_worker(emulated(Device(kind="cuda", index=0, name="x").comm_backend), synthetic_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ranks [0, 1]" in result.stdout and "consumed" in result.stdout
