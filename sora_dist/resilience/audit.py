"""What a run trained, read from its own records across every attempt: the sample ledger (each
optimizer step's samples, per data-parallel rank) and the goodput records (which step each
attempt resumed from).

A step of one attempt counts (is *kept*) when it is at or before the step the next attempt
resumed from; the steps after it were lost with the failure and trained again. Over the kept
steps, every sample of an epoch must appear exactly once: ``epoch_coverage`` counts those that
appear once, more often, or never.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from sora_dist.data.ledger import read_ledger
from sora_dist.resilience.goodput import read_attempts


def kept_samples(run: Path) -> tuple[list[tuple[int, int]], dict[int, int]]:
    """(epoch, dataset position) of every sample in a kept step, and per data-parallel rank the
    number of its step records that a later attempt redid."""
    ledger, attempts = read_ledger(run), read_attempts(Path(run) / "goodput")
    kept, redone = [], {}
    for i, attempt in enumerate(attempts):
        limit = attempts[i + 1]["resumed_from_step"] if i + 1 < len(attempts) else float("inf")
        for dp_rank, records in ledger.get(attempt["attempt"], {}).items():
            for record in records:
                if record["step"] <= limit:
                    kept += [tuple(sample) for sample in record["samples"]]
                else:
                    redone[dp_rank] = redone.get(dp_rank, 0) + 1
    return kept, redone


def epoch_coverage(kept: list[tuple[int, int]], epoch: int, num_samples: int) -> dict[str, list[int]]:
    """The dataset positions of ``epoch`` that the kept steps trained once, more than once, or never."""
    counts = Counter(uid for e, uid in kept if e == epoch)
    return {
        "once": [uid for uid in range(num_samples) if counts[uid] == 1],
        "repeated": [uid for uid in range(num_samples) if counts[uid] > 1],
        "never": [uid for uid in range(num_samples) if counts[uid] == 0],
    }


def last_step(run: Path) -> int:
    """The highest step any data-parallel rank has recorded in the ledger, over all attempts."""
    ledger = read_ledger(run)
    return max((r["step"] for ranks in ledger.values() for records in ranks.values() for r in records), default=0)
