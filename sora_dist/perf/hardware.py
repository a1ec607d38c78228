"""Accelerators and links the performance model knows, with where each figure comes from.

Peak FLOP/s are the device layer's (``sora_dist.device.PEAK_BF16_FLOPS``: dense bf16 from the
vendors' datasheets), so MFU means the same in benchmarks and plans. Memory and bandwidths are
datasheet figures; Ascend interconnect figures are Huawei's published ones (HCCS: 7 links of
56 GB/s in an 8-NPU 910B node; 910C: Huawei's 2025 roadmap, 784 GB/s). Inter-node bandwidth is
per device (one NIC per device, rail-optimized): 400 Gb/s InfiniBand NDR on Hopper, 200 Gb/s HDR
on A100 and 200 Gb/s RoCE on Ascend. Every figure can be overridden on the command line
(``sora-dist plan --intra-bw/--inter-bw/...``) or replaced by a calibration from ``bench-comm``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sora_dist.device import peak_bf16_flops
from sora_dist.errors import ConfigError

GB = 1e9


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float
    """Dense bf16 FLOP/s."""
    memory_bytes: float
    memory_bw: float
    """HBM bytes/s."""
    intra_bw: float
    """Per-device bytes/s inside a node, one direction (NVLink, HCCS): the best a collective's busbw reaches."""
    inter_bw: float
    """Per-device bytes/s between nodes (InfiniBand, RoCE)."""
    intra_latency: float = 10e-6
    """Seconds of a small collective inside a node."""
    inter_latency: float = 25e-6
    """Seconds of a small collective across nodes."""
    compute_efficiency: float = 0.55
    """Fraction of peak that the model's matmuls and attention reach, before calibration."""
    link_efficiency: float = 0.8
    """Fraction of the link bandwidth that collectives reach (busbw / hardware), before calibration."""
    overlap: bool = True
    """Whether FSDP's prefetched collectives and the ring's send/recv run behind compute (separate streams)."""
    platform: str = "NVLink + InfiniBand"


def _nvidia(name: str, memory_gb: float, memory_tbps: float, nvlink_gbps: float, nic_gbps: float) -> Accelerator:
    return Accelerator(name, peak_bf16_flops(name), memory_gb * GB, memory_tbps * 1e12, nvlink_gbps * GB, nic_gbps * GB)


def _ascend(name: str, flops: float, memory_gb: float, memory_tbps: float, hccs_gbps: float) -> Accelerator:
    return Accelerator(name, flops, memory_gb * GB, memory_tbps * 1e12, hccs_gbps * GB, 25 * GB,
                       intra_latency=15e-6, inter_latency=30e-6, platform="HCCS + RoCE")


ACCELERATORS: dict[str, Accelerator] = {
    "h100": _nvidia("H100", 80, 3.35, 450, 50),
    "h200": _nvidia("H200", 141, 4.8, 450, 50),
    "a100": _nvidia("A100", 80, 2.04, 300, 25),
    "910b1": _ascend("910B1", peak_bf16_flops("910B1"), 64, 1.6, 392),
    "910b2": _ascend("910B2", peak_bf16_flops("910B2"), 64, 1.6, 392),
    "910b3": _ascend("910B3", peak_bf16_flops("910B3"), 64, 1.6, 392),
    "910b4": _ascend("910B4", peak_bf16_flops("910B4"), 32, 0.8, 392),
    # Public figures, not a datasheet: 800 TFLOP/s fp16, 128 GB at 3.2 TB/s, 784 GB/s interconnect.
    "910c": _ascend("910C", 800e12, 128, 3.2, 784),
}


def accelerator(name: str, **overrides) -> Accelerator:
    """The named part, with any field overridden (None values are ignored)."""
    key = name.lower().replace("ascend", "").replace("-", "").replace(" ", "")
    if key not in ACCELERATORS:
        raise ConfigError(f"unknown accelerator {name!r}: choose from {', '.join(ACCELERATORS)} "
                          f"(or give --peak-tflops, --memory-gb and the bandwidths with the closest one)")
    return replace(ACCELERATORS[key], **{k: v for k, v in overrides.items() if v is not None})
