"""Health check at start: every rank answers, and every mesh group's links are as fast as its peers'.

Before the first step (which on a big job costs minutes of everyone's time to reach) the trainer

1. runs a monitored barrier on a gloo group with ``fault.health_timeout_s``: a rank that does not
   arrive (a dead GPU, a hung driver, a node that never came up) is named, instead of every
   other rank waiting in its first collective;
2. times a short all-reduce and all-to-all on each mesh dimension's groups (the collectives and
   timing of ``sora-dist bench-comm``, with nccl-tests' bus bandwidth), logs the bandwidth per
   dimension, and stops naming the hosts of any group whose bus bandwidth is below
   ``fault.health_min_fraction`` of the median over that dimension's groups (a bad NIC, a link
   trained down to a lower speed, a node on the wrong switch).
"""

from __future__ import annotations

import datetime
import logging
import socket
import statistics

import torch
import torch.distributed as dist

from sora_dist.errors import TrainingError
from sora_dist.perf.bench_comm import bus_factor, collective, measured_dims, time_op

log = logging.getLogger("sora_dist")

OPS = ("all_reduce", "all_to_all")
WARMUP, ITERS = 1, 3


def check_ranks_answer(timeout_s: float) -> list[str]:
    """Every rank reaches a barrier within ``timeout_s``; returns every rank's host name."""
    group = dist.new_group(backend="gloo")
    try:
        dist.monitored_barrier(group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as err:
        raise TrainingError(
            f"health check: not every rank answered within fault.health_timeout_s={timeout_s:g} s (this is rank "
            f"{dist.get_rank()} on {socket.gethostname()}): {err}. Check the named ranks' hosts; raise the timeout "
            "if they are only slow to start") from None
    hosts: list = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts


def measure_groups(mesh, dims, dev, nbytes: int) -> tuple[list[tuple[str, str]], torch.Tensor]:
    """(dim, op) pairs and a (world, pairs) tensor of every rank's bus bandwidth in GB/s."""
    pairs, mine = [], []
    for dim in measured_dims(dims):
        group, n = mesh[dim].get_group(), getattr(dims, dim)
        for op in OPS:
            seconds = time_op(collective(op, group, nbytes, dev.torch_device), group, dev, WARMUP, ITERS)
            pairs.append((dim, op))
            mine.append(nbytes / seconds * bus_factor(op, n) / 1e9)
    local = torch.tensor(mine, dtype=torch.float64, device=dev.torch_device)
    every = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(every, local)
    return pairs, torch.stack(every).cpu()


def slow_groups(pairs: list[tuple[str, str]], busbw: torch.Tensor, hosts: list[str], min_fraction: float) -> list[str]:
    """A line per (dim, op) whose slow ranks fall below ``min_fraction`` of the median (pure)."""
    problems = []
    for column, (dim, op) in enumerate(pairs):
        values = busbw[:, column].tolist()
        median = statistics.median(values)
        slow = [rank for rank, value in enumerate(values) if value < min_fraction * median]
        if slow:
            named = ", ".join(f"rank {r} ({hosts[r]}, {values[r]:.2f} GB/s)" for r in slow)
            problems.append(f"{dim} {op}: {named} against a median of {median:.2f} GB/s")
    return problems


def health_check(mesh, dims, dev, nbytes: int, min_fraction: float, timeout_s: float) -> dict:
    """Run both checks (every rank); returns {dim: {op: median busbw}} and raises on a slow group."""
    hosts = check_ranks_answer(timeout_s)
    pairs, busbw = measure_groups(mesh, dims, dev, nbytes)
    summary: dict = {}
    for column, (dim, op) in enumerate(pairs):
        values = busbw[:, column]
        summary.setdefault(dim, {})[op] = float(values.median())
        log.info("health check: %s (groups of %d) %s of %.0f MiB: bus bandwidth %.2f GB/s median, %.2f min, %.2f max",
                 dim, getattr(dims, dim), op, nbytes / 2**20, values.median(), values.min(), values.max())
    problems = slow_groups(pairs, busbw, hosts, min_fraction)
    if problems:
        raise TrainingError(
            f"health check: groups far below their peers (under fault.health_min_fraction={min_fraction:g} of the "
            f"median): {'; '.join(problems)}. Drain those hosts and relaunch, or set fault.health_check=false to train anyway")
    return summary
