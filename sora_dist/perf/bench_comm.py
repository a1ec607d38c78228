"""Collectives benchmark: the bandwidth of every mesh dimension's process group of a layout.

  torchrun --nproc-per-node 8 -m sora_dist.perf.bench_comm --parallel.tp=2 --parallel.sp_ulysses=2
  sora-dist bench-comm --max-bytes 16M ...            (the same, inside an existing torchrun)

For each mesh dimension whose degree is above 1 (dp_replicate, dp_shard, sp_ring, sp_ulysses, tp)
it times, on that dimension's groups (all groups of a dimension run at once, as in training):
all_gather_into_tensor, reduce_scatter_tensor, all_reduce, all_to_all_single, and on sp_ring the
ring's send/recv (each rank sends to the next and receives from the previous), and on tp the
all-reduce as the tensor-parallel layers issue it (all_reduce_functional: DTensor's out-of-place
functional all-reduce, which copies its input and is waited on), from 1 KiB up to
--max-bytes (default 256 MiB, capped so that the buffers take at most a quarter of free memory).

Sizes and bandwidths follow nccl-tests (github.com/NVIDIA/nccl-tests, doc/PERFORMANCE.md):
  size   the whole buffer: all_gather's output, reduce_scatter's input, all_reduce's and
         all_to_all's buffer, the bytes a rank sends in send/recv;
  time   the slowest rank's mean over --iters iterations (after --warmup); back to back as
         nccl-tests runs them, or each after --after-compute-ms of compute, as in training;
  algbw  size / time;
  busbw  algbw x the collective's factor for a group of n ranks: 2(n-1)/n for all-reduces,
         (n-1)/n for all_gather, reduce_scatter and all_to_all, 1 for send/recv. busbw is
         comparable with the link's hardware bandwidth whatever n is.
Buffers are fp32. Each call (but all_reduce, which works in place) writes a freshly allocated
output, as in training, where FSDP, the TP layers and the sequence-parallel exchanges allocate
every collective's output anew: with a caching allocator (CUDA, NPU) that costs nothing, while on
cpu it adds the page faults training pays (a 5.6 MB all-gather on 2 gloo ranks here: 8.0 ms
fresh against 4.7 ms into a reused buffer). The JSON (--json) has date, device, backend and every
row; the performance model (sora-dist plan --calibration) fits latency and bandwidth per group from it.

Rank skew: ranks that compute the same work do not reach the next collective at the same moment
(OS noise, stragglers, and on cpu, ranks sharing cores and descheduled in turn), so every blocking
collective also waits for the last rank. bench-comm measures what that costs: every rank runs the
same burst of training-like work (--skew-bursts-ms, several lengths: forward and backward of an
MLP of the model's width, allocating as a training step does) --iters times, once with a one-element
all-reduce over the world after every burst and once with none between them, all ranks starting
together; the delay is the time per burst of the first (averaged over the ranks), less that of
the second on the slowest rank, less the all-reduce back to back: the step time a blocking
collective adds beyond the work itself, in the median of --skew-rounds rounds that alternate
the two. The second is the slowest rank's because the bursts
without collectives end when the last rank is done, and where ranks share cores a rank that
finishes early hands its core to the others: each rank's own time would be shorter than the
work takes. So a rank that is slower at every burst is not skew (it is the slowest rank's work;
``sora-dist`` training's straggler probe names it); a different rank late at each burst is. The
mean wait inside the all-reduce is reported too, but it overstates the cost where ranks share
cores: a rank that waits frees its core for the ranks still computing. The performance model
interpolates the delay at the compute between a layout's blocking collectives and adds it at
each of them.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional

from sora_dist import device as device_lib
from sora_dist.build import start_distributed, stop_distributed
from sora_dist.config import load_config, resolve_model_config
from sora_dist.console import CommandParser, exit_process, human_bytes, user_command
from sora_dist.models.dit import Mlp
from sora_dist.parallel.mesh import MESH_DIMS, build_mesh, resolve_dims
from sora_dist.perf.output import report_on_rank_zero

OPS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send_recv", "all_reduce_functional")
# Where each op is timed beyond the four collectives every group gets: the ring's send/recv on
# sp_ring, and on tp the all-reduce as DTensor's tensor-parallel layers issue it.
EXTRA_OPS = {"sp_ring": ("send_recv",), "tp": ("all_reduce_functional",)}
ELEMENT_BYTES = 4  # fp32 buffers
# Renamed in torch 2.13 (the old names warn there); the GPU machine's torch 2.11 has only the old ones.
ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def bus_factor(op: str, n: int) -> float:
    """nccl-tests' factor from algorithm to bus bandwidth for a collective over n ranks."""
    if op in ("all_reduce", "all_reduce_functional"):
        return 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    if op == "send_recv":
        return 1.0
    raise ValueError(f"unknown collective {op!r}: choose from {OPS}")


def message_sizes(min_bytes: int, max_bytes: int, factor: int = 4) -> list[int]:
    """min_bytes, min_bytes*factor, ... up to max_bytes (included when it is on the ladder)."""
    sizes, size = [], min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= factor
    return sizes


def parse_bytes(text: str) -> int:
    """'256M', '1G', '4096' -> bytes (K, M, G are powers of 1024)."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    size = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        value = int(float(size[:-1]) * units[size[-1]]) if size and size[-1] in units else int(size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write bytes or a size like 64K, 256M, 1G") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 byte")
    return value


def collective(op: str, group, nbytes: int, device: torch.device) -> Callable[[], None]:
    """A closure that runs one ``op`` of ``nbytes`` (nccl-tests' size) on ``group``."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    numel = max(n, nbytes // ELEMENT_BYTES // n * n)  # whole elements, divisible by n
    full = torch.ones(numel, device=device)
    part = torch.ones(numel // n, device=device)
    if op == "all_gather":
        return lambda: ALL_GATHER(torch.empty_like(full), part, group=group)
    if op == "reduce_scatter":
        return lambda: REDUCE_SCATTER(torch.empty_like(part), full, group=group)
    if op == "all_reduce":
        return lambda: dist.all_reduce(full, group=group)  # in place: its output is its input
    if op == "all_reduce_functional":  # out of place, through the functional op DTensor calls
        return lambda: functional.wait_tensor(functional.all_reduce(full, "sum", group))
    if op == "all_to_all":
        return lambda: dist.all_to_all_single(torch.empty_like(full), full, group=group)
    if op == "send_recv":
        send_to = dist.get_global_rank(group, (rank + 1) % n)
        recv_from = dist.get_global_rank(group, (rank - 1) % n)

        def ring_step():
            received = torch.empty_like(full)
            ops = [dist.P2POp(dist.isend, full, send_to, group), dist.P2POp(dist.irecv, received, recv_from, group)]
            for request in dist.batch_isend_irecv(ops):
                request.wait()

        return ring_step
    raise ValueError(f"unknown collective {op!r}: choose from {OPS}")


def time_op(run: Callable[[], None], group, dev: device_lib.Device, warmup: int, iters: int, compute: Callable[[], None] | None = None) -> float:
    """Mean seconds per call on this rank, after ``warmup`` calls; the group starts together.
    With ``compute``, each call follows a burst of it (untimed), as collectives follow compute
    in training, instead of running back to back."""
    for _ in range(warmup):
        run()
    dev.synchronize()
    dist.barrier(group=group)
    if compute is None:
        start = time.perf_counter()
        for _ in range(iters):
            run()
        dev.synchronize()
        return (time.perf_counter() - start) / iters
    return _each_after(compute, run, dev, iters)[1]


def _each_after(compute: Callable[[], None], run: Callable[[], None], dev: device_lib.Device, iters: int) -> tuple[float, float]:
    """``iters`` times ``compute`` then ``run``: (seconds per pair, seconds of it in ``run``)."""
    start, in_run = time.perf_counter(), 0.0
    for _ in range(iters):
        compute()
        dev.synchronize()
        arrived = time.perf_counter()
        run()
        dev.synchronize()
        in_run += time.perf_counter() - arrived
    return (time.perf_counter() - start) / iters, in_run / iters


BURST_TOKENS = 512  # rows of the burst's MLP input: a few ms a call on a cpu core


def compute_burst(seconds: float, dev: device_lib.Device, width: int = 512, mlp_hidden: int = 2048) -> Callable[[], None] | None:
    """A closure of training-like work that takes about ``seconds`` on this device, or None for 0:
    forward and backward, through autograd, of the model's MLP (``Mlp``) at its width over ``BURST_TOKENS``
    tokens, so every call allocates its activations and gradients anew as a training step does.
    (Matmuls into one buffer run steadier than training: on 2 gloo ranks here they showed 0-2 ms
    of delay per collective, where a bench-train Ulysses 2 step waited 1.4-3.5 ms for its peer at
    each all-to-all, by scripts/probe_ulysses_waits.py; after this burst, 0-11 ms, median 1.6,
    over 28 measurements.) Every rank gets the same number of calls
    (the mean of what each rank timed), as every rank of a layout computes the same work: a rank
    that timed while others were still starting would otherwise run more of them every time and
    show up as skew."""
    if seconds <= 0:
        return None
    mlp = Mlp(width, mlp_hidden).to(dev.torch_device)
    x = torch.randn(BURST_TOKENS, width, device=dev.torch_device)

    def once():
        mlp.zero_grad(set_to_none=True)
        mlp(x).square().mean().backward()

    once()
    dev.synchronize()
    dist.barrier()  # every rank times its calls under the same sharing of the host
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < 0.2:
        once()
        calls += 1
        dev.synchronize()
    repeats = max(1, round(mean_over_ranks(seconds / ((time.perf_counter() - start) / calls), dev.torch_device)))
    return lambda: [once() for _ in range(repeats)]


def rank_skew(dev: device_lib.Device, bursts_ms: list[float], iters: int, rounds: int = 1, width: int = 512, mlp_hidden: int = 2048) -> list[dict]:
    """Per burst length of training-like work, ``skew_after`` it (see the module docstring)."""
    tiny = torch.zeros(1, device=dev.torch_device)

    def all_reduce():
        dist.all_reduce(tiny)

    back_to_back = mean_over_ranks(time_op(all_reduce, None, dev, 3, iters), dev.torch_device)
    return [{"burst_ms": burst_ms, **skew_after(compute_burst(burst_ms / 1e3, dev, width, mlp_hidden), all_reduce, back_to_back, dev, iters, rounds)}
            for burst_ms in bursts_ms]


def skew_after(burst: Callable[[], None], all_reduce: Callable[[], None], back_to_back: float, dev: device_lib.Device, iters: int,
               rounds: int = 1) -> dict:
    """The delay (us) that ``all_reduce`` after every ``burst`` adds per burst (averaged over the
    ranks), against the bursts with none between them (the slowest rank's time: they are done
    when it is) and less the all-reduce back to back; and the mean wait (us) inside it. Over
    ``rounds`` rounds of ``iters`` bursts each way, alternating, the median round: a host whose
    speed drifts, or a slow spell in one round, moves both halves of a round alike or one round."""
    delays, waits = [], []
    for _ in range(rounds):
        unsynced = slowest(time_op(burst, None, dev, 1, iters), dev.torch_device)
        synced, wait = (mean_over_ranks(v, dev.torch_device) for v in _bursts_then_all_reduce(burst, all_reduce, dev, iters))
        delays.append(max(0.0, synced - unsynced - back_to_back))
        waits.append(max(0.0, wait - back_to_back))
    return {"delay_us": statistics.median(delays) * 1e6, "wait_us": statistics.median(waits) * 1e6}


def _bursts_then_all_reduce(burst: Callable[[], None], all_reduce: Callable[[], None], dev: device_lib.Device, iters: int) -> tuple[float, float]:
    """(seconds per burst and all-reduce, seconds of it inside the all-reduce) on this rank."""
    burst()
    all_reduce()
    dev.synchronize()
    dist.barrier()
    return _each_after(burst, all_reduce, dev, iters)


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of a value over every rank of the world."""
    return _over_ranks(value, device, dist.ReduceOp.SUM) / dist.get_world_size()


def slowest(seconds: float, device: torch.device) -> float:
    """The largest value over every rank of the world."""
    return _over_ranks(seconds, device, dist.ReduceOp.MAX)


def _over_ranks(seconds: float, device: torch.device, op) -> float:
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=op)
    return value.item()


def measured_dims(dims) -> list[str]:
    """Mesh dimensions of the layout that have a group to measure (degree above 1)."""
    return [name for name in MESH_DIMS if getattr(dims, name) > 1]


def ops_for(dim: str) -> tuple[str, ...]:
    """The four collectives on every group, and each dimension's own (``EXTRA_OPS``)."""
    return (*OPS[:4], *EXTRA_OPS.get(dim, ()))


def size_limit(requested: int, dev: device_lib.Device, world_size: int) -> int:
    """``requested``, capped so that an op's buffers (at most 3 of the size) fit in a quarter of the
    free memory, shared by the ranks of a host on cpu."""
    free = dev.free_memory_bytes() // (world_size if dev.kind == "cpu" else 1)
    return min(requested, free // 12)


def benchmark(args, overrides: list[str], progress=print) -> dict:
    cfg = load_config(None, [f"--model.preset={args.preset}", *overrides])
    dev = device_lib.detect(cfg.parallel.device)
    world_size, rank = start_distributed(dev, cfg.parallel.collective_timeout_minutes)
    if world_size < 2:
        raise SystemExit("bench-comm needs at least 2 ranks: run it under torchrun --nproc-per-node N")
    model_cfg = resolve_model_config(cfg.model, 4, 64)
    dims = resolve_dims(cfg.parallel, world_size, model_cfg)
    mesh = build_mesh(dims, dev.kind)
    max_bytes = size_limit(args.max_bytes, dev, world_size)
    mlp_shape = (model_cfg.hidden_size, model_cfg.mlp_hidden)
    compute = compute_burst(args.after_compute_ms / 1e3, dev, *mlp_shape)
    rows = []
    for dim in measured_dims(dims):
        group, n = mesh[dim].get_group(), getattr(dims, dim)
        for op in ops_for(dim):
            for nbytes in message_sizes(args.min_bytes, max_bytes):
                seconds = slowest(time_op(collective(op, group, nbytes, dev.torch_device), group, dev, args.warmup, args.iters, compute), dev.torch_device)
                algbw = nbytes / seconds
                rows.append({"dim": dim, "group_size": n, "op": op, "bytes": nbytes, "time_us": seconds * 1e6,
                             "algbw_gbps": algbw / 1e9, "busbw_gbps": algbw * bus_factor(op, n) / 1e9})
            if rank == 0:
                progress(f"bench-comm: {dim} (n={n}) {op} done, peak busbw {max(r['busbw_gbps'] for r in rows if r['dim'] == dim and r['op'] == op):.2f} GB/s")
    skew = rank_skew(dev, args.skew_bursts_ms, args.iters, args.skew_rounds, *mlp_shape) if args.skew_bursts_ms else []
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "device": dev.name, "backend": dist.get_backend(), "world_size": world_size,
            "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
            "layout": dims.describe(), "degrees": dict(zip(MESH_DIMS, dims.degrees)), "dtype": "float32",
            "after_compute_ms": args.after_compute_ms, "rows": rows, "skew": skew}


def format_table(result: dict) -> str:
    lines = [f"collectives benchmark, {result['date']}, {result['device']} x {result['world_size']}, "
             f"backend {result['backend']}, {result['layout']}; time in us, busbw in GB/s (nccl-tests definitions)"]
    for dim in dict.fromkeys(r["dim"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["dim"] == dim]
        ops = list(dict.fromkeys(r["op"] for r in rows))
        lines.append(f"\n{dim} (group of {rows[0]['group_size']})")
        lines.append(f"{'size':>10} " + " ".join(f"{op + ' us':>16} {'busbw':>7}" for op in ops))
        for nbytes in dict.fromkeys(r["bytes"] for r in rows):
            cells = {r["op"]: r for r in rows if r["bytes"] == nbytes}
            lines.append(f"{human_bytes(nbytes):>10} " + " ".join(f"{cells[op]['time_us']:>16.1f} {cells[op]['busbw_gbps']:>7.2f}" for op in ops))
    if result.get("skew"):
        lines.append("\nrank skew over the world: per burst of compute, the delay a blocking collective adds to the step (the mean wait in it)")
        lines += [f"  after {r['burst_ms']:g} ms: {r['delay_us'] / 1e3:.2f} ms ({r['delay_us'] / 1e3 / r['burst_ms']:.1%}); "
                  f"wait {r['wait_us'] / 1e3:.2f} ms ({r['wait_us'] / 1e3 / r['burst_ms']:.1%})" for r in result["skew"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = CommandParser(prog="sora-dist bench-comm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="XL", help="model preset whose head count the layout is checked against")
    parser.add_argument("--min-bytes", type=parse_bytes, default=1024, help="smallest message (default 1K)")
    parser.add_argument("--max-bytes", type=parse_bytes, default=256 * 1024**2, help="largest message (default 256M)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--after-compute-ms", type=float, default=0.0,
                        help="run this many ms of training-like work (untimed) before each timed call, as training does between collectives")
    parser.add_argument("--skew-bursts-ms", type=float, nargs="*", default=[25.0, 100.0, 400.0, 1600.0],
                        help="compute bursts (ms) after which the rank skew is measured; none to skip it")
    parser.add_argument("--skew-rounds", type=int, default=3,
                        help="rounds of --iters bursts each way per burst length; the rank skew is the median round's")
    parser.add_argument("--json", default="", help="also write every row to this JSON file")
    return parser.parse_known_args(argv)


@user_command
def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = benchmark(args, overrides)
    report_on_rank_zero(result, lambda r: print(format_table(r)), args.json)
    stop_distributed()
    return 0


if __name__ == "__main__":
    exit_process(main())
