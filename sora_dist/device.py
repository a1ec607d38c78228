"""The one module that knows about cuda, npu and cpu.

``detect()`` picks the accelerator once at launch (``auto``: cuda, then Ascend npu, then cpu;
overridable by config and by the ``SORA_DIST_DEVICE`` environment variable) and returns a
``Device`` that gives the rest of the code everything device-specific: the torch device, the
collective backends, synchronize, memory statistics, the peak bf16 FLOP/s for MFU, and the
compute capability the attention dispatch chooses by. ``torch_npu`` is imported here and nowhere
else.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import resource
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch

from sora_dist.errors import DeviceError

log = logging.getLogger(__name__)

DEVICE_ENV = "SORA_DIST_DEVICE"
PEAK_ENV = "SORA_DIST_PEAK_TFLOPS"

# The accelerator's collective library for device tensors, and gloo for the few CPU tensors that
# checkpoints and the data position exchange: a process group made with only nccl or hccl has no
# backend for CPU tensors ("No backend type associated with device type cpu").
COMM_BACKENDS = {"cuda": "cpu:gloo,cuda:nccl", "npu": "cpu:gloo,npu:hccl", "cpu": "gloo"}

# Dense bf16 peak per device from the vendors' datasheets, matched as substrings of the device
# name, most specific first. Ascend figures are the vendor's FP16 numbers for the 910B family
# (bf16 runs at the same rate). Unknown parts report no MFU unless SORA_DIST_PEAK_TFLOPS is set.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),
    ("H800", 989.4e12),
    ("H20", 148.0e12),
    ("A100", 312.0e12),
    ("A800", 312.0e12),
    ("L40S", 362.1e12),
    ("910B1", 414.0e12),
    ("910B2", 376.0e12),
    ("910B3", 313.0e12),
    ("910B4", 280.0e12),
)


def peak_bf16_flops(device_name: str) -> Optional[float]:
    """Peak dense bf16 FLOP/s of one device, or None when the part is unknown."""
    override = os.environ.get(PEAK_ENV)
    if override:
        return float(override) * 1e12
    for pattern, flops in PEAK_BF16_FLOPS:
        if pattern in device_name:
            return flops
    return None


def _load_torch_npu() -> tuple[Optional[ModuleType], str]:
    """Import torch_npu if installed. Returns (module, "") or (None, reason).

    A broken CANN install raises all kinds of exceptions at import (ImportError, OSError,
    RuntimeError from the driver), so anything is caught and reported, never re-raised here.
    """
    if "torch_npu" not in sys.modules and importlib.util.find_spec("torch_npu") is None:
        return None, "torch_npu is not installed (pip install torch-npu, matching your CANN version)"
    try:
        module = importlib.import_module("torch_npu")
    except Exception as err:  # noqa: BLE001 - see docstring
        return None, f"importing torch_npu failed ({type(err).__name__}: {err}); check CANN's set_env.sh"
    return module, ""


@dataclass(frozen=True)
class Device:
    """Everything device-specific that the trainer, kernels and metrics need."""

    kind: str
    """cuda, npu or cpu."""
    index: int
    """Local device index (LOCAL_RANK under torchrun); 0 on cpu."""
    name: str
    """Marketing name of the part, e.g. 'NVIDIA H100 80GB HBM3'."""

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cpu") if self.kind == "cpu" else torch.device(self.kind, self.index)

    @property
    def comm_backend(self) -> str:
        return COMM_BACKENDS[self.kind]

    @property
    def peak_flops(self) -> Optional[float]:
        return None if self.kind == "cpu" and not os.environ.get(PEAK_ENV) else peak_bf16_flops(self.name)

    @property
    def capability(self) -> Optional[tuple[int, int]]:
        """CUDA compute capability (9, 0 on Hopper), None on other devices."""
        return torch.cuda.get_device_capability(self.index) if self.kind == "cuda" else None

    def _module(self):
        return getattr(torch, self.kind)

    def synchronize(self) -> None:
        if self.kind != "cpu":
            self._module().synchronize()

    def reset_peak_memory(self) -> None:
        if self.kind != "cpu":
            self._module().reset_peak_memory_stats()

    def memory_stats(self) -> dict[str, float]:
        """Current and peak memory in GiB (device memory, or process RSS on cpu)."""
        gib = 1024**3
        if self.kind == "cpu":
            # ru_maxrss is in KiB on Linux.
            return {"mem_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
        module = self._module()
        return {
            "mem_alloc_gib": module.memory_allocated() / gib,
            "mem_peak_gib": module.max_memory_allocated() / gib,
        }

    def free_memory_bytes(self) -> int:
        """Memory free for new tensors: the device's free memory, or the host's available memory on cpu."""
        if self.kind == "cpu":
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        free, _total = self._module().mem_get_info(self.index)
        return free

    def autocast(self, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
        """Autocast to ``dtype`` on this device, or a no-op for None (full fp32)."""
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.kind, dtype=dtype)


def npu_ops() -> ModuleType:
    """The torch_npu module, for the NPU kernels (they never import it themselves)."""
    module, reason = _load_torch_npu()
    if module is None:
        raise DeviceError(f"an NPU kernel was called but {reason}")
    return module


def detect(requested: str = "auto", local_rank: Optional[int] = None) -> Device:
    """Pick and set up the accelerator. ``SORA_DIST_DEVICE`` beats ``requested``."""
    requested = os.environ.get(DEVICE_ENV, requested) or "auto"
    if requested not in ("auto", "cuda", "npu", "cpu"):
        raise DeviceError(f"device {requested!r} is unknown: use auto, cuda, npu or cpu ({DEVICE_ENV} or parallel.device)")
    index = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank

    kind = requested
    if requested == "auto":
        kind = _auto_kind()
    elif requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("parallel.device=cuda but torch.cuda.is_available() is False: install a CUDA build of torch or use cpu")
    elif requested == "npu":
        _, reason = _load_torch_npu()
        if reason:
            raise DeviceError(f"parallel.device=npu but {reason}")
        if not torch.npu.is_available():
            raise DeviceError("parallel.device=npu but torch.npu.is_available() is False: check the driver and ASCEND_RT_VISIBLE_DEVICES")

    if kind == "cpu":
        return Device(kind="cpu", index=0, name="cpu")
    module = getattr(torch, kind)
    if index >= module.device_count():
        raise DeviceError(f"LOCAL_RANK={index} but only {module.device_count()} {kind} devices are visible")
    module.set_device(index)
    return Device(kind=kind, index=index, name=module.get_device_name(index))


def _auto_kind() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if "torch_npu" in sys.modules or importlib.util.find_spec("torch_npu") is not None:
        _, reason = _load_torch_npu()
        if reason:
            log.warning("not using the Ascend NPU: %s; falling back to cpu", reason)
        elif torch.npu.is_available():
            return "npu"
    return "cpu"
