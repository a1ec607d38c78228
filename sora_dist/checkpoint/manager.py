"""One checkpoint manager for everything that resumes a run.

A checkpoint is a folder ``step-N/`` holding, through torch.distributed.checkpoint (DCP), the
model, optimizer, EMA (sharded as they are in memory, resharded on load), the LR schedule and the
step/sample counters; beside them ``rng.json`` (each data-parallel rank's noise generator),
``data.json`` (the loader's global position) and ``config.yaml``. It is written as
``step-N.tmp/`` and renamed, with its ``COMPLETE`` manifest (every file's size and CRC-32, see
files.py), only after every rank has finished, then ``latest`` is replaced atomically: a crash
mid-save never leaves a checkpoint that looks complete. Saves can run asynchronously; a pending
one is finalized as soon as every rank's write is done.

A save that fails (no space, an I/O error, permissions) costs that checkpoint, not the run: its
partial folder is removed and training goes on, until ``checkpoint.max_failed_saves`` saves in a
row have failed. A resume verifies the checkpoint's bytes against its manifest (every rank hashes
a share of the files) and treats any mismatch, like any failure to load it, as damage: the
checkpoint is named and the one before it is tried.

DeepSpeed keeps its own format (``engine.save_checkpoint``) inside the same folder layout.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from sora_dist.checkpoint.files import (
    HashingWriter, SafeLoadPlanner, SafeReader, file_digest, files_of, read_manifest, size_problem, verify_share,
    weights_only_loads, write_manifest,
)
from sora_dist.checkpoint.state import TrainState, decode_data_state, distributed, encode_data_state, rank, single_process_ok
from sora_dist.config import CheckpointConfig, Config, save_config
from sora_dist.console import human_bytes
from sora_dist.errors import CheckpointError, ConfigError
from sora_dist.parallel.data import deepspeed_checkpoint_classes

log = logging.getLogger("sora_dist")

LATEST = "latest"
SAVE_FAILURES = (OSError, CheckpointException)
"""What a failed write raises: the OS's error, or DCP's wrapper of every rank's error."""


def is_complete(path: Path) -> tuple[bool, str]:
    """Whether ``path`` is a finished checkpoint by its manifest and file sizes (no hashing), and if not, why."""
    problem = size_problem(path)
    return problem is None, problem or ""


def _step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def finished_checkpoints(folder: Path) -> list[Path]:
    """step-N folders, oldest first; an interrupted save's step-N.tmp is never one."""
    return sorted((p for p in Path(folder).glob("step-*") if p.is_dir() and p.name[5:].isdigit()), key=_step_of)


def newest_complete(folder: Path) -> Optional[Path]:
    """The newest checkpoint in ``folder`` that is complete; broken ones are logged and skipped."""
    for path in reversed(finished_checkpoints(folder)):
        ok, why = is_complete(path)
        if ok:
            return path
        log.warning("skipping checkpoint %s: %s; trying the one before", path, why)
    return None


def verify(path: Path) -> list[str]:
    """Every problem of a checkpoint folder, checked by one process (export, sampling, ``checkpoint verify``)."""
    return verify_share(path)


def checkpoint_size(path: Path) -> int:
    """Bytes of a complete checkpoint, from its manifest."""
    return sum(entry["bytes"] for entry in read_manifest(path).values())


def saves_enabled(cfg: CheckpointConfig) -> bool:
    """Whether the run saves checkpoints at all (by steps or by time)."""
    return cfg.every_steps > 0 or cfg.every_minutes > 0


def checkpoint_dir(cfg: CheckpointConfig, out_dir: Path) -> Path:
    """Where a run's step-N folders go: checkpoint.dir, else out_dir/checkpoints."""
    return Path(cfg.dir) if cfg.dir else Path(out_dir) / "checkpoints"


def one_line(err: BaseException) -> str:
    """A failure in one line: for DCP's CheckpointException, the first failing rank's own error."""
    ranks = ""
    if isinstance(err, CheckpointException):
        ranks = f" (rank {', '.join(map(str, sorted(err.failures)))})"
        err = next(iter(err.failures.values()))[0]
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}{f' writing {Path(err.filename).name}' if err.filename else ''}{ranks}"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}{ranks}"


class CheckpointManager:
    """``async_save``: the resolved checkpoint.async_save (null there means: on GPU/NPU).
    ``on_complete(step)`` is called on every rank once step-N is complete on disk.
    ``expected_bytes``: the size of one checkpoint before the first is written (then the newest's).
    ``watch()``: a context around each save's work (the step watchdog's save limit)."""

    def __init__(self, cfg: CheckpointConfig, out_dir: Path, async_save: bool = False, on_complete: Callable[[int], None] = lambda step: None,
                 expected_bytes: int = 0, watch: Callable[[], Any] = contextlib.nullcontext):
        self.cfg, self.async_save, self.on_complete, self.watch = cfg, async_save, on_complete, watch
        self.dir = checkpoint_dir(cfg, out_dir)
        self.expected_bytes = expected_bytes
        self.last_save_time = time.monotonic()
        self.last_saved_step = -1
        self.failed_in_row = 0
        self._pending: Optional[tuple[Any, int, Any]] = None  # (future, step, writer) of an async save
        if rank() == 0:
            self._remove_interrupted_saves()
        # DCP's own collectives get a group of their own: an async save finishes from a background
        # thread, which must not interleave with training's collectives on a shared group.
        self._group = dist.new_group(backend="gloo") if distributed() else None

    @property
    def enabled(self) -> bool:
        return saves_enabled(self.cfg)

    # The agreements below run on the training thread, on the default group like the training
    # loop's own collectives: the checkpoint group may be busy with an async save's DCP collectives.

    def _all(self, ok: bool) -> bool:
        """True on every rank if ``ok`` is True on every rank (a collective)."""
        if not distributed():
            return ok
        flag = torch.tensor(int(ok))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    def _gathered(self, mine: list) -> list:
        """Every rank's list, concatenated, on every rank (a collective)."""
        if not distributed():
            return list(mine)
        lists: list = [None] * dist.get_world_size()
        dist.all_gather_object(lists, mine)
        return [item for part in lists for item in part]

    # -- when --------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Every N steps or M minutes; the minute clock is agreed on by all ranks."""
        if not self.enabled or step == self.last_saved_step:
            return False
        by_steps = self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0
        by_time = self.cfg.every_minutes > 0 and time.monotonic() - self.last_save_time >= 60 * self.cfg.every_minutes
        if self.cfg.every_minutes > 0 and distributed():
            flag = torch.tensor(int(by_time))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            by_time = bool(flag)
        return by_steps or by_time

    # -- save --------------------------------------------------------------------------------

    def save(self, step: int, state: TrainState, cfg: Config, blocking: bool = False) -> Optional[Path]:
        """Write step-N (asynchronously if configured and not ``blocking``); None if the save
        failed (see ``_failed``)."""
        self.wait()  # one save in flight at a time
        with self.watch():
            return self._save(step, state, cfg, blocking)

    def _save(self, step: int, state: TrainState, cfg: Config, blocking: bool) -> Optional[Path]:
        self.last_save_time, self.last_saved_step = time.monotonic(), step
        tmp = self.dir / f"step-{step}.tmp"
        start = time.perf_counter()
        data = encode_data_state(state.loader.state_dict(state.dp_group))  # collective
        rng = state.gather_rng()  # collective
        writer = HashingWriter(str(tmp)) if state.deepspeed is None else None
        future = []

        def make_folder():
            if rank() == 0:
                self.dir.mkdir(parents=True, exist_ok=True)
                if shutil.disk_usage(self.dir).free < self.expected_bytes:
                    raise OSError(errno.ENOSPC, "too little free space for one more checkpoint, so it was not attempted")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)

        def write_state():  # every rank writes its shards; DCP tells every rank of any rank's failure
            if state.deepspeed is not None:
                state.deepspeed.save_checkpoint(str(tmp / "deepspeed"), tag="state", client_state={"train": state.counters()})
                return
            with single_process_ok():
                if self.async_save and not blocking:
                    future.append(dcp.async_save(state.dcp_state_dict(), storage_writer=writer, process_group=self._group))
                else:
                    dcp.save(state.dcp_state_dict(), storage_writer=writer, process_group=self._group)

        def write_position():
            if rank() == 0:
                (tmp / "data.json").write_text(json.dumps(data))
                (tmp / "rng.json").write_text(json.dumps(rng))
                save_config(cfg, tmp / "config.yaml")

        for part in (make_folder, write_state, write_position):
            error = self._agreed(part)
            if error is not None:
                return self._failed(step, error)
        if future:
            self._pending = (future[0], step, writer)
            log.info("checkpoint step %d: writing in the background (%.2f s in the step)", step, time.perf_counter() - start)
            return self.dir / f"step-{step}"
        if not self._finalize(step, writer):
            return None
        log.info("checkpoint step %d saved to %s in %.2f s", step, self.dir / f"step-{step}", time.perf_counter() - start)
        return self.dir / f"step-{step}"

    def _agreed(self, part: Callable[[], Any]) -> Optional[str]:
        """Run this rank's ``part`` of a save; None if it succeeded on every rank, else why it
        failed: this rank's own error, or '' where only other ranks failed."""
        try:
            part()
            error = None
        except SAVE_FAILURES as err:
            error = one_line(err)
        if self._all(error is None):
            return None
        return error or ""

    def poll(self) -> None:
        """Finalize a background save once every rank's write has finished (cheap when none)."""
        if self._pending is None:
            return
        done = torch.tensor(int(self._pending[0].done()))
        if distributed():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done:
            self.wait()

    def wait(self) -> None:
        """Block until a background save is written, then finalize it."""
        if self._pending is None:
            return
        future, step, writer = self._pending
        self._pending = None
        with self.watch():
            error = self._agreed(future.result)
            if error is not None:
                self._failed(step, error)
            elif self._finalize(step, writer):
                log.info("checkpoint step %d written in the background", step)

    def _finalize(self, step: int, writer: Optional[HashingWriter]) -> bool:
        """Every rank's digests into the manifest, then step-N.tmp becomes step-N (False if that failed)."""
        tmp, final = self.dir / f"step-{step}.tmp", self.dir / f"step-{step}"
        if writer is not None:
            mine = list(writer.digests.items())
        else:  # DeepSpeed wrote its files itself: each rank hashes a share of them
            names = files_of(tmp / "deepspeed") if rank() == 0 else []
            names = self._shared(names)
            mine = [(f"deepspeed/{name}", file_digest(tmp / "deepspeed" / name)) for name in names[rank()::self._world()]]
        digests = dict(self._gathered(mine))

        def complete():
            if rank() == 0:
                for name in ("data.json", "rng.json", "config.yaml"):
                    digests[name] = file_digest(tmp / name)
                write_manifest(tmp, step, digests)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                pointer = self.dir / (LATEST + ".tmp")
                pointer.write_text(final.name)
                os.replace(pointer, self.dir / LATEST)
                self._prune()

        error = self._agreed(complete)
        if error is not None:
            self._failed(step, error)
            return False
        self.failed_in_row = 0
        self.expected_bytes = checkpoint_size(final)
        self.on_complete(step)
        return True

    def _world(self) -> int:
        return dist.get_world_size() if distributed() else 1

    def _shared(self, names: list[str]) -> list[str]:
        """Rank 0's list on every rank."""
        if distributed():
            holder = [names]
            dist.broadcast_object_list(holder, src=0)
            names = holder[0]
        return names

    def _failed(self, step: int, why: str) -> None:
        """A save that failed: its partial folder removed, one line logged (by the ranks that failed
        and by rank 0), the run goes on until checkpoint.max_failed_saves saves in a row have failed."""
        if rank() == 0:
            shutil.rmtree(self.dir / f"step-{step}.tmp", ignore_errors=True)
        self.failed_in_row += 1
        limit = self.cfg.max_failed_saves
        newest = next((p for p in reversed(finished_checkpoints(self.dir)) if is_complete(p)[0]), None)
        where = f"the newest complete checkpoint is {newest}" if newest else f"there is no complete checkpoint in {self.dir}"
        free = shutil.disk_usage(self.dir).free if self.dir.exists() else 0
        why = why or "another rank failed (its log says why)"
        if limit and self.failed_in_row >= limit:
            raise CheckpointError(
                f"{self.failed_in_row} checkpoint saves in a row failed (checkpoint.max_failed_saves={limit}), the last at step {step} in "
                f"{self.dir} on host {socket.gethostname()}: {why}; stopping. {where}: free space there (or set checkpoint.dir) and "
                "relaunch, which resumes from it")
        if rank() == 0 or not why.startswith("another rank"):
            log.error(
                "checkpoint step %d failed in %s on host %s: %s (a checkpoint takes about %s, %s free); training goes on and the next "
                "save is tried at the next interval (%d failed in a row of checkpoint.max_failed_saves=%s; %s)",
                step, self.dir, socket.gethostname(), why, human_bytes(self.expected_bytes), human_bytes(free), self.failed_in_row,
                limit or "unlimited", where)
        return None

    def _remove_interrupted_saves(self) -> None:
        """step-N.tmp folders of saves a failure interrupted: never resumable, only taking space."""
        for stale in self.dir.glob("step-*.tmp"):
            log.warning("removing %s, left by an interrupted save", stale)
            shutil.rmtree(stale, ignore_errors=True)

    def _prune(self) -> None:
        if self.cfg.keep_last <= 0:
            return
        for old in finished_checkpoints(self.dir)[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # -- resume ------------------------------------------------------------------------------

    def resume(self, state: TrainState) -> Optional[Path]:
        """Load the checkpoint ``checkpoint.resume`` names (auto: the newest that loads) into
        ``state``; returns it, or None for a fresh start. A damaged checkpoint is named and the
        one before it tried; when there are checkpoints but none loads, the run stops."""
        choice = self.cfg.resume
        if choice == "none":
            return None
        candidates = [Path(choice)] if choice != "auto" else list(reversed(finished_checkpoints(self.dir)))
        problems = []
        for path in candidates:
            problem = self.load(path, state)
            if problem is None:
                return path
            problems.append(f"{path.name}: {problem}")
            if path != candidates[-1]:
                log.warning("checkpoint %s is damaged: %s; trying the one before", path, problem)
        if problems:
            what = f"checkpoint.resume={choice} is not a complete checkpoint that loads" if choice != "auto" else f"no checkpoint in {self.dir} loads"
            raise CheckpointError(f"{what}: {'; '.join(problems)}. Restore a good copy, or start afresh with "
                                  "checkpoint.resume=none or another checkpoint.dir")
        return None

    def load(self, path: Path, state: TrainState) -> Optional[str]:
        """Verify ``path``'s bytes (every rank hashes a share), then load it into ``state``; why it
        could not be loaded, or None (a collective: every rank gets the same answer)."""
        start = time.perf_counter()
        problems = self._gathered(verify_share(path, rank(), self._world()))
        if problems:
            return "; ".join(dict.fromkeys(problems))
        verified_s = time.perf_counter() - start
        try:
            mode, exact_rng = self._load(path, state)
            error = None
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - any failure to load is damage
            if isinstance(err, ConfigError):
                raise  # the run's own settings, not the checkpoint: say so as it is
            error = one_line(err)
        if not self._all(error is None):
            return error or "another rank failed to load it (its log says why)"
        self.last_saved_step = state.step
        self.expected_bytes = checkpoint_size(path)
        log.info(
            "resumed from %s at step %d (bytes verified in %.2f s, %.1f MiB; data: %s; noise generator %s)",
            path, state.step, verified_s, self.expected_bytes / 2**20,
            "exact replay of each rank's stream" if mode == "replay" else "skipping every sample already trained on",
            "restored" if exact_rng else "reseeded for the new layout",
        )
        return None

    def _load(self, path: Path, state: TrainState) -> tuple[str, bool]:
        """Restore everything ``save`` wrote, into the current (possibly different) layout."""
        if state.deepspeed is not None:
            if not (path / "deepspeed").is_dir():
                raise ConfigError(f"{path} was not written by the DeepSpeed engine: resume it with the engine that wrote it")
            saved = json.loads((path / "rng.json").read_text())
            if saved["world_size"] != state.world_size:
                raise ConfigError(
                    f"{path} was saved by DeepSpeed on {saved['world_size']} ranks; this run has {state.world_size}. "
                    "DeepSpeed checkpoints resume on the same world size; convert with DeepSpeed's ds_to_universal "
                    "or train with parallel.engine=fsdp, whose checkpoints reshard freely"
                )
            with weights_only_loads(deepspeed_checkpoint_classes()):
                _, client = state.deepspeed.load_checkpoint(str(path / "deepspeed"), tag="state")
            state.set_counters(client["train"])
        else:
            if (path / "deepspeed").is_dir():
                raise ConfigError(f"{path} was written by the DeepSpeed engine: resume it with parallel.engine=deepspeed")
            payload = state.dcp_state_dict()
            with single_process_ok():
                dcp.load(payload, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(), process_group=self._group)
            state.set_dcp_state_dict(payload)
        data = decode_data_state(json.loads((path / "data.json").read_text()), state.loader.manifest.num_samples)
        mode = state.loader.load_state_dict(data)
        return mode, state.set_rng(json.loads((path / "rng.json").read_text()))
