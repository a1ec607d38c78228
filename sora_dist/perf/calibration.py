"""Calibrating the performance model on the user's own hardware, and reading measurements back.

  sora-dist calibrate --preset S --latent 4 16 16 --batches 1 2 4 --out calib.json   # one device
  torchrun --nproc-per-node 8 -m sora_dist.perf.bench_comm --json comm8.json        # its links

``calibrate`` times bench-train on one device at several batch sizes and fits step time = fixed
overhead + optimizer update (memory bound, from a timed device copy) + FLOPs / achieved rate. It
also times writes into newly allocated memory, which collectives' outputs and FSDP's copies pay
(page faults on cpu; a caching allocator's reused blocks on CUDA/NPU). And it times the host work
that the wrappers add, on one rank (a 1-rank mesh: FSDP2's hooks and DTensor's dispatch run, the
collectives move nothing): the same step plain, under the TP plan and under FSDP2, per block. The
model then needs only the layout-dependent terms. bench-comm's JSON gives each collective's
latency (its smallest message) and bus bandwidth (its largest message) per group size, inside a
node or across nodes. Several files may be passed to ``sora-dist plan --calibration``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sora_dist import device as device_lib
from sora_dist.build import autocast_dtype, build_optimizer
from sora_dist.config import load_config, resolve_model_config
from sora_dist.console import CommandParser, exit_process, positive_int, read_json, user_command
from sora_dist.errors import ConfigError
from sora_dist.models import DiTConfig, VideoDiT
from sora_dist.parallel import apply_fsdp, build_mesh, make_engine, materialize
from sora_dist.parallel.mesh import MESH_DIMS, ParallelDims
from sora_dist.parallel.tensor import apply_tensor_parallel
from sora_dist.perf import bench_train
from sora_dist.perf.bench_comm import bus_factor
from sora_dist.perf.model import (OPTIMIZER_BYTES_PER_PARAM, Calibration, Layout, Workload, compute_flops, fsdp_copy_bytes,
                                  group_spans_nodes, parameter_count_per_rank, tp_local_parameter_count)

WRAPPERS = ("tp", "fsdp")


def copy_bandwidth(dev: device_lib.Device, nbytes: int = 256 * 1024**2, repeats: int = 5) -> float:
    """Bytes/s of a device copy (read + write counted), best of ``repeats``."""
    src = torch.empty(nbytes // 4, device=dev.torch_device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        dev.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        dev.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def fresh_write_bandwidth(dev: device_lib.Device, nbytes: int = 8 * 1024**2, repeats: int = 20) -> float:
    """Bytes/s of filling a newly allocated buffer of the size of a block's collective, median of
    ``repeats``."""
    times = []
    for _ in range(repeats):
        dev.synchronize()
        start = time.perf_counter()
        torch.empty(nbytes // 4, device=dev.torch_device).fill_(1.0)
        dev.synchronize()
        times.append(time.perf_counter() - start)
    return nbytes / sorted(times)[len(times) // 2]


def wrapper_host_overhead(args, dev: device_lib.Device, fresh_write_bw: float, repeats: int = 3) -> dict[str, float]:
    """Host seconds per block per step that the TP plan and FSDP2 add to a step, on one rank.

    The calibration's step (smallest batch) is timed plain and under each wrapper on a 1-rank mesh,
    ``repeats`` rounds; a wrapper's cost is its fastest step less the fastest plain step (noise on
    a shared host only ever adds time). FSDP's copies, which the model counts itself
    (``fsdp_copy_bytes``), are taken out of its share."""
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(dev.comm_backend, store=dist.HashStore(), rank=0, world_size=1)
    cfg = load_config(None, [f"--model.preset={args.preset}", *args.overrides])
    model_cfg = resolve_model_config(cfg.model, bench_train.IN_CHANNELS, bench_train.TEXT_DIM)
    times: dict[str, list[float]] = {}
    try:
        for _ in range(repeats):
            for wrapper in ("plain", *WRAPPERS):
                times.setdefault(wrapper, []).append(_one_rank_step_s(cfg, dev, model_cfg, wrapper, args))
    finally:
        if owned:
            dist.destroy_process_group()
    params = tp_local_parameter_count(model_cfg, 1)
    copies = fsdp_copy_bytes(params, 4 if autocast_dtype(cfg, dev) is None else 2, 2, 1) / fresh_write_bw
    cost = {w: min(times[w]) - min(times["plain"]) for w in WRAPPERS}
    cost["fsdp"] -= copies
    return {w: max(0.0, c) / model_cfg.depth for w, c in cost.items()}


def _one_rank_step_s(cfg, dev: device_lib.Device, model_cfg: DiTConfig, wrapper: str, args) -> float:
    """Median step time of the calibration's model at its smallest batch on a 1-rank mesh, plain or
    under one wrapper, built with the trainer's own functions."""
    dims = ParallelDims(1, 1, 1, 1, 1, "fsdp")
    mesh = build_mesh(dims, dev.kind)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = VideoDiT(model_cfg)
    materialize(model, dev.torch_device)
    dtype = autocast_dtype(cfg, dev)
    if wrapper == "tp":
        apply_tensor_parallel(model, mesh["tp"])
    elif wrapper == "fsdp":
        apply_fsdp(model, mesh, dims, dtype, cfg.parallel.reshard_after_forward)
    optimizer, scheduler = build_optimizer(model, cfg)
    engine = make_engine(model, cfg.parallel, dims, mesh, dev.torch_device, optimizer, scheduler, cfg.optim.grad_clip, 1, dtype is not None)
    step = bench_train.training_step(cfg, dev, engine, dtype, 1, min(args.batches), tuple(args.latent), 128)
    return min(bench_train.timed(step, dev, 2, args.steps))


def workload_and_layout(result: dict) -> tuple[Workload, Layout]:
    """The model's view of a bench-train JSON result."""
    model = DiTConfig(**{**result["model"], "patch_size": tuple(result["model"]["patch_size"])})
    dims = ParallelDims(*(result["degrees"][name] for name in MESH_DIMS), result["engine"])
    element = 4 if result["precision"] == "fp32" else 2
    work = Workload(model, tuple(result["latent"]), result["text_len"], result["batch_per_dp_rank"] * dims.dp, element, element)
    return work, Layout(dims, result["activation_checkpointing"], result["ac_every"], result["reshard_after_forward"])


def fit_compute(results: list[dict], memory_bw: float) -> tuple[float, float]:
    """(achieved FLOP/s, fixed seconds per step) from single-device bench-train results: a least
    squares line through (FLOPs, step time minus the optimizer update). One result gives a rate
    and no overhead; a negative overhead is clamped to 0 and the rate refitted through the origin."""
    points = []
    for r in results:
        work, layout = workload_and_layout(r)
        optimizer_s = OPTIMIZER_BYTES_PER_PARAM * parameter_count_per_rank(work.model, layout.dims) / memory_bw
        points.append((compute_flops(work, layout)[0], r["step_s_median"] - optimizer_s))
    if len(points) > 1:
        n = len(points)
        mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
        slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
        overhead = mean_y - slope * mean_x
        if slope > 0 and overhead >= 0:
            return 1 / slope, overhead
    return sum(x for x, _ in points) / sum(y for _, y in points), 0.0


def fit_links(comm: dict) -> list[tuple[tuple[str, int, bool, int], tuple[float, float]]]:
    """((op, group size, spans nodes, world size), (latency, bus bandwidth)) for each measured
    group of a bench-comm JSON."""
    per_node = comm.get("local_world_size", comm["world_size"])
    degrees = comm["degrees"]
    links = []
    for key in sorted({(r["dim"], r["op"], r["group_size"]) for r in comm["rows"]}):
        rows = sorted((r for r in comm["rows"] if (r["dim"], r["op"], r["group_size"]) == key), key=lambda r: r["bytes"])
        dim, op, n = key
        across = group_spans_nodes(degrees, (dim,), per_node)
        links.append(((op, n, across, comm["world_size"]), fit_latency_bandwidth(rows, bus_factor(op, n))))
    return links


def fit_latency_bandwidth(rows: list[dict], factor: float) -> tuple[float, float]:
    """(latency, bus bandwidth) of ``time = latency + bytes x factor / busbw`` through one group's
    rows: the latency is the smallest message's time, the bandwidth a least-squares slope over
    every size (robust to one noisy large message, unlike the largest message alone)."""
    latency = rows[0]["time_us"] * 1e-6
    points = [(r["bytes"] * factor, r["time_us"] * 1e-6 - latency) for r in rows[1:]] or [(rows[0]["bytes"] * factor, latency)]
    slope = sum(x * y for x, y in points) / sum(x * x for x, _ in points)
    return latency, 1 / slope if slope > 0 else rows[-1]["busbw_gbps"] * 1e9


def load_calibration(paths: list[str]) -> Calibration:
    """One Calibration from any mix of ``calibrate`` and bench-comm JSON files."""
    cal = Calibration()
    measured: dict[tuple, list[tuple[float, float]]] = {}
    skews: dict[int, dict[float, list[float]]] = {}
    for path in paths:
        data = read_json(path, "calibration file", "sora-dist calibrate --out or bench-comm --json")
        if "rows" in data:
            for key, fit in fit_links(data):
                measured.setdefault(key, []).append(fit)
            for row in data.get("skew", []):
                skews.setdefault(data["world_size"], {}).setdefault(row["burst_ms"] / 1e3, []).append(row["delay_us"] / 1e6)
        elif data.get("kind") == "calibration":
            cal.flops_rate, cal.step_overhead_s = data["flops_rate"], data["step_overhead_s"]
            cal.memory_bw, cal.shared_cores = data["memory_bw"], data.get("shared_cores", 0)
            cal.fresh_write_bw = data["fresh_write_bw"]
            cal.wrapper_host_s = data.get("wrapper_host_s_per_block", {})
        else:
            raise ConfigError(f"{path} is neither a `sora-dist calibrate` nor a bench-comm JSON file")
    # Groups of one size measured on several dimensions or runs: mean latency, mean time per byte.
    cal.comm = {key: (sum(f[0] for f in fits) / len(fits), len(fits) / sum(1 / f[1] for f in fits)) for key, fits in measured.items()}
    # Rank skew per world size: the mean delay after each burst length over the runs that measured it.
    cal.skew = {world: tuple((burst, sum(w) / len(w)) for burst, w in sorted(curve.items())) for world, curve in skews.items()}
    return cal


def calibrate(args) -> dict:
    dev = device_lib.detect(os.environ.get("SORA_DIST_DEVICE", "auto"))
    memory_bw = copy_bandwidth(dev)
    results = []
    for i, batch in enumerate(args.batches):
        print(f"calibrate: bench-train {args.preset} latent {args.latent} batch {batch} ({i + 1}/{len(args.batches)})", flush=True)
        bench_args, overrides = bench_train.parse_args(["--preset", args.preset, "--latent", *map(str, args.latent), "--batch", str(batch),
                                                        "--steps", str(args.steps), "--warmup", "2", *args.overrides])
        results.append(bench_train.benchmark(bench_args, overrides))
    rate, overhead = fit_compute(results, memory_bw)
    fresh_write_bw = fresh_write_bandwidth(dev)
    print("calibrate: host work of the TP plan and FSDP2 on one rank", flush=True)
    wrappers = wrapper_host_overhead(args, dev, fresh_write_bw)
    return {"kind": "calibration", "date": time.strftime("%Y-%m-%d %H:%M"), "device": dev.name, "threads": torch.get_num_threads(),
            "flops_rate": rate, "step_overhead_s": overhead, "memory_bw": memory_bw, "fresh_write_bw": fresh_write_bw,
            "wrapper_host_s_per_block": wrappers, "shared_cores": (os.cpu_count() or 1) if dev.kind == "cpu" else 0, "runs": results}


@user_command
def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="sora-dist calibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="S")
    parser.add_argument("--latent", type=positive_int, nargs=3, default=[4, 16, 16], metavar=("T", "H", "W"))
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 2, 4], help="samples per step of the timed runs")
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--out", required=True, help="calibration JSON for sora-dist plan --calibration")
    args, args.overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = calibrate(args)
    Path(args.out).write_text(json.dumps(result, indent=2))
    wrappers = ", ".join(f"{w} {s * 1e3:.1f}" for w, s in result["wrapper_host_s_per_block"].items())
    print(f"achieved {result['flops_rate'] / 1e12:.3f} TFLOP/s, fixed overhead {result['step_overhead_s'] * 1e3:.1f} ms/step, "
          f"copy {result['memory_bw'] / 1e9:.1f} GB/s, wrappers' host work {wrappers} ms per block -> {args.out}")
    return 0


if __name__ == "__main__":
    exit_process(main())
