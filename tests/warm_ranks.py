"""Rank processes for the tests, started warm.

Most of a multi-rank test's CPU time is every rank importing torch, DTensor, FSDP2 and sora_dist
again (about 3 s each on 2 cores), and torchrun's agent doing the same. ``run_ranks`` starts the
ranks as forks of one server process that made those imports once, with the environment torchrun
gives a rank (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...): rank 0 hosts the
store, as under ``torchrun --standalone`` without restarts. Each rank is still its own process
with its own process group, files and exit code, running the same entry point (``-m module`` or
a script) as a fresh interpreter would; when one fails, the others are stopped, as torchrun does.
Tests about torchrun itself (restarts, signals to the agent, rendezvous) keep launching torchrun.

The server is started on first use and stopped when pytest exits. Forking is safe because the
server only imports: it runs no tensor code and starts no thread pools, so every rank sets its
own thread count and seeds as a new process would.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sora_dist.resilience.jobs import free_port

PRELOAD = ("torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp", "torch._dynamo", "sora_dist.cli",
           "sora_dist.train", "sora_dist.sample")


# --- server: one process that imports once and forks ranks -------------------------------------

def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    return json.loads(data), fds


def _become(request: dict, fds: list[int]) -> None:
    """In the forked rank: take the request's streams, folder, environment and command, and run it."""
    import atexit as rank_atexit
    import runpy
    import traceback

    import torch

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    extra = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry and entry not in sys.path]
    sys.path[1:1] = extra  # where a fresh interpreter would look for what the server has not imported
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    torch.seed()  # a new process starts from a random seed, not the server's
    argv = request["argv"]
    code: int | str | None = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = str(Path(argv[0]).resolve().parent)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # noqa: BLE001 - reported as an interpreter would, exit code 1
        traceback.print_exc()
        code = 1
    rank_atexit._run_exitfuncs()
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def _supervise(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """A fork of the server per rank: forks the rank, tells the client its pid, then its exit code."""
    pid = os.fork()
    if pid == 0:
        conn.close()
        _become(request, fds)
    for fd in fds:
        os.close(fd)
    conn.sendall(f"{pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    os._exit(0)


def serve(path: str) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        request, fds = _receive(conn)
        if os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _supervise(conn, request, fds)
        conn.close()
        for fd in fds:
            os.close(fd)


# --- client: the tests' side ------------------------------------------------------------------

class WarmProcess:
    """One rank: its pid, and its exit code once it ends (negative: the signal that ended it)."""

    def __init__(self, conn: socket.socket):
        self.conn, self.returncode, self._buffer = conn, None, b""
        self.pid = int(self._line(blocking=True))

    def _line(self, blocking: bool) -> bytes:
        while b"\n" not in self._buffer:
            if not blocking and not select.select([self.conn], [], [], 0)[0]:
                return b""
            chunk = self.conn.recv(64)
            if not chunk:
                raise RuntimeError(f"the warm rank server lost rank {getattr(self, 'pid', '?')}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def poll(self) -> int | None:
        if self.returncode is None:
            line = self._line(blocking=False)
            if line:
                self.returncode = int(line)
                self.conn.close()
        return self.returncode

    def signal(self, number: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, number)
            except ProcessLookupError:
                pass


class Launcher:
    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="warm-ranks-")
        self.path = os.path.join(self.folder, "socket")
        self.server = subprocess.Popen([sys.executable, __file__, self.path], stdout=subprocess.PIPE, text=True,
                                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = self.server.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the warm rank server did not start (exit code {self.server.wait()})")

    def start(self, argv: list[str], env: dict[str, str], cwd: str, stdout, stderr) -> WarmProcess:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        with open(os.devnull) as stdin:
            request = json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode()
            socket.send_fds(conn, [request], [stdin.fileno(), stdout.fileno(), stderr.fileno()])
        return WarmProcess(conn)

    def close(self) -> None:
        self.server.kill()
        self.server.wait()


_LAUNCHER: Launcher | None = None


def launcher() -> Launcher:
    global _LAUNCHER
    if _LAUNCHER is None:
        _LAUNCHER = Launcher()
        atexit.register(_LAUNCHER.close)
    return _LAUNCHER


def rank_env(env: dict[str, str], rank: int, world_size: int, port: int) -> dict[str, str]:
    """What torchrun --standalone puts in a rank's environment (without an agent store)."""
    ranks = dict(RANK=rank, LOCAL_RANK=rank, GROUP_RANK=0, ROLE_RANK=rank, WORLD_SIZE=world_size, LOCAL_WORLD_SIZE=world_size,
                 ROLE_WORLD_SIZE=world_size, ROLE_NAME="default", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                 TORCHELASTIC_RESTART_COUNT=0, TORCHELASTIC_MAX_RESTARTS=0)
    return {"OMP_NUM_THREADS": "1", **env, **{k: str(v) for k, v in ranks.items()}}


class Ranks:
    """``nproc`` warm ranks of one job, like the workers of one torchrun: ``poll`` gives None while
    they run, then the exit code of the rank that failed first (0 when all succeed);
    when one fails, the others get SIGTERM, then SIGKILL ``grace`` seconds later."""

    def __init__(self, nproc: int, argv: list[str], streams: list[tuple], env: dict[str, str] | None = None, cwd: str | None = None,
                 grace: float = 10.0):
        base, port = dict(os.environ if env is None else env), free_port()
        self.ranks = [launcher().start(argv, rank_env(base, r, nproc, port), cwd or os.getcwd(), *streams[r]) for r in range(nproc)]
        self.grace, self.stopping, self.failed = grace, None, None

    def poll(self) -> int | None:
        running = [p for p in self.ranks if p.poll() is None]
        if self.failed is None:
            self.failed = next((p.returncode for p in self.ranks if p.returncode), None)
        if running and self.failed is not None:
            self.signal(signal.SIGTERM)
            if time.monotonic() > self.stopping + self.grace:
                self.signal(signal.SIGKILL)
        return None if running else (self.failed or 0)

    def signal(self, number: int) -> None:
        if number == signal.SIGTERM and self.stopping is not None:
            return
        self.stopping = self.stopping or time.monotonic()
        for p in self.ranks:
            p.signal(number)

    def kill(self) -> None:
        """SIGKILL every rank (a node lost at once), and wait until all have ended."""
        self.signal(signal.SIGKILL)
        while self.poll() is None:
            time.sleep(0.02)


def run_ranks(nproc: int, argv: list[str], env: dict[str, str] | None = None, timeout: float = 600, cwd: str | None = None,
              grace: float = 10.0) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node nproc ARGV`` with warm ranks: their stdout and
    stderr, each in rank order, and the exit code of the rank that failed first (0: none did)."""
    folder = tempfile.mkdtemp(prefix="ranks-")
    streams = [(open(os.path.join(folder, f"{r}.out"), "w+"), open(os.path.join(folder, f"{r}.err"), "w+")) for r in range(nproc)]
    job, deadline, timed_out = Ranks(nproc, argv, streams, env, cwd, grace), time.monotonic() + timeout, False
    while (code := job.poll()) is None:
        if time.monotonic() > deadline and not timed_out:
            timed_out = True
            job.signal(signal.SIGTERM)
        if timed_out and time.monotonic() > deadline + grace:
            job.signal(signal.SIGKILL)
        time.sleep(0.02)
    stdout, stderr = ("".join(_read(pair[i]) for pair in streams) for i in (0, 1))
    shutil.rmtree(folder)
    if timed_out:
        raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
    return subprocess.CompletedProcess(argv, code, stdout, stderr)


def _read(file) -> str:
    file.seek(0)
    text = file.read()
    file.close()
    return text


if __name__ == "__main__":
    serve(sys.argv[1])
