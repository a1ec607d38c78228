"""Rank-0 metrics: a progress line with ETA, a JSONL record per log step, TensorBoard events."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("sora_dist")


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class ProgressLine:
    """``progress(done, total)`` callback that logs a line with ETA about every tenth of the work."""

    def __init__(self, label: str, parts: int = 10):
        self.label, self.parts = label, parts
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if done != total and done % max(1, total // self.parts):
            return
        elapsed = time.perf_counter() - self.start
        log.info("%s: %d/%d (%.0f%%) | elapsed %s | ETA %s", self.label, done, total, 100 * done / total,
                 format_duration(elapsed), format_duration(elapsed / done * (total - done)))


class MetricsLogger:
    def __init__(self, out_dir: Path, total_steps: int, tensorboard: bool, enabled: bool = True):
        self.enabled, self.total_steps = enabled, total_steps
        self.start = time.perf_counter()
        self.start_step = 0  # a resumed run's ETA counts only the steps this process ran
        self.history: list[dict] = []
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        self._jsonl = open(out_dir / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tb"))

    def resumed_at(self, step: int) -> None:
        """Time from here on belongs to the steps after ``step`` (ETA after a resume)."""
        self.start, self.start_step = time.perf_counter(), step

    def note(self, message: str) -> None:
        """A one-off line on rank 0 (e.g. memory facts known only after the first step)."""
        if self.enabled:
            log.info(message)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        self.history.append(record)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):  # per-rank lists stay in metrics.jsonl
                    self._tb.add_scalar(f"train/{key}", value, step)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(1, step - self.start_step) * (self.total_steps - step)
        mfu = f"{values['mfu']:.1%}" if "mfu" in values else "n/a"
        goodput = f"{values['goodput']:.1%}" if "goodput" in values else "n/a"
        log.info(
            "step %d/%d | loss %.4f | grad norm %.3f | lr %.2e | %.1f samples/s | %.0f tokens/s | MFU %s | "
            "data wait %.1f%% | mem %.2f GiB | goodput %s | elapsed %s | ETA %s",
            step, self.total_steps, values["loss"], values["grad_norm"], values["lr"], values["samples_per_s"],
            values["tokens_per_s"], mfu, 100 * values["data_wait_frac"], values.get("mem_peak_gib", 0.0), goodput,
            format_duration(elapsed), format_duration(eta),
        )

    def image(self, tag: str, png: Path, step: int) -> None:
        """A saved picture (e.g. a frame grid of samples) into TensorBoard."""
        if self._tb is not None:
            import matplotlib.image

            self._tb.add_image(tag, matplotlib.image.imread(str(png))[..., :3], step, dataformats="HWC")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_history(path: Path) -> list[dict]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def summarize(history: list[dict], window: Optional[int] = None) -> dict[str, float]:
    """Mean loss of the first and last ``window`` records (default: a tenth of the run)."""
    window = window or max(1, len(history) // 10)
    first = [r["loss"] for r in history[:window]]
    last = [r["loss"] for r in history[-window:]]
    return {"first_loss": sum(first) / len(first), "last_loss": sum(last) / len(last), "records": len(history)}
