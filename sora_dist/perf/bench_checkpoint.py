"""Checkpoint benchmark: save and load time and size per rank, and the training-time overhead of
blocking against asynchronous saves, on the real trainer path.

  sora-dist bench-checkpoint [--preset S] [--steps 8] [--json out.json] [--section.key=value ...]
  torchrun --nproc-per-node 2 -m sora_dist.perf.bench_checkpoint --preset S      # per-rank numbers

Three fresh runs of the same config train ``steps`` steps: without checkpoints, and with a save
every steps/2 steps, blocking or asynchronous (the run's final checkpoint is always blocking, so
both pay it; the difference between them is the mid-run save). The overhead is the difference
in wall time against the run without checkpoints. Then a save and a load are timed alone, and
what the checksums cost: the DCP write checksumming its bytes against the same write without (the
fastest of 7 of each, alternating), and verifying a checkpoint's files as a resume does (each
rank checksums its share) against the whole load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from sora_dist import device as device_lib
from sora_dist.config import load_config
from sora_dist.console import CommandParser, exit_process, positive_int, user_command
from sora_dist.data import make_synthetic
from sora_dist.build import start_distributed, stop_distributed
from sora_dist.checkpoint.files import HashingWriter, verify_share
from sora_dist.trainer import build_run, run_loop, stop_signals

log = logging.getLogger("sora_dist")


def _timed_run(overrides: list[str], dev, world_size: int, rank: int) -> tuple[float, object]:
    run, _ = build_run(load_config(None, overrides), dev, world_size, rank)
    run.batches = iter(run.loader)
    next(run.batches)  # start the data workers before the clock
    start = time.perf_counter()
    with stop_signals() as stop:
        run_loop(run, stop)
    seconds = time.perf_counter() - start
    run.guard.close(finished=False)
    return seconds, run


def _rank_bytes(step_dir: Path, rank: int) -> int:
    return sum(p.stat().st_size for p in step_dir.glob(f"__{rank}_*.distcp"))


def benchmark(preset: str, steps: int, extra: list[str], workdir: Path) -> dict:
    dev = device_lib.detect("auto")
    world_size, rank = start_distributed(dev)
    data = workdir / "data"
    if rank == 0 and not data.exists():
        make_synthetic(data, num_samples=256, seed=0)
    if world_size > 1:
        dist.barrier()
    base = [
        f"--model.preset={preset}", f"--data.path={data}", "--data.num_workers=1", "--data.tokens_per_batch=256",
        f"--train.steps={steps}", "--logging.log_every=1000", "--logging.tensorboard=false", "--checkpoint.save_final=false",
        "--checkpoint.resume=none", "--checkpoint.keep_last=0", *extra,
    ]
    results = {"preset": preset, "steps": steps, "world_size": world_size, "device": dev.name}
    variants = {"none": [], "blocking": [f"--checkpoint.every_steps={steps // 2}", "--checkpoint.async_save=false"], "async": [f"--checkpoint.every_steps={steps // 2}", "--checkpoint.async_save=true"]}
    for name, flags in variants.items():
        out = workdir / name
        results[f"train_s_{name}"], _ = _timed_run(base + [f"--train.out_dir={out}", *flags], dev, world_size, rank)
    step_dir = workdir / "blocking" / "checkpoints" / f"step-{steps // 2}"
    results["bytes_per_rank"] = _rank_bytes(step_dir, rank)
    results["bytes_total"] = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
    # Save time alone, then load time, on a fresh run of the same layout.
    run, _ = build_run(load_config(None, base + [f"--train.out_dir={workdir / 'timing'}"]), dev, world_size, rank)
    start = time.perf_counter()
    path = run.ckpt.save(steps, run.state, run.cfg, blocking=True)
    results["save_s"] = time.perf_counter() - start
    results.update(_checksum_costs(run, path, workdir / "timing", world_size, rank))
    start = time.perf_counter()
    assert run.ckpt.load(path, run.state) is None
    results["load_s"] = time.perf_counter() - start
    results["overhead_blocking_s"] = results["train_s_blocking"] - results["train_s_none"]
    results["overhead_async_s"] = results["train_s_async"] - results["train_s_none"]
    stop_distributed()
    return results


def _checksum_costs(run, path: Path, workdir: Path, world_size: int, rank: int, rounds: int = 7) -> dict:
    """The DCP write with and without checksumming its bytes (alternating ``rounds`` of each; the
    fastest of each, the least disturbed on a busy machine), and verifying a checkpoint's files
    (each rank its share, as a resume does)."""
    timings: dict[bool, list[float]] = {True: [], False: []}
    for i in range(rounds):
        for hashed in (True, False) if i % 2 == 0 else (False, True):
            target = workdir / f"write-{'hashed' if hashed else 'plain'}-{i}"
            writer = HashingWriter(str(target)) if hashed else dcp.FileSystemWriter(str(target))
            _barrier(world_size)
            start = time.perf_counter()
            dcp.save(run.state.dcp_state_dict(), storage_writer=writer)
            _barrier(world_size)
            timings[hashed].append(time.perf_counter() - start)
    _barrier(world_size)
    start = time.perf_counter()
    problems = verify_share(path, rank, world_size)
    _barrier(world_size)
    assert not problems, problems
    return {"write_hashed_s": min(timings[True]), "write_plain_s": min(timings[False]),
            "write_hashed_rounds_s": timings[True], "write_plain_rounds_s": timings[False], "verify_s": time.perf_counter() - start}


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def print_table(r: dict) -> None:
    mib = 2**20
    print(f"\ncheckpoint benchmark: preset {r['preset']}, {r['world_size']} rank(s), {r['device']}, {r['steps']} steps per run")
    rows = [
        ("size per rank", f"{r['bytes_per_rank'] / mib:.1f} MiB"),
        ("size in total", f"{r['bytes_total'] / mib:.1f} MiB"),
        ("blocking save", f"{r['save_s']:.2f} s"),
        ("  of it, DCP write", f"{r['write_hashed_s']:.3f} s checksumming its bytes, {r['write_plain_s']:.3f} s without "
                               f"({r['write_hashed_s'] / r['write_plain_s'] - 1:+.1%}; fastest of 7 each, alternating; without: "
                               f"{min(r['write_plain_rounds_s']):.2f}-{max(r['write_plain_rounds_s']):.2f} s)"),
        ("load (reshard-capable)", f"{r['load_s']:.2f} s, of which verifying the checksums {r['verify_s']:.3f} s"),
        ("train, no checkpoint", f"{r['train_s_none']:.2f} s"),
        ("train, blocking saves", f"{r['train_s_blocking']:.2f} s  (+{r['overhead_blocking_s']:.2f} s: mid-run + final save)"),
        ("train, async mid-run save", f"{r['train_s_async']:.2f} s  (+{r['overhead_async_s']:.2f} s: mid-run async + final save)"),
    ]
    for name, value in rows:
        print(f"  {name:<26} {value}")


@user_command
def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="sora-dist bench-checkpoint", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="S")
    parser.add_argument("--steps", type=positive_int, default=8)
    parser.add_argument("--json", default="", help="also write the numbers to this JSON file")
    parser.add_argument("--workdir", default="runs/bench_checkpoint", help="shared by all ranks; its run folders are replaced")
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(args.workdir)
    if int(os.environ.get("RANK", "0")) == 0:
        for name in ("none", "blocking", "async", "timing"):
            shutil.rmtree(workdir / name, ignore_errors=True)
    results = benchmark(args.preset, args.steps, extra, workdir)
    if int(os.environ.get("RANK", "0")) == 0:
        print_table(results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    exit_process(main())
