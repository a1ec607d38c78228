"""Run by test_bench_comm.py under torchrun on 2 ranks: bench-comm's rank-skew measurement of bursts
that sleep (no core is shared), where one rank sleeps ``extra`` ms longer than the other: rank 1 at
every burst (``persistent``) or the ranks in turn (``alternating``). Writes the delay and mean
wait, in ms, to ``<prefix>.json`` from rank 0."""

import json
import sys
import time

import torch
import torch.distributed as dist

from sora_dist import device as device_lib
from sora_dist.build import stop_distributed
from sora_dist.perf.bench_comm import skew_after
from sora_dist.console import exit_process

BASE_MS = 10.0


def main(prefix: str, extra_ms: float, late: str) -> None:
    dist.init_process_group("gloo")
    dev = device_lib.detect("cpu")
    rank = dist.get_rank()
    tiny = torch.zeros(1)
    bursts = 0

    def burst():
        nonlocal bursts
        late_rank = 1 if late == "persistent" else bursts % 2
        bursts += 1
        time.sleep((BASE_MS + (extra_ms if rank == late_rank else 0.0)) / 1e3)

    result = skew_after(burst, lambda: dist.all_reduce(tiny), 0.0, dev, iters=6, rounds=5)  # the median round: one slow spell on a crowded host moves one round
    if rank == 0:
        with open(f"{prefix}.json", "w") as f:
            json.dump({"delay_ms": result["delay_us"] / 1e3, "wait_ms": result["wait_us"] / 1e3}, f)
    stop_distributed()


if __name__ == "__main__":
    exit_process(main(sys.argv[1], float(sys.argv[2]), sys.argv[3]))
