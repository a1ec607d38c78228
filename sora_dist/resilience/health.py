"""Health check at start: every rank answers, and every mesh group's links are as fast as its peers'.

Before the first step (which on a big job costs minutes of everyone's time to reach) the trainer

1. has every rank check in at the process group's store, before any collective, within
   ``fault.health_timeout_s``: a rank that does not (a dead GPU, a hung driver, a node that never
   came up) is named, instead of every other rank waiting in its first collective;
2. times a short all-reduce and all-to-all on each mesh dimension's groups (the collectives and
   timing of ``sora-dist bench-comm``, with nccl-tests' bus bandwidth), logs the bandwidth per
   dimension, and stops naming the hosts of any group whose bus bandwidth is below
   ``fault.health_min_fraction`` of the median over that dimension's groups (a bad NIC, a link
   trained down to a lower speed, a node on the wrong switch).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import statistics

import torch
import torch.distributed as dist

from sora_dist.errors import TrainingError
from sora_dist.perf.bench_comm import bus_factor, collective, measured_dims, time_op
from sora_dist.resilience.elastic import restart_counts

log = logging.getLogger("sora_dist")

OPS = ("all_reduce", "all_to_all")
# The best of a few rounds: a bad link is slow every time, a busy moment on a host only once.
WARMUP, ITERS, ROUNDS = 1, 3, 3
# A group found slow is timed again, as a whole pass, this many more times; it fails only if its
# best pass is still slow (a busy second on a host can span the rounds of one pass).
CONFIRM_PASSES = 2


def check_ranks_answer(timeout_s: float) -> list[str]:
    """Every rank checks in at the process group's store within ``timeout_s``; returns every
    rank's host name. Run before any collective, which a missing rank would block without a name."""
    store = dist.distributed_c10d._get_default_store()
    prefix = f"sora_dist/answer/{restart_counts()[0]}/"  # a restarted job checks in afresh
    keys = [f"{prefix}{rank}" for rank in range(dist.get_world_size())]
    store.set(keys[dist.get_rank()], socket.gethostname())
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout_s))
    except RuntimeError:
        missing = [rank for rank, key in enumerate(keys) if not store.check([key])]
        raise TrainingError(
            f"health check: not every rank answered within fault.health_timeout_s={timeout_s:g} s: ranks {missing} are "
            f"missing (this is rank {dist.get_rank()} on {socket.gethostname()}). Check those ranks' hosts and logs; "
            "raise the timeout if they are only slow to start") from None
    return [store.get(key).decode() for key in keys]


def group_time(seconds: float, group, dev) -> float:
    """The group's time is its slowest rank's: a rank that arrived late waited less than its peers."""
    value = torch.tensor([seconds], dtype=torch.float64, device=dev.torch_device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return float(value)


def measure_groups(mesh, dims, dev, nbytes: int) -> tuple[list[tuple[str, str]], torch.Tensor]:
    """(dim, op) pairs and a (world, pairs) tensor of every rank's bus bandwidth in GB/s."""
    pairs, mine = [], []
    for dim in measured_dims(dims):
        group, n = mesh[dim].get_group(), getattr(dims, dim)
        for op in OPS:
            run = collective(op, group, nbytes, dev.torch_device)
            seconds = min(group_time(time_op(run, group, dev, WARMUP, ITERS), group, dev) for _ in range(ROUNDS))
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


def ranks_per_core(dev) -> float:
    """How many ranks of this host share each CPU core, where ranks run on the CPU itself (1 otherwise)."""
    if dev.kind != "cpu":
        return 1.0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1.0, int(os.environ.get("LOCAL_WORLD_SIZE", "1")) / cores)


def check_links(mesh, dims, dev, nbytes: int, min_fraction: float, hosts: list[str]) -> dict:
    """Time every mesh group (every rank); returns {dim: {op: median busbw}}, raises on a group
    slow in every pass (each rank keeps its best pass). Ranks sharing CPU cores time each other's
    scheduling too: the tolerance widens by that factor."""
    sharing = ranks_per_core(dev)
    if sharing > 1:
        min_fraction /= sharing
        log.info("health check: %.1f ranks per CPU core on this host: a group fails below %.2f of its peers", sharing, min_fraction)
    pairs, busbw = measure_groups(mesh, dims, dev, nbytes)
    for attempt in range(CONFIRM_PASSES):
        if not slow_groups(pairs, busbw, hosts, min_fraction):
            break
        log.info("health check: a group was slow (pass %d): timing every group again before deciding", attempt + 1)
        busbw = torch.maximum(busbw, measure_groups(mesh, dims, dev, nbytes)[1])
    summary: dict = {}
    for column, (dim, op) in enumerate(pairs):
        values = busbw[:, column]
        summary.setdefault(dim, {})[op] = float(values.median())
        log.info("health check: %s (groups of %d) %s of %.0f MiB: bus bandwidth %.2f GB/s median, %.2f min, %.2f max",
                 dim, getattr(dims, dim), op, nbytes / 2**20, float(values.median()), float(values.min()), float(values.max()))
    problems = slow_groups(pairs, busbw, hosts, min_fraction)
    if problems:
        raise TrainingError(
            f"health check: groups far below their peers (under fault.health_min_fraction={min_fraction:g} of the "
            f"median): {'; '.join(problems)}. Drain those hosts and relaunch, or set fault.health_check=false to train anyway")
    return summary
