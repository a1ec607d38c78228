"""How commands talk to their user: INFO logging on rank 0, and a user error as one line (no
traceback) with exit status 2, whether it is a mistake in the arguments (``CommandParser``) or
found later (a ``SoraDistError`` raised inside a command run by ``run_command`` or
``user_command``)."""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional

from sora_dist.errors import ConfigError, SoraDistError

log = logging.getLogger("sora_dist")


def human_bytes(nbytes: float) -> str:
    """A byte count as people read it: 512 KiB, 4.56 MiB, 1.5 GiB."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{int(nbytes)} B"


def setup_logging() -> None:
    """INFO on rank 0, warnings only on the other ranks."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(message)s",
        datefmt="%H:%M:%S",
    )


def run_command(command: Callable[[], Optional[int]]) -> int:
    """Run a command with the project's logging; its exit status, or 2 after logging a user error
    as one line (no traceback)."""
    setup_logging()
    try:
        status = command()
    except SoraDistError as err:  # one line, even where the message wraps another library's
        log.error("%s: %s", type(err).__name__, " ".join(str(err).split()))
        return 2
    return status if isinstance(status, int) else 0


def user_command(main: Callable[[Optional[list[str]]], Optional[int]]):
    """Decorate a command's ``main(argv)`` (run by ``sora-dist NAME`` and by ``python -m`` under
    torchrun) so that a user error ends it with one line and exit status 2."""
    @functools.wraps(main)
    def wrapped(argv: Optional[list[str]] = None) -> int:
        return run_command(lambda: main(argv))

    return wrapped


def exit_process(status: Optional[int] = 0) -> NoReturn:
    """End the process with ``status``: run the atexit handlers, flush the standard streams and
    leave by ``os._exit``, skipping the interpreter's finalization. Every command and test worker
    ends here, whether or not it knows it ran a gloo process group: destroy_process_group forgets
    the group, and a script that calls init_process_group itself tells no one.

    Why: destroy_process_group drops only torch's own references to a group. While FSDP's state,
    a DeviceMesh or DeepSpeed still holds the group, its gloo worker threads live on, and a worker
    that releases a finished collective after the main thread has moved on (a few microseconds
    after the completion it signalled, or much later on a crowded core) drops the last reference
    to that collective's tensors. Their Python objects need the GIL to die; once finalization has
    begun, taking the GIL ends the thread with pthread_exit, whose unwinding through a noexcept
    destructor (AsyncWork's) calls std::terminate: "terminate called without an active
    exception", SIGABRT, and a job reported failed after it finished (docs/troubleshooting.md;
    tests/distributed/test_exit.py reproduces it). Skipping finalization leaves those threads
    nothing to do."""
    status = 0 if status is None else status
    atexit._run_exitfuncs()  # logging's flush, weakref finalizers, temporary folders
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose mistakes are one line: the problem and where the help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse type for a count or size: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def read_json(path: str | Path, what: str, written_by: str) -> dict:
    """A JSON file the user named on the command line; ConfigError naming it and the command that
    writes such files when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"{what} {path} does not exist: pass a file written by {written_by}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {path} is not JSON ({err}): pass a file written by {written_by}") from None
