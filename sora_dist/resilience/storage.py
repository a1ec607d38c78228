"""Folders a run writes, checked before training starts.

A run folder or checkpoint folder that cannot be written (read-only mount, a parent that is a
file or does not exist on one node, a full disk) would otherwise surface as a bare OSError at
the first save, hours in. Every rank checks the folders it writes to (every rank writes its own
checkpoint shards, so a node without the shared mount is found too), and the ranks agree, so
that all of them stop with the same message naming the folder, the host and the fix.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from sora_dist.checkpoint.manager import checkpoint_size, finished_checkpoints, is_complete
from sora_dist.console import human_bytes
from sora_dist.errors import ConfigError

# Room beyond the checkpoints' own bytes (an estimate before the first one is written).
FREE_SPACE_MARGIN = 1.1


def write_problem(folder: Path, key: str) -> Optional[str]:
    """Why ``folder`` (config key ``key``) cannot be created and written here, or None."""
    probe = folder / f".write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        return f"{key}={folder} is not writable on host {socket.gethostname()}: {err.strerror or err} ({type(err).__name__})"
    return None


def space_problem(folder: Path, key: str, needed_bytes: int, what: str) -> Optional[str]:
    """Why ``folder`` has too little free space for ``needed_bytes`` more (``what`` says for what), or None."""
    free = shutil.disk_usage(folder).free
    if free >= needed_bytes * FREE_SPACE_MARGIN:
        return None
    return (f"{key}={folder} has {human_bytes(free)} free on host {socket.gethostname()}, but {what} takes "
            f"{human_bytes(needed_bytes)} (+{FREE_SPACE_MARGIN - 1:.0%} margin)")


def agree_or_raise(problems: list[str], fix: str) -> None:
    """Every rank raises the same ConfigError if any rank found a problem (a collective)."""
    if dist.is_available() and dist.is_initialized():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, problems)
        problems = [f"rank {rank}: {p}" for rank, mine in enumerate(gathered) for p in mine]
    if problems:
        unique = list(dict.fromkeys(problems))
        shown = "; ".join(unique[:4]) + (f"; and {len(unique) - 4} more" if len(unique) > 4 else "")
        raise ConfigError(f"{shown}. {fix}")


def check_run_folders(out_dir: Path, checkpoint_dir: Path, checkpointing: bool) -> None:
    """Every rank: the run folder and (when checkpoints are saved) the checkpoint folder are writable."""
    problems = [p for p in (write_problem(out_dir, "train.out_dir"),) if p]
    if checkpointing and not problems:
        problems += [p for p in (write_problem(checkpoint_dir, "checkpoint.dir"),) if p]
    agree_or_raise(problems, "Choose folders every node can write (a shared file system for checkpoint.dir), "
                             "e.g. --train.out_dir=/shared/runs/NAME")


def check_checkpoint_space(checkpoint_dir: Path, estimated_bytes: int, keep_last: int) -> None:
    """Rank 0's view of the shared checkpoint folder: room for what the run will keep there. A save
    writes the new checkpoint before the oldest is pruned, so with keep_last K the folder holds
    K + 1 checkpoints at its fullest. One checkpoint's size is the newest one's there, else
    ``estimated_bytes``."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    problem = None
    if rank == 0:
        existing = [p for p in finished_checkpoints(checkpoint_dir) if is_complete(p)[0]]
        size = checkpoint_size(existing[-1]) if existing else estimated_bytes
        more = max(1, keep_last + 1 - len(existing)) if keep_last > 0 else 1
        what = (f"with checkpoint.keep_last={keep_last} the run keeps {keep_last} checkpoints and writes one more before pruning "
                f"({len(existing)} there now), so {more} more of {human_bytes(size)} each" if keep_last > 0 else "one more checkpoint")
        problem = space_problem(checkpoint_dir, "checkpoint.dir", more * size, what)
    agree_or_raise([problem] if problem else [], "Free space there, lower checkpoint.keep_last, or point checkpoint.dir at a larger volume")
