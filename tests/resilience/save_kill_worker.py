"""Run from test_saves.py: one process trains with a checkpoint every 3 steps and SIGKILLs itself
at MOMENT of the second save (step 6), as a node failure or an OOM kill would.

  save_kill_worker.py MOMENT -- TRAIN ARGS

MOMENT is one of: before-shards (the step-6.tmp folder exists, nothing in it), mid-shards (after
two items of the shard file are written: a truncated file), before-complete (shards written, no
COMPLETE marker), before-rename (COMPLETE written in step-6.tmp), after-rename (step-6 in place,
the latest pointer not yet updated), mid-prune (step-3 partly deleted: its metadata gone).
"""

import os
import shutil
import signal
import sys
from pathlib import Path

import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as dcp_filesystem

import sora_dist.checkpoint.manager as checkpoint
from sora_dist.cli import main
from sora_dist.console import exit_process

KILL_STEP = 6


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def saving_kill_step(path) -> bool:
    return f"step-{KILL_STEP}" in str(path)


def arm(moment: str) -> None:
    if moment == "before-shards":
        for name in ("save", "async_save"):
            original = getattr(dcp, name)

            def save(*args, _original=original, **kwargs):
                if saving_kill_step(kwargs["storage_writer"].path):
                    die()
                return _original(*args, **kwargs)

            setattr(dcp, name, save)
    elif moment == "mid-shards":
        original, written = dcp_filesystem._write_item, [0]

        def write_item(*args, **kwargs):
            stream = args[1] if len(args) > 1 else kwargs.get("stream")
            if saving_kill_step(getattr(stream, "name", "")):
                written[0] += 1
                if written[0] > 2:
                    stream.flush()
                    die()
            return original(*args, **kwargs)

        dcp_filesystem._write_item = write_item
    elif moment == "before-complete":
        original = checkpoint.CheckpointManager._finalize

        def finalize(self, step, writer):
            if step == KILL_STEP:
                die()
            return original(self, step, writer)

        checkpoint.CheckpointManager._finalize = finalize
    elif moment in ("before-rename", "after-rename"):
        original = os.replace
        target = f"step-{KILL_STEP}.tmp" if moment == "before-rename" else "latest.tmp"

        def replace(src, dst, *args, **kwargs):
            if Path(src).name == target and (moment == "before-rename" or Path(dst).parent.joinpath(f"step-{KILL_STEP}").is_dir()):
                die()
            return original(src, dst, *args, **kwargs)

        checkpoint.os.replace = replace
    elif moment == "mid-prune":
        original = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            path = Path(path)
            if path.name == "step-3" and (path / ".metadata").exists():
                (path / ".metadata").unlink()
                die()
            return original(path, *args, **kwargs)

        checkpoint.shutil.rmtree = rmtree
    else:
        raise SystemExit(f"unknown moment {moment}")


if __name__ == "__main__":
    split = sys.argv.index("--")
    arm(sys.argv[1])
    exit_process(main(["train", *sys.argv[split + 1 :]]))
