"""Faults that only the process itself can suffer, installed before the real trainer runs: the
in-process half of the chaos suite (``sora-dist fault-drill``). Everything else the suite
does from outside, to a plain launch: signals, files filled, damaged or corrupted.

  torchrun ... -m sora_dist.resilience.inject FAULT [ARGS] -- TRAIN ARGS

  disk DIR BYTES    DIR sits on a disk of BYTES: every file under it (a filler the suite writes
                    included) counts; a write beyond the size fails with ENOSPC, and
                    shutil.disk_usage reports what is left. For machines where no small file
                    system can be mounted: the error comes at the file-writing seam, as from a disk.
  nan RANK STEP     the model's output in step STEP on RANK is NaN, in the first attempt only
                    (a transient fault: a bit flip, a bad kernel launch)
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import sys
import time
from pathlib import Path

from sora_dist.cli import main as cli_main
from sora_dist.console import exit_process
from sora_dist.models import VideoDiT

RANK = int(os.environ.get("RANK", "0"))
RESCAN_S = 0.2


def disk_used(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class _QuotaFile:
    """A file being written on the small disk: a write past its size fails as a full disk does.
    What the disk holds is read from the folder at most every RESCAN_S (torch.save writes in many
    small pieces), plus what this file wrote since."""

    def __init__(self, file, folder: Path, size: int):
        self._file, self._folder, self._size = file, folder, size
        self._scanned_at, self._used = 0.0, 0

    def write(self, data):
        size = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if time.monotonic() - self._scanned_at > RESCAN_S:
            self._file.flush()
            self._scanned_at, self._used = time.monotonic(), disk_used(self._folder)
        if self._used + size > self._size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._file.name)
        self._used += size
        return self._file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def __getattr__(self, name):
        return getattr(self._file, name)


def small_disk_functions(folder: Path, size: int):
    """``open`` and ``shutil.disk_usage`` as they behave when ``folder`` sits on a disk of ``size`` bytes."""
    folder = folder.resolve()
    real_open, real_usage = io.open, shutil.disk_usage

    def on_disk(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and folder in (Path(path).resolve(), *Path(path).resolve().parents)

    def quota_open(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        return _QuotaFile(opened, folder, size) if on_disk(file) and any(c in mode for c in "wax+") else opened

    def usage(path):
        if not on_disk(path):
            return real_usage(path)
        used = disk_used(folder)
        return real_usage(path)._replace(total=size, used=used, free=max(0, size - used))

    return quota_open, usage


def small_disk(folder: Path, size: int) -> None:
    quota_open, usage = small_disk_functions(folder, size)
    io.open = builtins.open = quota_open
    shutil.disk_usage = usage


def nan_output(rank: int, at_step: int) -> None:
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    original, calls = VideoDiT.forward, [0]

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls[0] += 1
        return out * float("nan") if RANK == rank and calls[0] == at_step else out

    VideoDiT.forward = forward


def install(fault: str, params: list[str]) -> None:
    if fault == "disk":
        small_disk(Path(params[0]), int(params[1]))
    elif fault == "nan":
        nan_output(int(params[0]), int(params[1]))
    else:
        raise SystemExit(f"unknown fault {fault!r}: disk or nan")


if __name__ == "__main__":
    split = sys.argv.index("--")
    install(sys.argv[1], sys.argv[2:split])
    exit_process(cli_main(["train", *sys.argv[split + 1 :]]))
