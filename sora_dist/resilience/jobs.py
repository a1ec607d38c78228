"""Jobs the drills run on this machine: a launch whose output lines are timestamped as they arrive
(so that the time a fault was noticed can be read off them), its process tree, and its workers."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def worker_pid(proc: subprocess.Popen, rank: int) -> Optional[int]:
    """The pid of the trainer process of global ``rank`` below ``proc`` (not its DataLoader workers)."""
    for pid in descendants(proc.pid):
        try:
            env = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            parent_env = Path(f"/proc/{parent}/environ").read_bytes()
        except (OSError, ValueError):
            continue
        if env.get(b"RANK") == str(rank).encode() and f"RANK={rank}".encode() not in parent_env:
            return pid
    return None


class Job:
    """A launched command; every line it prints is kept with the Unix time it arrived, and written
    to ``log``."""

    def __init__(self, cmd: list[str], log: Path, env: dict):
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, errors="replace")
        self._reader = threading.Thread(target=self._read, args=(Path(log),), daemon=True)
        self._reader.start()

    def _read(self, log: Path) -> None:
        with open(log, "w") as out:
            for line in self.proc.stdout:
                with self._lock:
                    self.lines.append((time.time(), line))
                out.write(line)
                out.flush()

    def first(self, pattern: str, after: float = 0.0) -> Optional[float]:
        """When the first line matching ``pattern`` arrived at or after ``after``, or None."""
        regex = re.compile(pattern)
        with self._lock:
            return next((t for t, line in self.lines if t >= after and regex.search(line)), None)

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        with self._lock:
            return sum(1 for _, line in self.lines if regex.search(line))

    def text(self) -> str:
        with self._lock:
            return "".join(line for _, line in self.lines)

    def wait(self, timeout: float) -> Optional[int]:
        """The exit code, or None after killing the tree when ``timeout`` passed first."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc)
            self._reader.join(timeout=5)
            return None
        self._reader.join(timeout=5)
        return self.proc.returncode
