"""Straggler detection: which rank is slow, on which host, by how much.

In synchronous training every rank's step takes as long as the slowest rank's, because each
waits for the others in the step's collectives: the step time cannot name a straggler. Two
per-rank figures can, and every log window gathers them from every rank:

- the data wait: time a rank spent waiting for its next batch (its own loader, its own host);
- a device probe: a fixed block of matmuls, identical on every rank, timed alone (no collective
  inside, synchronized on the device) once per log window. A throttled, misconfigured or shared
  accelerator runs it slower than its peers; it costs ``fault.probe_ms`` per window.

A rank whose probe takes more than ``fault.straggler_threshold`` times the median of the other
ranks, or whose extra data wait lengthens the step by that factor, is reported with its host.
The per-rank figures go to metrics.jsonl (``rank_probe_ms``, ``rank_data_wait_s``).
"""

from __future__ import annotations

import logging
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("sora_dist")

# Square fp32 matmuls, repeated to the target time: small on a CPU; on an accelerator large enough
# that the device, not the kernel launches, sets the time.
PROBE_SIZE = {"cpu": 256}
ACCELERATOR_PROBE_SIZE = 4096


@dataclass
class Straggler:
    rank: int
    host: str
    slowdown: float
    cause: str  # "device" or "data"

    def describe(self) -> str:
        what = "its device probe runs" if self.cause == "device" else "its data wait makes its step"
        return f"rank {self.rank} on host {self.host}: {what} {self.slowdown:.2f}x the median of the other ranks"


class DeviceProbe:
    """The same fixed matmul workload on every rank; ``seconds()`` times one run of it."""

    def __init__(self, dev, target_ms: float):
        self.dev = dev
        size = PROBE_SIZE.get(dev.kind, ACCELERATOR_PROBE_SIZE)
        self.a = torch.randn(size, size, device=dev.torch_device)
        self.repeats = self._repeats_for(target_ms / 1e3)

    def _repeats_for(self, seconds: float) -> int:
        self.run(2)  # warm up
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < max(seconds, 1e-3):
            self.run(1)
            calls += 1
        repeats = torch.tensor(max(1, round(calls * seconds / (time.perf_counter() - start))), device=self.dev.torch_device)
        if dist.is_initialized():  # the fastest rank's count: every rank runs the same work
            dist.all_reduce(repeats, op=dist.ReduceOp.MAX)
        return int(repeats)

    def run(self, repeats: int) -> None:
        out = self.a
        for _ in range(repeats):
            out = self.a @ self.a
        out.sum().item()  # waits for the device, on every kind of device

    def seconds(self) -> float:
        self.dev.synchronize()
        start = time.perf_counter()
        self.run(self.repeats)
        return time.perf_counter() - start


def find_stragglers(probe_s: list[float], wait_s: list[float], step_s: float, hosts: list[str], threshold: float) -> list[Straggler]:
    """Ranks slower than ``threshold`` times the median of the other ranks, slowest first (pure)."""
    found = []
    for rank, (probe, wait) in enumerate(zip(probe_s, wait_s)):
        probe_peers = statistics.median(probe_s[:rank] + probe_s[rank + 1 :])
        wait_peers = statistics.median(wait_s[:rank] + wait_s[rank + 1 :])
        device = probe / probe_peers if probe_peers > 0 else 1.0
        data = (step_s + wait - wait_peers) / step_s if step_s > 0 else 1.0
        slowdown, cause = max((device, "device"), (data, "data"))
        if slowdown > threshold:
            found.append(Straggler(rank, hosts[rank], slowdown, cause))
    return sorted(found, key=lambda s: -s.slowdown)


class StragglerMonitor:
    """Once per log window: probe this rank's device, gather every rank's figures, warn on rank 0."""

    def __init__(self, dev, threshold: float, probe_ms: float):
        self.threshold = threshold
        self.probe = DeviceProbe(dev, probe_ms)
        self.device = dev.torch_device
        self.hosts = [socket.gethostname()]
        if dist.is_initialized():
            self.hosts = [None] * dist.get_world_size()
            dist.all_gather_object(self.hosts, socket.gethostname())

    def window(self, wait_s_per_step: float, step_s: float) -> dict:
        """Per-rank figures of this window (every rank must call it); rank 0 logs stragglers."""
        mine = torch.tensor([self.probe.seconds(), wait_s_per_step], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(every, mine)
        else:
            every = [mine]
        probe_s = [float(t[0]) for t in every]
        wait_s = [float(t[1]) for t in every]
        found = find_stragglers(probe_s, wait_s, step_s, self.hosts, self.threshold) if len(every) > 1 else []
        if not dist.is_initialized() or dist.get_rank() == 0:
            for straggler in found:
                log.warning("straggler: %s (threshold %.2fx)", straggler.describe(), self.threshold)
        record = {"rank_probe_ms": [round(1e3 * s, 3) for s in probe_s], "rank_data_wait_s": [round(s, 5) for s in wait_s]}
        if found:
            record["stragglers"] = [{"rank": s.rank, "host": s.host, "slowdown": round(s.slowdown, 3), "cause": s.cause} for s in found]
        return record

    @staticmethod
    def build(dev, threshold: float, probe_ms: float) -> Optional["StragglerMonitor"]:
        return StragglerMonitor(dev, threshold, probe_ms) if threshold > 0 else None
