"""Run by torchrun from the resilience tests: the real trainer with one fault injected into one rank.

  fault_worker.py stall RANK STEP -- TRAIN ARGS     rank RANK hangs in the forward of step STEP
  fault_worker.py stall-save RANK STEP -- TRAIN ARGS  rank RANK hangs while finishing the save of step STEP
  fault_worker.py stall-alarm RANK STEP -- TRAIN ARGS  as stall, and the other ranks' watchdogs have no limit
  fault_worker.py slow RANK -- TRAIN ARGS           rank RANK shares its core with two busy processes
  fault_worker.py slow-link RANKS -- TRAIN ARGS     the health check's collectives are slow on RANKS
  fault_worker.py absent RANK -- TRAIN ARGS         rank RANK never reaches the health check
"""

import multiprocessing
import os
import sys
import time

import sora_dist.resilience.health as health
import sora_dist.trainer as trainer
from sora_dist.checkpoint import CheckpointManager
from sora_dist.cli import main
from sora_dist.console import exit_process
from sora_dist.models import VideoDiT
from sora_dist.resilience.watchdog import StepWatchdog

RANK = int(os.environ["RANK"])


def stall(rank: int, at_step: int) -> None:
    """The model's forward of step ``at_step`` (one micro-batch per step) never returns on ``rank``."""
    original, calls = VideoDiT.forward, [0]

    def forward(self, *args, **kwargs):
        calls[0] += 1
        if RANK == rank and calls[0] == at_step:
            time.sleep(600)  # the watchdog ends this process long before
        return original(self, *args, **kwargs)

    VideoDiT.forward = forward


def unlimited_unless(rank: int) -> None:
    """Every rank but ``rank`` has a watchdog without a limit: it can only report on the alarm."""
    if RANK != rank:
        StepWatchdog.limit_s = StepWatchdog.save_limit_s = lambda self: float("inf")


def stall_save(rank: int, at_step: int) -> None:
    """The save of step ``at_step`` never finishes on ``rank``: its files are written, then it hangs
    before the ranks agree on the manifest (where a frozen peer leaves the others waiting)."""
    original = CheckpointManager._finalize

    def finalize(self, step, writer):
        if RANK == rank and step == at_step:
            time.sleep(600)  # the watchdog ends this process long before
        return original(self, step, writer)

    CheckpointManager._finalize = finalize


def busy() -> None:
    while True:
        pass


def slow(rank: int) -> None:
    cores = sorted(os.sched_getaffinity(0))
    core = cores[RANK % len(cores)]
    os.sched_setaffinity(0, {core})
    if RANK == rank:
        for _ in range(2):
            hog = multiprocessing.Process(target=busy, daemon=True)
            hog.start()
            os.sched_setaffinity(hog.pid, {core})


def slow_link(ranks: set[int]) -> None:
    original = health.collective

    def collective(op, group, nbytes, device):
        run = original(op, group, nbytes, device)
        if RANK not in ranks:
            return run

        def slowed():  # far slower than a crowded CI host's healthy group (50 ms was not, once)
            run()
            time.sleep(0.3)

        return slowed

    health.collective = collective


def absent(rank: int) -> None:
    original = trainer.check_ranks_answer

    def check(timeout_s):
        if RANK == rank:
            time.sleep(3 * timeout_s)
        return original(timeout_s)

    trainer.check_ranks_answer = check


if __name__ == "__main__":
    split = sys.argv.index("--")
    fault, params, train_args = sys.argv[1], sys.argv[2:split], sys.argv[split + 1 :]
    if fault == "stall":
        stall(int(params[0]), int(params[1]))
    elif fault == "stall-alarm":
        stall(int(params[0]), int(params[1]))
        unlimited_unless(int(params[0]))
    elif fault == "stall-save":
        stall_save(int(params[0]), int(params[1]))
    elif fault == "slow":
        slow(int(params[0]))
    elif fault == "slow-link":
        slow_link({int(r) for r in params[0].split(",")})
    elif fault == "absent":
        absent(int(params[0]))
    exit_process(main(["train", *train_args]))
