"""Run by test_bench_comm.py under torchrun on 2 ranks: bench-comm's rank-skew measurement of bursts
that sleep (no core is shared), where rank 1 sleeps ``extra`` ms longer than rank 0. Writes the
delay and mean wait, in ms, to ``<prefix>.json`` from rank 0."""

import json
import sys
import time

import torch
import torch.distributed as dist

from sora_dist import device as device_lib
from sora_dist.build import stop_distributed
from sora_dist.perf.bench_comm import skew_after

BASE_MS = 10.0


def main(prefix: str, extra_ms: float) -> None:
    dist.init_process_group("gloo")
    dev = device_lib.detect("cpu")
    rank = dist.get_rank()
    tiny = torch.zeros(1)

    def burst():
        time.sleep((BASE_MS + (extra_ms if rank == 1 else 0.0)) / 1e3)

    result = skew_after(burst, lambda: dist.all_reduce(tiny), 0.0, dev, iters=6)
    if rank == 0:
        with open(f"{prefix}.json", "w") as f:
            json.dump({"delay_ms": result["delay_us"] / 1e3, "wait_ms": result["wait_us"] / 1e3}, f)
    stop_distributed()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
