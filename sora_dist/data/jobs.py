"""What the offline data jobs (``encode``, ``curate``, ``caption``) share: ranks under torchrun,
a job fingerprint that a restart must match, and a progress line with rate and ETA.

Each job cuts its inputs into units (chunks or source files); unit i belongs to rank
i % world_size, and a finished unit leaves a small record, written atomically, that a restarted
job skips. Only barriers cross ranks, so the process group is gloo on every device, with a
timeout long enough for a week-long job.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from sora_dist.errors import ConfigError

log = logging.getLogger("sora_dist")


def join_ranks() -> tuple[int, int]:
    """(rank, world size), starting a gloo group when torchrun launched several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return (dist.get_rank() if dist.is_initialized() else 0), world


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def leave_ranks() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_job(state: Path, fingerprint: dict[str, Any], rank: int, record: bool = True) -> None:
    """A restart with other settings or inputs than ``state/job.json`` stops. With ``record``,
    rank 0 writes the file if it is missing (call it again so once the models have loaded: a job
    whose model failed to load must not claim the folder)."""
    job = state / "job.json"
    if job.is_file():
        previous = json.loads(job.read_text())
        if previous != fingerprint:
            changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
            raise ConfigError(f"{state} holds a job with other settings or inputs ({', '.join(changed)}): "
                              "use a new --out, or delete it to start over")
    elif rank == 0 and record:
        tmp = job.with_suffix(".tmp")
        tmp.write_text(json.dumps(fingerprint, indent=1))
        os.replace(tmp, job)


class Progress:
    """A log line about every ``every`` seconds: units done, rate, ETA and what the caller adds."""

    def __init__(self, job: str, total: int, unit: str, every: float = 10.0):
        self.job, self.total, self.unit, self.every = job, total, unit, every
        self.started = self.last = time.monotonic()

    def update(self, done: int, extra: str = "") -> None:
        now = time.monotonic()
        if now - self.last < self.every and done < self.total:
            return
        self.last = now
        rate = done / (now - self.started) if now > self.started else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        log.info("%s: %d/%d %s, %.2f %s/s, ETA %.0f s%s", self.job, done, self.total, self.unit, rate, self.unit, eta, f", {extra}" if extra else "")
