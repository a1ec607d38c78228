"""Step watchdog: a hung step is diagnosed and ended instead of waiting out a timeout.

A rank stuck in a collective (a peer died or stalled), in a deadlocked data loader or in a driver
call makes every rank of the job wait, by default until the process group's timeout, with
nothing in the log. A background thread on every rank watches the step that is running, and the
checkpoint phase and saves after it: when the step has taken longer than the limit
(``fault.step_timeout_s``, or ``fault.step_timeout_factor`` times the median of the recent steps,
never below ``fault.step_timeout_min_s``), or a save longer than the same factor times the median
of the recent saves (never below the same minimum), the rank

- writes the Python stacks of all its threads, the phase of the step it was in and (where the
  process group keeps one: TORCH_FR_BUFFER_SIZE, set by ``start_distributed``) the flight
  recorder's record of its collectives to ``<out_dir>/hangs/rank-R.txt`` and ``rank-R.fr.json``,
- names itself, its host, the step and the phase in the log,
- and exits with ``HANG_EXIT_CODE``, so that torchrun's agent restarts the job from the newest
  checkpoint (``--max-restarts``).

The first rank to fire raises the job's ``HangAlarm`` (a key in the process group's store): every
other rank's watchdog reports and exits on seeing it, whatever its own limit, and every rank
waits for the others' reports before it exits. Without it a waiting rank whose limit came a poll
later saw its collective fail when the first rank exited, and its stacks were lost.

The stalled rank is the one whose stack is not in a collective and whose flight record stops at
an earlier collective than the others'.
"""

from __future__ import annotations

import contextlib
import datetime
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
PEER_REPORT_WAIT_S = 10.0  # how long past its own report a rank waits for every rank's
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


class HangAlarm:
    """One job's hang alarm on a c10d store (``store``: ``set``, ``check``, ``get``, ``wait``)."""

    def __init__(self, store, world_size: int, attempt: int):
        self.store, self.world_size = store, world_size
        self.prefix = f"sora_dist/hang/{attempt}/"  # a restarted job starts with no alarm

    def raise_by(self, rank: int) -> None:
        self._set(self.prefix + "alarm", str(rank))

    def _set(self, key: str, value: str) -> None:
        try:
            self.store.set(key, value)
        except RuntimeError:  # the store is gone (its host died): the report and exit go on
            pass

    def raised_by(self) -> Optional[int]:
        """The rank that raised the alarm, or None (also where the store is gone: the watchdog
        goes on by its own limits)."""
        key = self.prefix + "alarm"
        try:
            return int(self.store.get(key)) if self.store.check([key]) else None
        except RuntimeError:  # DistNetworkError, DistStoreError
            return None

    def reported(self, rank: int) -> None:
        self._set(f"{self.prefix}reported/{rank}", "1")

    def wait_for_reports(self, timeout_s: float) -> None:
        """Until every rank has reported, or ``timeout_s`` (a rank that died reports nothing)."""
        keys = [f"{self.prefix}reported/{rank}" for rank in range(self.world_size)]
        try:
            self.store.wait(keys, datetime.timedelta(seconds=timeout_s))
        except RuntimeError:  # the store's timeout (DistStoreError), or the store is gone
            pass


class StepWatchdog:
    """``begin(step)`` ... ``step_done()`` ... ``end()`` around each iteration of the loop (the step,
    then its checkpoint phase), ``saving()`` around the work of a save; a daemon thread checks
    their age every ``poll_s`` seconds.

    A step's limit is ``limit_s``; the checkpoint phase after it (the stop-signal agreement, the
    check for a due save) counts with the step. A save has its own limit, ``save_limit_s``:
    ``factor`` times the median of the recent saves, never below ``min_s``. The first save of a
    run has no limit here (the collective timeout bounds it): nothing yet says how long it takes."""

    def __init__(self, out_dir: Path, rank: int, timeout_s: float, factor: float, min_s: float, poll_s: float = 1.0,
                 alarm: Optional[HangAlarm] = None):
        self.dir, self.rank, self.alarm = Path(out_dir) / "hangs", rank, alarm
        self.timeout_s, self.factor, self.min_s, self.poll_s = timeout_s, factor, min_s, poll_s
        self.recent: deque[float] = deque(maxlen=RECENT_STEPS)
        self.recent_saves: deque[float] = deque(maxlen=RECENT_STEPS)
        self._step: Optional[int] = None
        self._phase = ""
        self._started = 0.0
        self._save_started: Optional[float] = None
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

    def step_done(self) -> None:
        """The optimizer step is done: its time joins the median; the checkpoint phase follows."""
        if self._step is not None:
            self.recent.append(time.monotonic() - self._started)
        self._phase = "checkpoint phase (stop-signal agreement, saves)"

    def end(self) -> None:
        self._step = None

    @contextlib.contextmanager
    def saving(self):
        """Around a save's work (writing, or finishing a background write): watched with the save limit."""
        started, phase = time.monotonic(), self._phase
        self._save_started, self._phase = started, "checkpoint save"
        try:
            yield
        finally:
            self.recent_saves.append(time.monotonic() - started)
            self._save_started, self._phase = None, phase

    def limit_s(self) -> float:
        """The running step's limit: the absolute one, the relative one, or the smaller of both."""
        limits = [self.timeout_s] if self.timeout_s > 0 else []
        if self.factor > 0 and len(self.recent) >= MIN_STEPS_FOR_MEDIAN:
            limits.append(max(self.min_s, self.factor * statistics.median(self.recent)))
        return min(limits, default=float("inf"))

    def save_limit_s(self) -> float:
        if self.factor <= 0 or not self.recent_saves:
            return float("inf")
        return max(self.min_s, self.factor * statistics.median(self.recent_saves))

    def _running(self) -> Optional[tuple[int, float, float]]:
        """(step, age, limit) of what runs now, or None."""
        step, save_started = self._step, self._save_started
        if save_started is not None:
            return (step or -1), time.monotonic() - save_started, self.save_limit_s()
        if step is None:
            return None
        return step, time.monotonic() - self._started, self.limit_s()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            running = self._running()
            if running is not None and running[1] > running[2]:
                self._report_and_exit(*running)
            fired = self.alarm.raised_by() if self.alarm is not None else None
            if fired is not None:
                self._report_and_exit(*(running or (-2, 0.0, float("inf"))), alarm_from=fired)

    def _report_and_exit(self, step: int, age: float, limit: float, alarm_from: Optional[int] = None) -> None:
        if self.alarm is not None and alarm_from is None:
            self.alarm.raise_by(self.rank)  # the other ranks report too, from where they wait
        host = socket.gethostname()
        self.dir.mkdir(parents=True, exist_ok=True)
        stacks = self.dir / f"rank-{self.rank}.txt"
        what = f"step {step}" if step >= 0 else {-1: "the final save", -2: "between steps"}[step]
        with open(stacks, "w") as f:
            f.write(f"rank {self.rank} on {host} (pid {os.getpid()}): {what} running for {age:.1f} s "
                    f"(limit {limit:.1f} s), phase {self._phase}\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        record = flight_recorder_json()
        if record is not None:
            (self.dir / f"rank-{self.rank}.fr.json").write_bytes(record)
        log.error(
            "step watchdog: rank %d on host %s: %s has run %.1f s (limit %.1f s), in phase %s%s; stacks in %s%s; "
            "exiting with code %d so that the agent restarts the job from the newest checkpoint",
            self.rank, host, what, age, limit, self._phase,
            f" (rank {alarm_from}'s watchdog fired)" if alarm_from is not None else "", stacks,
            " and the flight record beside them" if record is not None else "", HANG_EXIT_CODE,
        )
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        if self.alarm is not None:
            self.alarm.reported(self.rank)
            self.alarm.wait_for_reports(PEER_REPORT_WAIT_S + 2 * self.poll_s)
        os._exit(HANG_EXIT_CODE)
