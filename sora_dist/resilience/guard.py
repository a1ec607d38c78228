"""The fault-tolerance pieces a training run carries, behind the few calls the loop makes.

  guard = FaultGuard.build(cfg, dev, dims, dp_rank, rank)   # watchdog, straggler monitor, goodput, ledger
  guard.begin_step(step) ... guard.waited(s) ... guard.end_step(step, batches)
  with guard.saving(): ckpt.save(...)                # checkpoint time; the manager calls watching_save
  guard.end_iteration()
  guard.window(values, steps)                        # per log window: stragglers, goodput
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from sora_dist.data.ledger import SampleLedger
from sora_dist.resilience.goodput import GoodputLedger, format_summary
from sora_dist.resilience.stragglers import StragglerMonitor
from sora_dist.resilience.elastic import restart_counts
from sora_dist.resilience.watchdog import HangAlarm, StepWatchdog

log = logging.getLogger("sora_dist")


def shared_attempt(goodput: GoodputLedger) -> int:
    """Rank 0's attempt number, on every rank."""
    value = [goodput.record.get("attempt", 0)]
    if dist.is_initialized():
        dist.broadcast_object_list(value, src=0)
    return value[0]


def hang_alarm() -> Optional[HangAlarm]:
    """The job's hang alarm on the process group's store, where there are several ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return HangAlarm(dist.distributed_c10d._get_default_store(), dist.get_world_size(), restart_counts()[0])


class FaultGuard:
    def __init__(self, watchdog: StepWatchdog, stragglers: Optional[StragglerMonitor], goodput: GoodputLedger, ledger: SampleLedger):
        self.watchdog, self.stragglers, self.goodput, self.ledger = watchdog, stragglers, goodput, ledger
        self._step_started = 0.0
        self._waited = 0.0
        self._window_step_s = 0.0

    @staticmethod
    def build(cfg, dev, dims, dp_rank: int, rank: int) -> "FaultGuard":
        f, out_dir = cfg.fault, Path(cfg.train.out_dir)
        goodput = GoodputLedger(out_dir, enabled=rank == 0)
        # The ranks of one SP x TP group train the same samples: the first of them keeps the record
        # (the mesh lays ranks out with SP and TP innermost).
        first_of_group = rank % (dims.sp * dims.tp) == 0
        ledger = SampleLedger(out_dir, shared_attempt(goodput), dp_rank, enabled=cfg.logging.sample_ledger and first_of_group)
        watchdog = StepWatchdog(out_dir, rank, f.step_timeout_s, f.step_timeout_factor, f.step_timeout_min_s, alarm=hang_alarm()).start()
        return FaultGuard(watchdog, StragglerMonitor.build(dev, f.straggler_threshold, f.probe_ms), goodput, ledger)

    def started(self, resumed_from_step: int) -> None:
        self.goodput.started_training(resumed_from_step)

    def begin_step(self, step: int) -> None:
        self.watchdog.begin(step)
        self._step_started, self._waited = time.perf_counter(), 0.0

    def phase(self, name: str) -> None:
        self.watchdog.phase(name)

    def waited(self, seconds: float) -> None:
        """Time this step spent waiting for a batch."""
        self._waited += seconds

    def end_step(self, step: int, batches) -> None:
        """The optimizer step is done (its checkpoint phase follows, until ``end_iteration``)."""
        elapsed = time.perf_counter() - self._step_started
        self.watchdog.step_done()
        self.goodput.add("step", elapsed - self._waited)
        self.goodput.add("data_wait", self._waited)
        self.goodput.stepped(step)
        self._window_step_s += elapsed
        self.ledger.record(step, batches)

    def end_iteration(self) -> None:
        """The step and its checkpoint phase are over: nothing is watched until the next step."""
        self.watchdog.end()

    @contextlib.contextmanager
    def saving(self):
        """Around the loop's checkpoint calls: their time is checkpoint time."""
        with self.accounted("checkpoint"):
            yield

    def watching_save(self):
        """Around a save's own work (the checkpoint manager calls it): the watchdog's save limit applies."""
        return self.watchdog.saving()

    @contextlib.contextmanager
    def accounted(self, category: str):
        """Time spent inside counts as ``category`` in the goodput ledger (checkpoint, sampling)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.goodput.add(category, time.perf_counter() - start)

    def checkpointed(self, step: int) -> None:
        self.goodput.checkpointed(step)

    def window(self, steps: int, wait_s: float) -> dict:
        """Per log window (every rank): per-rank straggler figures and the run's goodput so far."""
        step_s = self._window_step_s / max(1, steps)
        self._window_step_s = 0.0
        record = self.stragglers.window(wait_s / max(1, steps), step_s) if self.stragglers is not None else {}
        self.goodput.flush()
        summary = self.goodput.summary()
        if summary is not None:
            record["goodput"] = round(summary["goodput"], 4)
        return record

    def close(self, finished: bool) -> None:
        self.watchdog.stop()
        self.ledger.close()
        self.goodput.flush()
        summary = self.goodput.summary()
        if summary is not None and finished:
            log.info(format_summary(summary))
