"""One checkpoint manager for everything that resumes a run.

A checkpoint is a folder ``step-N/`` holding, through torch.distributed.checkpoint (DCP), the
model, optimizer, EMA (sharded as they are in memory, resharded on load), the LR schedule and the
step/sample counters; beside them ``rng.json`` (each data-parallel rank's noise generator),
``data.json`` (the loader's global position) and ``config.yaml``. It is written as
``step-N.tmp/`` and renamed, with a ``COMPLETE`` marker, only after every rank has finished,
then ``latest`` is replaced atomically: a crash mid-save never leaves a checkpoint that looks
complete. Saves can run asynchronously; a pending one is finalized as soon as every rank's
write is done.

DeepSpeed keeps its own format (``engine.save_checkpoint``) inside the same folder layout.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from sora_dist.config import CheckpointConfig, Config, save_config
from sora_dist.errors import ConfigError

log = logging.getLogger("sora_dist")

COMPLETE = "COMPLETE"
LATEST = "latest"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns that it assumes one process when no process group exists: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def encode_data_state(state: dict) -> dict:
    """JSON form of LatentLoader.state_dict(): bitmaps packed and base64-encoded."""
    packed = {str(e): base64.b64encode(np.packbits(m).tobytes()).decode() for e, m in state["consumed"].items()}
    return {**state, "consumed": packed, "num_samples": int(len(next(iter(state["consumed"].values()), [])))}


def decode_data_state(raw: dict, num_samples: int) -> dict:
    if raw["num_samples"] and raw["num_samples"] != num_samples:
        raise ConfigError(f"the checkpoint's data position covers {raw['num_samples']} samples but the dataset has {num_samples}: resume with the same dataset")
    consumed = {
        int(e): np.unpackbits(np.frombuffer(base64.b64decode(b), dtype=np.uint8))[:num_samples].astype(bool)
        for e, b in raw["consumed"].items()
    }
    return {**raw, "consumed": consumed}


def is_complete(path: Path) -> tuple[bool, str]:
    """Whether ``path`` is a finished checkpoint, and if not, why."""
    if not (path / COMPLETE).is_file():
        return False, "no COMPLETE marker (the save was interrupted)"
    for name in ("data.json", "rng.json"):
        try:
            json.loads((path / name).read_text())
        except (OSError, ValueError) as err:
            return False, f"{name} is unreadable ({err})"
    if (path / "deepspeed").is_dir():
        return True, ""
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # noqa: BLE001 - any failure to parse means a broken checkpoint
        return False, f"DCP metadata is unreadable ({type(err).__name__}: {err})"
    needed: dict[str, int] = {}  # every data file must hold the bytes the metadata points into
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        actual = (path / name).stat().st_size if (path / name).is_file() else -1
        if actual < size:
            return False, f"{name} is truncated or missing ({max(actual, 0)} of {size} bytes)"
    return True, ""


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


def saves_enabled(cfg: CheckpointConfig) -> bool:
    """Whether the run saves checkpoints at all (by steps or by time)."""
    return cfg.every_steps > 0 or cfg.every_minutes > 0


def checkpoint_dir(cfg: CheckpointConfig, out_dir: Path) -> Path:
    """Where a run's step-N folders go: checkpoint.dir, else out_dir/checkpoints."""
    return Path(cfg.dir) if cfg.dir else Path(out_dir) / "checkpoints"


class CheckpointManager:
    """``async_save``: the resolved checkpoint.async_save (null there means: on GPU/NPU).
    ``on_complete(step)`` is called on every rank once step-N is complete on disk."""

    def __init__(self, cfg: CheckpointConfig, out_dir: Path, async_save: bool = False, on_complete: Callable[[int], None] = lambda step: None):
        self.cfg, self.async_save, self.on_complete = cfg, async_save, on_complete
        self.dir = checkpoint_dir(cfg, out_dir)
        self.last_save_time = time.monotonic()
        self.last_saved_step = -1
        self._pending: Optional[tuple[Any, int]] = None  # (future, step) of an async save
        if _rank() == 0:
            self._remove_interrupted_saves()
        # DCP's own collectives get a group of their own: an async save finishes from a background
        # thread, which must not interleave with training's collectives on a shared group.
        self._group = dist.new_group(backend="gloo") if _distributed() else None

    @property
    def enabled(self) -> bool:
        return saves_enabled(self.cfg)

    # -- when --------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Every N steps or M minutes; the minute clock is agreed on by all ranks."""
        if not self.enabled or step == self.last_saved_step:
            return False
        by_steps = self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0
        by_time = self.cfg.every_minutes > 0 and time.monotonic() - self.last_save_time >= 60 * self.cfg.every_minutes
        if self.cfg.every_minutes > 0 and _distributed():
            flag = torch.tensor(int(by_time))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            by_time = bool(flag)
        return by_steps or by_time

    # -- save --------------------------------------------------------------------------------

    def save(self, step: int, state: "TrainState", cfg: Config, blocking: bool = False) -> Path:
        """Write step-N (asynchronously if configured and not ``blocking``)."""
        self.wait()  # one save in flight at a time
        tmp = self.dir / f"step-{step}.tmp"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        start = time.perf_counter()
        data = encode_data_state(state.loader.state_dict(state.dp_group))  # collective
        rng = state.gather_rng()  # collective
        if state.deepspeed is not None:
            state.deepspeed.save_checkpoint(str(tmp / "deepspeed"), tag="state", client_state={"train": state.counters()})
            future = None
        else:
            payload = state.dcp_state_dict()
            with _single_process_ok():
                if self.async_save and not blocking:
                    future = dcp.async_save(payload, checkpoint_id=str(tmp), process_group=self._group)
                else:
                    dcp.save(payload, checkpoint_id=str(tmp), process_group=self._group)
                    future = None
        if _rank() == 0:
            (tmp / "data.json").write_text(json.dumps(data))
            (tmp / "rng.json").write_text(json.dumps(rng))
            save_config(cfg, tmp / "config.yaml")
        self.last_save_time, self.last_saved_step = time.monotonic(), step
        if future is not None:
            self._pending = (future, step)
            log.info("checkpoint step %d: writing in the background (%.2f s in the step)", step, time.perf_counter() - start)
        else:
            self._finalize(step)
            log.info("checkpoint step %d saved to %s in %.2f s", step, self.dir / f"step-{step}", time.perf_counter() - start)
        return self.dir / f"step-{step}"

    def poll(self) -> None:
        """Finalize a background save once every rank's write has finished (cheap when none)."""
        if self._pending is None:
            return
        done = torch.tensor(int(self._pending[0].done()))
        if _distributed():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done:
            self.wait()

    def wait(self) -> None:
        """Block until a background save is written, then finalize it."""
        if self._pending is None:
            return
        future, step = self._pending
        future.result()
        self._pending = None
        self._finalize(step)
        log.info("checkpoint step %d written in the background", step)

    def _finalize(self, step: int) -> None:
        _barrier()  # every rank has written its shards
        if _rank() == 0:
            tmp, final = self.dir / f"step-{step}.tmp", self.dir / f"step-{step}"
            (tmp / COMPLETE).write_text(str(step))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = self.dir / (LATEST + ".tmp")
            pointer.write_text(final.name)
            os.replace(pointer, self.dir / LATEST)
            self._prune()
        _barrier()
        self.on_complete(step)

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

    def find_resume(self) -> Optional[Path]:
        """The checkpoint that ``checkpoint.resume`` names; for auto, the newest complete one."""
        choice = self.cfg.resume
        if choice == "none":
            return None
        if choice != "auto":
            path = Path(choice)
            ok, why = is_complete(path)
            if not ok:
                raise ConfigError(f"checkpoint.resume={choice}: {path} is not a complete checkpoint: {why}")
            return path
        return newest_complete(self.dir)

    def load(self, path: Path, state: "TrainState") -> None:
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
            _, client = state.deepspeed.load_checkpoint(str(path / "deepspeed"), tag="state")
            state.set_counters(client["train"])
        else:
            if (path / "deepspeed").is_dir():
                raise ConfigError(f"{path} was written by the DeepSpeed engine: resume it with parallel.engine=deepspeed")
            payload = state.dcp_state_dict()
            with _single_process_ok():
                dcp.load(payload, checkpoint_id=str(path), process_group=self._group)
            state.set_dcp_state_dict(payload)
        data = decode_data_state(json.loads((path / "data.json").read_text()), state.loader.manifest.num_samples)
        mode = state.loader.load_state_dict(data)
        exact_rng = state.set_rng(json.loads((path / "rng.json").read_text()))
        self.last_saved_step = state.step
        log.info(
            "resumed from %s at step %d (data: %s; noise generator %s)",
            path, state.step, "exact replay of each rank's stream" if mode == "replay" else "skipping every sample already trained on",
            "restored" if exact_rng else "reseeded for the new layout",
        )


class TrainState:
    """What a checkpoint holds, gathered from the live objects of a run."""

    def __init__(self, model, optimizer, scheduler, ema, loader, generator, dp_rank: int, dp_group, world_size: int, deepspeed=None):
        self.model, self.optimizer, self.scheduler, self.ema = model, optimizer, scheduler, ema
        self.loader, self.generator, self.deepspeed = loader, generator, deepspeed
        self.dp_rank, self.dp_group, self.world_size = dp_rank, dp_group, world_size
        self.step = 0
        self.samples = 0  # samples this data-parallel rank trained on (data.json has the global position)

    def counters(self) -> dict:
        return {"step": self.step, "samples": self.samples}

    def set_counters(self, counters: dict) -> None:
        self.step, self.samples = int(counters["step"]), int(counters["samples"])

    def dcp_state_dict(self) -> dict:
        payload = {
            "model": get_model_state_dict(self.model),
            "optim": get_optimizer_state_dict(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "train": self.counters(),
        }
        if self.ema is not None:
            payload["ema"] = self.ema.shadow
        return payload

    def set_dcp_state_dict(self, payload: dict) -> None:
        set_model_state_dict(self.model, payload["model"])
        set_optimizer_state_dict(self.model, self.optimizer, payload["optim"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.set_counters(payload["train"])
        # "ema" was loaded in place into self.ema.shadow by dcp.load.

    def gather_rng(self) -> dict:
        """Every data-parallel rank's generator state (a collective)."""
        mine = self.generator.get_state().tolist()
        states = [None] * (dist.get_world_size() if _distributed() else 1)
        if _distributed():
            dist.all_gather_object(states, (self.dp_rank, mine))
        else:
            states = [(0, mine)]
        return {"world_size": self.world_size, "generators": {str(r): s for r, s in states}}

    def set_rng(self, saved: dict) -> bool:
        """Restore this rank's generator if the checkpoint has one for its data-parallel rank
        and the same number of ranks; else keep the fresh seed (a new layout draws anew)."""
        state = saved["generators"].get(str(self.dp_rank))
        if state is None or saved["world_size"] != self.world_size:
            return False
        self.generator.set_state(torch.tensor(state, dtype=torch.uint8))
        return True


def gather_to_rank0(tensors: dict[str, torch.Tensor]) -> Optional[dict[str, torch.Tensor]]:
    """Whole copies of ``tensors`` in rank 0's CPU memory, None on the other ranks. Sharded ones
    (DTensors) are gathered one at a time, a collective every rank must join, so an accelerator
    holds at most one whole tensor beyond its shards."""
    rank = dist.get_rank() if _distributed() else 0
    whole_on_rank0 = {}
    for name, tensor in tensors.items():
        whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if rank == 0:
            whole_on_rank0[name] = whole.detach().to("cpu", copy=True).contiguous()
        del whole
    return whole_on_rank0 if rank == 0 else None


def load_weights_for_export(path: Path, model: torch.nn.Module, ema: bool) -> str:
    """Fill a single-device model from a DCP checkpoint (no process group needed); returns
    which weights were used ('ema' or 'model')."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    has_ema = any(key.startswith("ema.") for key in metadata.state_dict_metadata)
    use = "ema" if ema and has_ema else "model"
    if ema and not has_ema:
        log.warning("%s has no EMA weights (optim.ema_decay was 0): exporting the raw weights", path)
    target = {use: dict(model.state_dict())}
    with _single_process_ok():
        dcp.load(target, checkpoint_id=str(path))
    model.load_state_dict(target[use])
    return use


__all__ = ["CheckpointManager", "TrainState", "checkpoint_dir", "saves_enabled", "finished_checkpoints", "gather_to_rank0", "is_complete", "load_weights_for_export", "newest_complete"]
