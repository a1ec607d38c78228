"""How commands talk to their user: INFO logging on rank 0, and a user error as one line (no
traceback) with exit status 2."""

from __future__ import annotations

import logging
import os

from sora_dist.errors import SoraDistError

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


def run_command(command) -> int:
    """Run a command with the project's logging; a user error is logged (no traceback), exit 2."""
    setup_logging()
    try:
        command()
    except SoraDistError as err:
        log.error("%s: %s", type(err).__name__, err)
        return 2
    return 0
