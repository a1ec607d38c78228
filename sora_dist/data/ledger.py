"""Sample ledger: which samples each optimizer step trained on, per data-parallel rank.

With ``logging.sample_ledger: true`` every data-parallel rank appends one JSON line per step to
``<out_dir>/ledger/attempt-A.dp-R.jsonl``: the step, when it ended (Unix time), the (epoch,
dataset position) of each of its samples and their keys. It answers "which samples were in the
step where the loss spiked" and, across restarts, shows that the data position resumed exactly:
the steps a run kept (those up to the checkpoint each restart resumed from) hold every sample of
an epoch once (resilience/audit.py reads it so).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sora_dist.data.loader import Batch


class SampleLedger:
    def __init__(self, out_dir: Path, attempt: int, dp_rank: int, enabled: bool):
        self._file = None
        if enabled:
            folder = Path(out_dir) / "ledger"
            folder.mkdir(parents=True, exist_ok=True)
            self._file = open(folder / f"attempt-{attempt}.dp-{dp_rank}.jsonl", "a")

    def record(self, step: int, batches: list[Batch]) -> None:
        if self._file is None:
            return
        line = {"step": step, "time": round(time.time(), 3), "samples": [[b.epoch, uid] for b in batches for uid in b.uids],
                "keys": [k for b in batches for k in b.keys]}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_ledger(out_dir: Path) -> dict[int, dict[int, list[dict]]]:
    """attempt -> data-parallel rank -> its step records, from a run folder."""
    ledger: dict[int, dict[int, list[dict]]] = {}
    for path in sorted((Path(out_dir) / "ledger").glob("attempt-*.dp-*.jsonl")):
        attempt, dp = (int(part.split("-")[1]) for part in path.name.removesuffix(".jsonl").split("."))
        ledger.setdefault(attempt, {})[dp] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return ledger
