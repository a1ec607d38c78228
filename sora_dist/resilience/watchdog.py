"""Step watchdog: a hung step is diagnosed and ended instead of waiting out a timeout.

A rank stuck in a collective (a peer died or stalled), in a deadlocked data loader or in a driver
call makes every rank of the job wait, by default until the process group's timeout, with
nothing in the log. A background thread on every rank watches the step that is running: when it
has taken longer than the limit (``fault.step_timeout_s``, or ``fault.step_timeout_factor`` times
the median of the recent steps, never below ``fault.step_timeout_min_s``), the rank

- writes the Python stacks of all its threads, the phase of the step it was in and (where the
  process group keeps one: TORCH_FR_BUFFER_SIZE, set by ``start_distributed``) the flight
  recorder's record of its collectives to ``<out_dir>/hangs/rank-R.txt`` and ``rank-R.fr.json``,
- names itself, its host, the step and the phase in the log,
- and exits with ``HANG_EXIT_CODE``, so that torchrun's agent restarts the job from the newest
  checkpoint (``--max-restarts``).

The stalled rank is the one whose stack is not in a collective and whose flight record stops at
an earlier collective than the others'.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import statistics
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional

log = logging.getLogger("sora_dist")

HANG_EXIT_CODE = 75
RECENT_STEPS = 50  # the median of this many recent steps sets the relative limit
MIN_STEPS_FOR_MEDIAN = 5


def flight_recorder_json() -> Optional[bytes]:
    """The process group's flight record (recent collectives and their states), if it keeps one."""
    try:
        import torch._C._distributed_c10d as c10d
    except ImportError:
        return None
    dump = getattr(c10d, "_dump_fr_trace_json", None) or getattr(c10d, "_dump_nccl_trace_json", None)
    if dump is None:
        return None
    try:
        return dump(True, False)
    except Exception:  # noqa: BLE001 - a diagnostic must never hide the hang it reports
        return None


class StepWatchdog:
    """``begin(step)`` / ``phase(name)`` / ``end()`` around each step; a daemon thread checks the
    running step's age every ``poll_s`` seconds."""

    def __init__(self, out_dir: Path, rank: int, timeout_s: float, factor: float, min_s: float, poll_s: float = 1.0):
        self.dir, self.rank = Path(out_dir) / "hangs", rank
        self.timeout_s, self.factor, self.min_s, self.poll_s = timeout_s, factor, min_s, poll_s
        self.recent: deque[float] = deque(maxlen=RECENT_STEPS)
        self._step: Optional[int] = None
        self._phase = ""
        self._started = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0 or self.factor > 0

    def start(self) -> "StepWatchdog":
        if self.enabled:
            self._thread = threading.Thread(target=self._watch, name="sora-dist-step-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def begin(self, step: int) -> None:
        self._step, self._phase, self._started = step, "start", time.monotonic()

    def phase(self, name: str) -> None:
        """Where in the step this rank is (data, forward/backward, optimizer, ...), for the report."""
        self._phase = name

    def end(self) -> None:
        if self._step is not None:
            self.recent.append(time.monotonic() - self._started)
        self._step = None

    def limit_s(self) -> float:
        """The running step's limit: the absolute one, the relative one, or the smaller of both."""
        limits = [self.timeout_s] if self.timeout_s > 0 else []
        if self.factor > 0 and len(self.recent) >= MIN_STEPS_FOR_MEDIAN:
            limits.append(max(self.min_s, self.factor * statistics.median(self.recent)))
        return min(limits, default=float("inf"))

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            step = self._step
            if step is None:
                continue
            age = time.monotonic() - self._started
            if age > self.limit_s():
                self._report_and_exit(step, age)

    def _report_and_exit(self, step: int, age: float) -> None:
        host = socket.gethostname()
        self.dir.mkdir(parents=True, exist_ok=True)
        stacks = self.dir / f"rank-{self.rank}.txt"
        with open(stacks, "w") as f:
            f.write(f"rank {self.rank} on {host} (pid {os.getpid()}): step {step} running for {age:.1f} s "
                    f"(limit {self.limit_s():.1f} s), phase {self._phase}\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        record = flight_recorder_json()
        if record is not None:
            (self.dir / f"rank-{self.rank}.fr.json").write_bytes(record)
        log.error(
            "step watchdog: rank %d on host %s: step %d has run %.1f s (limit %.1f s), in phase %s; stacks in %s%s; "
            "exiting with code %d so that the agent restarts the job from the newest checkpoint",
            self.rank, host, step, age, self.limit_s(), self._phase, stacks,
            " and the flight record beside them" if record is not None else "", HANG_EXIT_CODE,
        )
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        os._exit(HANG_EXIT_CODE)
