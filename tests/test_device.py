"""Device selection, including the Ascend path through a stand-in torch_npu module that behaves
as torch_npu documents: importing it registers the ``torch.npu`` namespace and the 'npu' device."""

import logging
import sys
import textwrap

import pytest
import torch

from sora_dist import device as device_lib
from sora_dist.errors import DeviceError

FAKE_NPU = textwrap.dedent(
    """
    import types
    import torch

    calls = []

    class _Npu(types.ModuleType):
        def is_available(self): return True
        def device_count(self): return 8
        def set_device(self, index): calls.append(("set_device", index))
        def get_device_name(self, index=0): return "Ascend910B2"
        def synchronize(self): calls.append(("synchronize",))
        def memory_allocated(self): return 3 * 1024**3
        def max_memory_allocated(self): return 5 * 1024**3
        def reset_peak_memory_stats(self): calls.append(("reset_peak_memory_stats",))

    torch.npu = _Npu("torch.npu")
    """
)


@pytest.fixture
def fake_torch_npu(tmp_path, monkeypatch):
    (tmp_path / "torch_npu.py").write_text(FAKE_NPU)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.delenv(device_lib.DEVICE_ENV, raising=False)
    yield
    sys.modules.pop("torch_npu", None)
    if hasattr(torch, "npu"):
        delattr(torch, "npu")


@pytest.fixture
def broken_torch_npu(tmp_path, monkeypatch):
    (tmp_path / "torch_npu.py").write_text("raise OSError('libascendcl.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.delenv(device_lib.DEVICE_ENV, raising=False)
    yield
    sys.modules.pop("torch_npu", None)


def test_cpu_machine_picks_cpu_and_gloo(monkeypatch):
    monkeypatch.delenv(device_lib.DEVICE_ENV, raising=False)
    dev = device_lib.detect("auto")
    assert (dev.kind, dev.comm_backend, dev.torch_device, dev.capability) == ("cpu", "gloo", torch.device("cpu"), None)
    assert dev.peak_flops is None  # no MFU claim for a CPU
    assert dev.memory_stats()["mem_peak_gib"] > 0


def test_environment_overrides_config(monkeypatch):
    monkeypatch.setenv(device_lib.DEVICE_ENV, "cpu")
    assert device_lib.detect("cuda").kind == "cpu"
    monkeypatch.setenv(device_lib.DEVICE_ENV, "tpu")
    with pytest.raises(DeviceError, match="device 'tpu' is unknown"):
        device_lib.detect("auto")


def test_missing_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(device_lib.DEVICE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="parallel.device=cuda but torch.cuda.is_available"):
        device_lib.detect("cuda")


def test_stand_in_npu_is_chosen_and_configured(fake_torch_npu, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    dev = device_lib.detect("auto")
    fake = sys.modules["torch_npu"]
    assert (dev.kind, dev.index, dev.name, dev.comm_backend) == ("npu", 3, "Ascend910B2", "cpu:gloo,npu:hccl")
    assert ("set_device", 3) in fake.calls  # each rank binds its own NPU, as torch_npu requires
    assert dev.peak_flops == pytest.approx(376e12)
    assert dev.memory_stats() == {"mem_alloc_gib": 3.0, "mem_peak_gib": 5.0}
    dev.synchronize()
    assert ("synchronize",) in fake.calls
    assert device_lib.detect("npu").kind == "npu"


def test_broken_npu_install_falls_back_on_auto_and_fails_clearly_when_asked(broken_torch_npu, caplog):
    with caplog.at_level(logging.WARNING):
        assert device_lib.detect("auto").kind == "cpu"
    assert "libascendcl.so" in caplog.text and "falling back to cpu" in caplog.text
    with pytest.raises(DeviceError, match=r"parallel.device=npu but importing torch_npu failed \(OSError"):
        device_lib.detect("npu")


def test_npu_not_installed(monkeypatch):
    monkeypatch.delenv(device_lib.DEVICE_ENV, raising=False)
    monkeypatch.setattr(device_lib.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DeviceError, match="torch_npu is not installed"):
        device_lib.detect("npu")


@pytest.mark.parametrize(
    "name, tflops",
    [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("Ascend910B3", 313.0)],
)
def test_peak_flops_of_known_parts(name, tflops, monkeypatch):
    monkeypatch.delenv(device_lib.PEAK_ENV, raising=False)
    assert device_lib.peak_bf16_flops(name) == pytest.approx(tflops * 1e12)


def test_unknown_part_has_no_peak_unless_overridden(monkeypatch):
    monkeypatch.delenv(device_lib.PEAK_ENV, raising=False)
    assert device_lib.peak_bf16_flops("Mystery GPU") is None
    monkeypatch.setenv(device_lib.PEAK_ENV, "123")
    assert device_lib.peak_bf16_flops("Mystery GPU") == pytest.approx(123e12)
