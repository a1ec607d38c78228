"""Goodput: how much of a run's wall time trained the model, across restarts.

Rank 0 of each attempt (one launch of the trainer; torchrun's restarts and requeued jobs are new
attempts of the same run folder) keeps ``<out_dir>/goodput/attempt-N.json`` up to date at every
log window and checkpoint. It accounts its wall time into

  startup      process start to the first step: imports, process group, health check, build, resume;
  step         optimizer steps, less the time they waited for data;
  data_wait    time the steps waited for their batches;
  checkpoint   time the training loop spent saving (the blocking part of an async save);

and records which step each checkpoint holds, with the step time banked up to it. Across
attempts, the summary adds

  lost         step time of steps that a later attempt redid, because they came after the
               checkpoint it resumed from;
  recovery     the gaps between attempts: failure detection, restart, rendezvous (from the last
               record of one attempt to the start of the next);

and reports goodput = productive step time (step less lost) / wall time since the first attempt
began: the effective training time ratio. A failed attempt is known as of its last record (the
last log window or checkpoint): the steps after it count as recovery, not as lost steps.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from sora_dist.resilience.elastic import restart_counts

CATEGORIES = ("startup", "step", "data_wait", "checkpoint", "sampling")
_IMPORTED_AT = time.time()


def process_start_time() -> float:
    """Unix time this process started (Linux: from /proc, so imports count as start-up)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT


class GoodputLedger:
    """This attempt's account; a no-op where ``enabled`` is false (every rank but 0)."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.dir, self.enabled = Path(out_dir) / "goodput", enabled
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)
        self.banked: dict[str, float] = {}  # checkpointed step -> step time up to it
        self.record: dict = {}
        self.earlier: list[dict] = []
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.attempt = len(list(self.dir.glob("attempt-*.json")))
        self.record = {"attempt": self.attempt, "started_at": process_start_time(), "restart_count": restart_counts()[0],
                       "world_size": int(os.environ.get("WORLD_SIZE", 1)), "resumed_from_step": 0, "first_step_at": None, "last_step": 0}

    def started_training(self, resumed_from_step: int) -> None:
        """Start-up ends here: the first step begins. A fresh start that is no restart (of torchrun or
        SLURM) reuses the folder for a new run: the old attempts go."""
        if not self.enabled:
            return
        if resumed_from_step == 0 and not any(restart_counts()):
            for old in self.dir.glob("attempt-*.json"):
                old.unlink()
            self.attempt = self.record["attempt"] = 0
        self.earlier = read_attempts(self.dir)  # finished attempts: read once, not every log window
        now = time.time()
        self.seconds["startup"] = now - self.record["started_at"]
        self.record.update(resumed_from_step=resumed_from_step, first_step_at=now, last_step=resumed_from_step)
        self.flush()

    def add(self, category: str, seconds: float) -> None:
        self.seconds[category] += seconds

    def stepped(self, step: int) -> None:
        self.record["last_step"] = step

    def checkpointed(self, step: int) -> None:
        """Step ``step`` is in a complete checkpoint: the step time up to it survives a failure."""
        if self.enabled:
            self.banked[str(step)] = self.seconds["step"]
            self.flush()

    def flush(self) -> None:
        """Write this attempt's record atomically."""
        if not self.enabled:
            return
        self.record.update(updated_at=time.time(), seconds=dict(self.seconds), banked=dict(self.banked))
        tmp = self.dir / f"attempt-{self.attempt}.json.tmp"
        tmp.write_text(json.dumps(self.record))
        os.replace(tmp, self.dir / f"attempt-{self.attempt}.json")

    def summary(self) -> Optional[dict]:
        """The run's account so far: the earlier attempts and this one (after ``flush``)."""
        return summarize([*self.earlier, self.record]) if self.enabled and "seconds" in self.record else None


def read_attempts(folder: Path) -> list[dict]:
    """Every attempt's record in a run's goodput folder, oldest first."""
    paths = sorted(Path(folder).glob("attempt-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [json.loads(p.read_text()) for p in paths]


def banked_before(attempt: dict, step: int) -> float:
    """Step time of ``attempt`` that a resume at ``step`` keeps: up to its newest checkpoint <= step."""
    kept = [seconds for saved, seconds in attempt.get("banked", {}).items() if int(saved) <= step]
    return max(kept, default=0.0)


def summarize(attempts: list[dict]) -> dict:
    """Seconds per category over all attempts, goodput, and per-attempt steps lost (pure)."""
    totals = dict.fromkeys((*CATEGORIES, "lost", "recovery"), 0.0)
    steps_lost = []
    for i, attempt in enumerate(attempts):
        for category in CATEGORIES:
            totals[category] += attempt["seconds"].get(category, 0.0)
        if i + 1 < len(attempts):
            following = attempts[i + 1]
            resumed = following["resumed_from_step"]
            totals["lost"] += attempt["seconds"]["step"] - banked_before(attempt, resumed)
            totals["recovery"] += max(0.0, following["started_at"] - attempt["updated_at"])
            steps_lost.append(max(0, attempt["last_step"] - resumed))
    wall = attempts[-1]["updated_at"] - attempts[0]["started_at"]
    productive = totals["step"] - totals["lost"]
    totals["other"] = max(0.0, wall - sum(totals.values()) + totals["lost"])  # lost is part of step
    return {"attempts": len(attempts), "wall_s": wall, "seconds": totals, "productive_s": productive,
            "goodput": productive / wall if wall > 0 else 0.0, "steps_lost": steps_lost}


def format_summary(summary: dict) -> str:
    seconds, wall = summary["seconds"], summary["wall_s"]
    parts = [f"productive steps {summary['productive_s']:.1f} s ({summary['productive_s'] / wall:.1%})"]
    for name in ("lost", "data_wait", "checkpoint", "sampling", "startup", "recovery", "other"):
        parts.append(f"{name.replace('_', ' ')} {seconds[name]:.1f} s ({seconds[name] / wall:.1%})")
    lost = f", steps lost per restart {summary['steps_lost']}" if summary["steps_lost"] else ""
    return (f"goodput {summary['goodput']:.1%} over {wall:.1f} s wall and {summary['attempts']} attempt(s){lost}: "
            + ", ".join(parts))
