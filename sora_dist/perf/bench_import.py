"""Wan import benchmark: the peak resident memory of each rank while it imports a diffusers Wan
folder onto an FSDP layout, against the model's size, and the time the import takes.

  torchrun --nproc-per-node 4 -m sora_dist.perf.bench_import --depth 12 --json import.json

Rank 0 first writes a random Wan-layout model (the 1.3B model's width, ``--depth`` blocks) as a
diffusers folder of ``--file-mib`` safetensors files, tensor by tensor (so the writer never holds
the model either), unless the folder is there. Each rank then records its resident memory before
materializing the model (the fixed overhead: the interpreter, torch, FSDP's modules, the process
group, the model built on the meta device and sharded over every rank with FSDP2), materializes
its shards, and imports the folder with ``sora_dist.interop.load.load_wan``. The figure that matters is each
rank's peak above that overhead against the model's fp32 size: a rank holds its 1/N of the
weights plus the slice being read, never the whole model.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sora_dist import device as device_lib
from sora_dist.build import start_distributed, stop_distributed
from sora_dist.config import ModelConfig, ParallelConfig, resolve_model_config
from sora_dist.console import CommandParser, exit_process, human_bytes, positive_int, user_command
from sora_dist.interop.export import write_diffusers
from sora_dist.interop.load import load_wan
from sora_dist.models import VideoDiT, count_parameters
from sora_dist.parallel import apply_fsdp, build_mesh, materialize, resolve_dims
from sora_dist.perf.output import report_on_rank_zero


def current_rss() -> int:
    """This process's resident bytes now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's peak resident bytes so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_random_wan(model_cfg, folder: Path, file_bytes: int) -> None:
    """A random Wan folder for ``model_cfg``, generated and written one file's tensors at a time."""
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in VideoDiT(model_cfg).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    write_diffusers(lambda names: {n: torch.randn(shapes[n], generator=generator) * 0.02 for n in names},
                    model_cfg, folder, torch.float32, file_bytes)


def benchmark(args) -> dict:
    dev = device_lib.detect("cpu")
    world_size, rank = start_distributed(dev)
    model_cfg = resolve_model_config(ModelConfig(preset="wan2.1-t2v-1.3b", depth=args.depth), 16, 4096)
    folder = Path(args.folder)
    if rank == 0 and not (folder / "config.json").is_file():
        print(f"bench-import: writing a random {count_parameters(model_cfg) / 1e9:.2f}B-parameter Wan folder to {folder}", flush=True)
        writer = multiprocessing.get_context("spawn").Process(target=write_random_wan, args=(model_cfg, folder, args.file_mib * 2**20))
        writer.start()  # in a child process: its memory is not this rank's peak
        writer.join()
        if writer.exitcode != 0:
            raise RuntimeError(f"writing the Wan folder {folder} failed (exit code {writer.exitcode})")
    if world_size > 1:
        dist.barrier()
    parallel = ParallelConfig()
    dims = resolve_dims(parallel, world_size, model_cfg)
    with torch.device("meta"):
        model = VideoDiT(model_cfg)
    if world_size > 1:
        apply_fsdp(model, build_mesh(dims, "cpu"), dims, None, True)
    from safetensors import safe_open  # noqa: F401 - imported before the overhead is measured, as FSDP's modules are

    overhead = current_rss()  # everything but the weights: interpreter, torch, FSDP, the process group
    materialize(model, torch.device("cpu"))
    before_load = current_rss()
    start = time.perf_counter()
    load_wan(model, folder)
    seconds = time.perf_counter() - start
    mine = {"rank": rank, "overhead": overhead, "before_load": before_load, "peak": peak_rss(), "seconds": seconds}
    everyone = [mine]
    if world_size > 1:
        everyone = [None] * world_size
        dist.all_gather_object(everyone, mine)
    model_bytes = 4 * count_parameters(model_cfg)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    stop_distributed()
    return {"world_size": world_size, "parameters": count_parameters(model_cfg), "model_bytes": model_bytes,
            "files": len(files), "ranks": everyone}


def print_result(result: dict) -> None:
    size = result["model_bytes"]
    print(f"imported a {result['parameters'] / 1e9:.2f}B-parameter Wan model ({human_bytes(size)} in fp32, {result['files']} files) "
          f"on {result['world_size']} ranks with FSDP")
    print(f"{'rank':>4} {'overhead':>10} {'before load':>12} {'peak':>10} {'peak - overhead':>16} {'of model':>9} {'seconds':>8}")
    for r in result["ranks"]:
        above = r["peak"] - r["overhead"]
        print(f"{r['rank']:>4} {human_bytes(r['overhead']):>10} {human_bytes(r['before_load']):>12} {human_bytes(r['peak']):>10} "
              f"{human_bytes(above):>16} {above / size:>9.1%} {r['seconds']:>8.1f}")
    print("overhead: resident memory before the weights exist (interpreter, torch, FSDP, the process group, the meta model)")


@user_command
def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="sora-dist bench-import", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=positive_int, default=12, help="blocks of the 1.3B model's width (12: 2.3 GiB in fp32)")
    parser.add_argument("--folder", default="runs/bench_import/wan", help="the Wan folder; written first if absent")
    parser.add_argument("--file-mib", type=positive_int, default=512, help="largest safetensors file written, MiB")
    parser.add_argument("--json", default="", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    report_on_rank_zero(benchmark(args), print_result, args.json)
    return 0


if __name__ == "__main__":
    exit_process(main())
