"""Split each Ulysses all-to-all of a real bench-train step into waiting for the peers and the
transfer itself, on every rank: a barrier on the all-to-all's group goes first (the time in it
is how long this rank waited for the last one to arrive), then the all-to-all as training runs it.
The barrier adds one small collective per all-to-all, so the step itself is slower than without.

  OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 \\
      scripts/probe_ulysses_waits.py --preset debug --model.hidden_size=256 --model.depth=4 \\
      --model.num_heads=8 --latent 4 32 32 --batch 4 --steps 5 --warmup 2 --parallel.sp_ulysses=2

Takes bench-train's arguments; each rank prints the median and mean per all-to-all, and the
number per step, over every step (warm-up included) after the first.
"""

import os
import statistics
import sys
import time

import torch.distributed as dist

from sora_dist.console import exit_process
from sora_dist.parallel import sequence
from sora_dist.perf import bench_train

waits: list[float] = []
transfers: list[float] = []
unprobed_all_to_all = sequence._all_to_all


def probed_all_to_all(x, group):
    start = time.perf_counter()
    dist.barrier(group=group)
    arrived = time.perf_counter()
    out = unprobed_all_to_all(x, group)
    waits.append(arrived - start)
    transfers.append(time.perf_counter() - arrived)
    return out


def report(steps: int) -> None:
    per_step = len(waits) // steps
    kept = slice(per_step, None)  # the first step's all-to-alls also set up the groups
    ms = [f"{name} median {statistics.median(v[kept]) * 1e3:.2f} ms, mean {statistics.mean(v[kept]) * 1e3:.2f} ms"
          for name, v in (("waiting for the peers", waits), ("all-to-all", transfers))]
    print(f"rank {os.environ.get('RANK')}: {per_step} all-to-alls a step; per all-to-all: " + "; ".join(ms), flush=True)


if __name__ == "__main__":
    sequence._all_to_all = probed_all_to_all
    args, _ = bench_train.parse_args(sys.argv[1:])
    code = bench_train.main(sys.argv[1:])
    report(args.warmup + args.steps)
    exit_process(code)
